"""Time kdc's batch augmentation (random crop with padding, horizontal flip) on uint8 batches.

Prints microseconds per batch for a CIFAR-sized and an MNIST-sized batch of
128, with both augmentations, crop only and flip only, and one JSON line.

    python scripts/bench_augment.py
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from kdcompress.data import Augment

SHAPES = {"cifar 128x3x32x32": (128, 3, 32, 32), "mnist 128x1x28x28": (128, 1, 28, 28)}
AUGMENTS = {"crop 4 + flip": Augment(4, True), "crop 4": Augment(4, False), "flip": Augment(0, True)}


def time_us(fn, blocks: int = 9, repeats: int = 50) -> float:
    """Median over ``blocks`` of the mean time of ``repeats`` calls (a shared machine has slow spells)."""
    for _ in range(20):
        fn()
    means = []
    for _ in range(blocks):
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        means.append((time.perf_counter() - started) / repeats * 1e6)
    return statistics.median(means)


def main() -> dict:
    result = {"torch_threads": torch.get_num_threads(), "us_per_batch": {}}
    for shape_name, shape in SHAPES.items():
        images = torch.randint(0, 256, shape, dtype=torch.uint8)
        generator = torch.Generator().manual_seed(0)
        for aug_name, augment in AUGMENTS.items():
            us = time_us(lambda augment=augment: augment(images, generator))
            result["us_per_batch"][f"{shape_name}, {aug_name}"] = us
            print(f"{shape_name:20s} {aug_name:14s} {us:8.0f} us per batch")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
