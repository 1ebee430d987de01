"""Anonymous memory while kdc decodes and trains on an image folder larger than memory should allow.

Generates an RGB image folder (``--images`` JPEGs of ``--size`` x ``--size``, ten classes, each a
random low-resolution pattern scaled up, so they compress like photos and are made quickly), then
in this process: ``load_data(imagefolder:...)`` decodes it into the cache (``--workers`` processes)
and one epoch of a small CNN trains on it, shuffled, from the memory-mapped cache, as ``kdc run``
reads it. A thread samples ``RssAnon`` and ``RssFile`` from /proc/self/status every 20 ms (and each
batch); the decoding processes' own ``RssAnon`` is sampled too (from /proc/PID/status). The mapped
file's pages count as ``RssFile``: page cache that the kernel drops under pressure, not memory the
process holds. The decoded size is ``images x 3 x size x size`` bytes: 55,000 at 128 is 2.70 GB.

Run::

    python scripts/imagefolder_memory.py                        # 55,000 images at 128x128x3: 2.70 GB decoded
    python scripts/imagefolder_memory.py --images 10000 --size 64   # a smaller check

Prints the phases and, last, one JSON line. The folder and cache go to a temporary directory
(``--dir`` to choose), removed afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def status_kb(pid: str = "self") -> dict[str, int]:
    """RssAnon, RssFile, VmHWM (kB) of a process, from /proc/PID/status; {} when it has gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


def children() -> list[str]:
    found = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as fh:
                found += fh.read().split()
        except OSError:
            pass
    return found


class Sampler:
    """Peak RssAnon and RssFile (kB) of this process, and of its children (summed), per phase."""

    def __init__(self):
        self.phase, self.peaks, self.stop = "start", {}, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def sample(self) -> None:
        me = status_kb()
        kids = sum(status_kb(pid).get("RssAnon", 0) for pid in children())
        peak = self.peaks.setdefault(self.phase, {"rss_anon_kb": 0, "rss_file_kb": 0, "children_rss_anon_kb": 0})
        peak["rss_anon_kb"] = max(peak["rss_anon_kb"], me.get("RssAnon", 0))
        peak["rss_file_kb"] = max(peak["rss_file_kb"], me.get("RssFile", 0))
        peak["children_rss_anon_kb"] = max(peak["children_rss_anon_kb"], kids)

    def run(self) -> None:
        while not self.stop.wait(0.02):
            self.sample()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def _write_images(job: tuple[Path, int, int, int, int]) -> int:
    root, start, count, size, seed = job
    rng = np.random.default_rng(seed + start)
    for i in range(start, start + count):
        label = i % 10
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        small[..., label % 3] = small[..., label % 3] // 4 + 40 * (label // 3)  # a class-dependent tint
        image = Image.fromarray(small).resize((size, size), Image.BILINEAR)
        image.save(root / f"c{label}" / f"{i:06d}.jpg", quality=90)
    return count


def make_folder(root: Path, images: int, size: int, test: int, workers: int) -> float:
    started = time.perf_counter()
    jobs = []
    for split, count in (("train", images), ("test", test)):
        for label in range(10):
            (root / split / f"c{label}").mkdir(parents=True, exist_ok=True)
        jobs += [
            (root / split, s, min(2000, count - s), size, 0 if split == "train" else 1) for s in range(0, count, 2000)
        ]
    with multiprocessing.get_context("fork").Pool(max(1, workers)) as pool:
        sum(pool.imap_unordered(_write_images, jobs))
    return time.perf_counter() - started


def small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 5, stride=4, padding=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 10),
    )


def train_one_epoch(train, batch_size: int, sampler: Sampler) -> tuple[float, int, float]:
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    started, seen, correct = time.perf_counter(), 0, 0
    for x, y, _ in train.batches(batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)):
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss_fn(logits, y).backward()
        opt.step()
        seen += len(y)
        correct += int((logits.argmax(1) == y).sum())
        sampler.sample()
    return time.perf_counter() - started, seen, correct / max(1, seen)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=55_000, help="training images (default 55,000)")
    parser.add_argument("--test", type=int, default=1000, help="test images")
    parser.add_argument("--size", type=int, default=128, help="height and width (default 128)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dir", type=Path, help="where the folder and cache go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the folder and cache")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="kdc-memory-", dir=args.dir))
    before = os.environ.get("KDC_CACHE")
    os.environ["KDC_CACHE"] = str(work / "cache")
    from kdcompress.data import load_data
    from kdcompress.recipe import DataSection

    try:
        made_s = make_folder(work / "imgs", args.images, args.size, args.test, args.workers)
        print(
            f"generated {args.images:,} + {args.test:,} JPEGs of {args.size}x{args.size} in {made_s:.1f} s", flush=True
        )
        with Sampler() as sampler:
            sampler.sample()
            sampler.phase = "decode"
            started = time.perf_counter()
            splits = load_data(DataSection(dataset=f"imagefolder:{work / 'imgs'}", workers=args.workers), seed=0)
            decode_s = time.perf_counter() - started
            sampler.sample()
            sampler.phase = "train"
            train_s, seen, accuracy = train_one_epoch(splits.train, args.batch_size, sampler)
            sampler.sample()
        result = report(args, splits, sampler, made_s, decode_s, train_s, seen, accuracy)
    finally:
        if before is None:
            os.environ.pop("KDC_CACHE")
        else:
            os.environ["KDC_CACHE"] = before
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return result


def report(args, splits, sampler, made_s, decode_s, train_s, seen, accuracy) -> dict:
    decoded = args.images * 3 * args.size * args.size
    mb = {
        phase: {k.replace("_kb", "_mb"): round(v / 1024, 1) for k, v in peak.items()}
        for phase, peak in sampler.peaks.items()
    }
    result = {
        "bench": "imagefolder_memory",
        "images": args.images,
        "size": args.size,
        "decoded_gb": round(decoded / 1e9, 3),
        "cache_file_gb": round(splits.train.cache.path.stat().st_size / 1e9, 3),
        "generate_s": round(made_s, 1),
        "decode_s": round(decode_s, 1),
        "train_epoch_s": round(train_s, 1),
        "trained_samples": seen,
        "train_accuracy": round(accuracy, 4),
        "peak_mb": mb,
        "peak_rss_anon_mb": round(max(p["rss_anon_kb"] for p in sampler.peaks.values()) / 1024, 1),
        "vm_hwm_mb": round(status_kb().get("VmHWM", 0) / 1024, 1),
        "memory_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
    }
    for phase, peak in mb.items():
        print(
            f"{phase}: peak RssAnon {peak['rss_anon_mb']:,.0f} MB, RssFile {peak['rss_file_mb']:,.0f} MB"
            f" (decoding processes' RssAnon, summed, pages shared with this one by fork included: "
            f"{peak['children_rss_anon_mb']:,.0f} MB)"
        )
    print(
        f"decoded {decoded / 1e9:.2f} GB in {decode_s:.1f} s; one epoch of a small CNN on {seen:,} images in "
        f"{train_s:.1f} s; peak RssAnon {result['peak_rss_anon_mb']:,.0f} MB"
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
