"""An image folder's training epoch from kdc's cache against torchvision's ImageFolder + DataLoader, interleaved.

Each round, in this order: the first decode pass (the folder's training split decoded into a fresh
cache directory by ``--workers`` processes, as the first run of a recipe does it); one training epoch
of a small model (the fashion-mnist-mlp student, 784 x C - 100 - 10) reading batches from the cache
(:class:`kdcompress.data.MappedData`, shuffled, as ``kdc`` reads ``imagefolder:``); the same epoch through
``torchvision.datasets.ImageFolder`` + a ``DataLoader`` with ``--workers`` workers (ToTensor,
Normalize(0.5, 0.5), plus Grayscale with ``--channels 1``: what kdc did before the cache); and one
DataLoader epoch without the
model (data alone), and the cache's epoch without the model. Rounds alternate so that a busy machine slows every path alike; the figures are
medians over rounds. The model, loop, batch size and optimiser are the same for both epochs; only
the data source differs.

Run::

    python scripts/bench_imagefolder.py --make-fashion-pngs /tmp/fmnist-png       # 70,000 PNGs, about a minute
    python scripts/bench_imagefolder.py /tmp/fmnist-png --rounds 3

Prints one line per round, the ratios, and last one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdcompress.data import CLASS_NAMES, DEBIAN_FASHION_MNIST, IDX_FILES, ImageSpec, MappedData, decode_image, read_idx
from kdcompress.imagecache import open_cache


def _write_split(job: tuple[Path, np.ndarray, np.ndarray, int]) -> int:
    folder, images, labels, start = job
    names = CLASS_NAMES["FashionMNIST"]
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image, mode="L").save(folder / class_folder(label, names) / f"{start + i:05d}.png")
    return len(images)


def class_folder(label: int, names) -> str:
    """``0-T-shirt_top``: the label first, so the folders sort in label order."""
    return f"{int(label)}-{names[int(label)].replace('/', '_').replace(' ', '_')}"


def make_fashion_pngs(out: Path, limit: int | None = None, source: Path = DEBIAN_FASHION_MNIST) -> dict:
    """Write Fashion-MNIST as grey PNGs: ``out/train/<class>/*.png`` and ``out/test/<class>/*.png``."""
    started = time.perf_counter()
    counts = {}
    jobs = []
    for split, (images_file, labels_file) in {"train": IDX_FILES[:2], "test": IDX_FILES[2:]}.items():
        images = read_idx(source / f"{images_file}.gz").numpy()
        labels = read_idx(source / f"{labels_file}.gz").numpy()
        if limit:
            images, labels = images[:limit], labels[:limit]
        for label in range(10):
            (out / split / class_folder(label, CLASS_NAMES["FashionMNIST"])).mkdir(parents=True, exist_ok=True)
        step = 2000
        jobs += [(out / split, images[i : i + step], labels[i : i + step], i) for i in range(0, len(images), step)]
        counts[split] = len(images)
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        written = sum(pool.imap_unordered(_write_split, jobs))
    seconds = time.perf_counter() - started
    print(f"wrote {written:,} PNGs into {out} in {seconds:.1f} s ({counts})", flush=True)
    return {"written": written, "seconds": seconds, **counts}


def small_model(shape) -> torch.nn.Module:
    torch.manual_seed(0)
    c, h, w = shape
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(c * h * w, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10)
    )


def train_epoch(model: torch.nn.Module, batches) -> tuple[float, int]:
    """Seconds for one epoch over ``batches`` ((x, y, ...) tuples), and the samples seen."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    seen = 0
    started = time.perf_counter()
    for x, y, *_ in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        seen += len(y)
    return time.perf_counter() - started, seen


def scan_split(folder: Path) -> tuple[list[str], list[int]]:
    """(files, labels) of one split, in torchvision ImageFolder's order."""
    from torchvision.datasets import ImageFolder

    found = ImageFolder(str(folder))
    return [p for p, _ in found.samples], [label for _, label in found.samples]


def loader(folder: Path, batch_size: int, workers: int, seed: int, channels: int):
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    grey = [T.Grayscale(1)] if channels == 1 else []
    dataset = ImageFolder(str(folder), transform=T.Compose([*grey, T.ToTensor(), T.Normalize((0.5,), (0.5,))]))
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )


def one_round(folder: Path, files, labels, args, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="kdc-imgcache-") as cache_dir:
        started = time.perf_counter()
        # the same channels on both paths: the same epoch, the same model
        decode = functools.partial(decode_image, spec=ImageSpec(args.channels, (28, 28)))
        cache = open_cache(files, labels, decode, {"channels": args.channels}, Path(cache_dir), args.workers, None)
        decode_s = time.perf_counter() - started
        data = MappedData(cache, (0.5,) * args.channels, (0.5,) * args.channels)
        batches = data.batches(args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
        cache_s, cache_n = train_epoch(small_model(cache.shape), batches)
        started = time.perf_counter()
        shuffled = data.batches(args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
        assert sum(len(y) for _, y, _ in shuffled) == cache_n
        cache_data_s = time.perf_counter() - started
        del cache, data, batches, shuffled
    batches = loader(folder, args.batch_size, args.workers, seed, args.channels)
    loader_s, loader_n = train_epoch(small_model((args.channels, 28, 28)), batches)
    started = time.perf_counter()
    data_n = sum(len(y) for _, y in loader(folder, args.batch_size, args.workers, seed, args.channels))
    data_s = time.perf_counter() - started
    assert cache_n == loader_n == data_n == len(files), (cache_n, loader_n, data_n)
    return {
        "decode_s": decode_s,
        "cache_epoch_s": cache_s,
        "loader_epoch_s": loader_s,
        "cache_data_epoch_s": cache_data_s,
        "loader_data_epoch_s": data_s,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, help="an image folder with train/<class>/*")
    parser.add_argument("--make-fashion-pngs", type=Path, metavar="DIR", help="write Fashion-MNIST as PNGs into DIR")
    parser.add_argument("--limit", type=int, help="with --make-fashion-pngs: at most this many images per split")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="decoding processes and DataLoader workers")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the model (default 1)")
    parser.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        default=1,
        help="1 (default): grey, what kdc gives Fashion-MNIST's grey PNGs (data.channels: auto); "
        "3: RGB on both paths, torchvision ImageFolder's default",
    )
    args = parser.parse_args(argv)
    if args.make_fashion_pngs:
        made = make_fashion_pngs(args.make_fashion_pngs, args.limit)
        print(json.dumps({"made": made}))
        if not args.folder:
            return made
    if not args.folder:
        parser.error("give an image folder (or --make-fashion-pngs DIR)")
    torch.set_num_threads(args.threads)
    folder = args.folder / "train"
    files, labels = scan_split(folder)
    rounds = []
    for r in range(args.rounds):
        rounds.append(one_round(folder, files, labels, args, seed=r))
        print(f"round {r + 1}: " + "  ".join(f"{k} {v:.2f}" for k, v in rounds[-1].items()), flush=True)
    med = {k: statistics.median(rnd[k] for rnd in rounds) for k in rounds[0]}
    result = {
        "bench": "imagefolder",
        "folder": str(args.folder),
        "train_images": len(files),
        "rounds": args.rounds,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "channels": args.channels,
        "cpus": os.cpu_count(),
        **{k: round(v, 3) for k, v in med.items()},
        "epoch_speedup": round(med["loader_epoch_s"] / med["cache_epoch_s"], 2),
        "data_speedup": round(med["loader_data_epoch_s"] / med["cache_data_epoch_s"], 1),
        "decode_over_loader_epoch": round(med["decode_s"] / med["loader_epoch_s"], 3),
        "decode_over_loader_data_epoch": round(med["decode_s"] / med["loader_data_epoch_s"], 3),
        "per_round": rounds,
    }
    print(
        f"training epoch: cache {med['cache_epoch_s']:.2f} s, ImageFolder + DataLoader({args.workers}) "
        f"{med['loader_epoch_s']:.2f} s: {result['epoch_speedup']:.1f}x faster from the cache\n"
        f"data alone (no model): cache {med['cache_data_epoch_s']:.2f} s, DataLoader {med['loader_data_epoch_s']:.2f} s: "
        f"{result['data_speedup']:.0f}x\n"
        f"first decode pass {med['decode_s']:.2f} s = {result['decode_over_loader_epoch']:.2f} x a DataLoader "
        f"training epoch, {result['decode_over_loader_data_epoch']:.2f} x a DataLoader epoch without the model"
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
