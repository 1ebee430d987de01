"""Build the fashion-mnist-mini set shipped inside kdcompress.

The subset is fixed and documented: from the standard Fashion-MNIST files it
takes, in file order, the first 1,000 training images of each of the 10
classes (10,000 images) and the first 200 test images of each class (2,000
images). Output: four gzip-compressed idx files, the same format as the
originals, plus the MIT licence notice of Fashion-MNIST.

Usage (the source defaults to Debian's dataset-fashion-mnist package)::

    python scripts/make_fashion_mnist_mini.py [--source /usr/share/datasets/fashion-mnist]

Rerunning it gives byte-identical files (the gzip header carries no time stamp).
"""

from __future__ import annotations

import argparse
import gzip
import io
from pathlib import Path

import torch

from kdcompress.data import DEBIAN_FASHION_MNIST, read_idx

OUT = Path(__file__).resolve().parent.parent / "kdcompress" / "embedded" / "fashion-mnist-mini"
PER_CLASS = {"train": 1000, "t10k": 200}


def first_per_class(labels: torch.Tensor, per_class: int) -> torch.Tensor:
    picked = [torch.nonzero(labels == c).flatten()[:per_class] for c in range(int(labels.max()) + 1)]
    return torch.sort(torch.cat(picked)).values  # keep the original file order


def write_idx(path: Path, tensor: torch.Tensor) -> None:
    header = bytes([0, 0, 0x08, tensor.dim()]) + b"".join(int(d).to_bytes(4, "big") for d in tensor.shape)
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0, filename="") as gz:
        gz.write(header + tensor.contiguous().numpy().tobytes())
    path.write_bytes(raw.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEBIAN_FASHION_MNIST)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for split, per_class in PER_CLASS.items():
        images = read_idx(args.source / f"{split}-images-idx3-ubyte.gz")
        labels = read_idx(args.source / f"{split}-labels-idx1-ubyte.gz")
        keep = first_per_class(labels, per_class)
        write_idx(args.out / f"{split}-images-idx3-ubyte.gz", images[keep])
        write_idx(args.out / f"{split}-labels-idx1-ubyte.gz", labels[keep])
        print(f"{split}: {len(keep)} images, {torch.bincount(labels[keep]).tolist()} per class")
    total = sum(p.stat().st_size for p in args.out.glob("*.gz"))
    print(f"wrote {args.out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
