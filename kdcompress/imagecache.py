"""An image folder decoded once into one uint8 array file, then read back memory-mapped.

The first use of a folder decodes every image (in ``workers`` processes) into one file of the cache
directory: a 4096-byte header (magic, then JSON: key, shape, dtype, count, settings), the images as
one uint8 array (N, C, H, W), then two uint64 fingerprints per image (its path, its size + mtime +
label). The file is written to a temporary file beside it and renamed into place, so it is whole or
absent. Later epochs and later runs map it read-only: anonymous memory holds one batch at a time
whatever the size of the folder; the pages read are the kernel's page cache, dropped under pressure.

The file's name comes from the folder and the settings that change the decoded bytes (``settings``:
channels, size, resize...); its key from the sorted list of (relative path, size, mtime_ns, label) and
the settings. A folder that changed since the cache was made (a file added, removed or rewritten) is
decoded again and the message says how many files changed. The file is data, never trusted: a wrong
magic, header, key or length makes it refused and rebuilt.

Rows are stored in the order of a hash of each file's relative path, a fixed pseudo-random order, so
that a contiguous stretch of the file holds every class (an image folder lists its files class by
class). Shuffling (:meth:`CachedImages.epoch_order`) then reads large contiguous blocks: the blocks
come in a random order and the rows within a block in a random order, so a disk slower than memory
still streams. Under torchrun the first process of each machine decodes while the others wait; each
rank reads one contiguous stretch of the array, its shard, and no other rank's. Example::

    >>> cache = open_cache(files, labels, decode, {"channels": 3}, Path("~/.cache/kdc/images"), 2, console)  # doctest: +SKIP
    >>> cache.images.shape, cache.gather(torch.tensor([0, 5])).shape  # doctest: +SKIP
    ((60000, 3, 28, 28), torch.Size([2, 3, 28, 28]))
"""

from __future__ import annotations

import hashlib
import json
import mmap
import multiprocessing
import os
import shutil
import time
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from . import distributed
from .errors import DataError, KdcError, describe
from .files import write_temp

__all__ = ["CachedImages", "open_cache", "CACHE_SUFFIX", "HEADER_BYTES", "BLOCK_BYTES", "fingerprints"]

MAGIC = b"KDCIMGS\n"
FORMAT_VERSION = 1
HEADER_BYTES = 4096  # the images start on a page boundary
CACHE_SUFFIX = ".kdcimg"
BLOCK_BYTES = 64 << 20  # shuffling reads blocks of about this many bytes of the array
CHUNK = 64  # images per decoding task


@dataclass
class CachedImages:
    """One split's decoded images, mapped read-only from the cache file, and their labels.

    ``images`` (N, C, H, W) uint8 is in storage order; ``rows[i]`` is the row of the i-th file as
    :func:`open_cache` was given it (its position), ``labels[i]`` its label. :meth:`subset` keeps
    positions (a held-out split) without copying images. ``decoded`` is how many images this call
    decoded (0 when the cache was reused); ``changed``: files changed since the cache was made.
    """

    path: Path
    images: np.ndarray
    labels: torch.Tensor
    rows: np.ndarray
    decoded: int = 0
    changed: int = 0
    _mapping: mmap.mmap | None = field(default=None, repr=False)
    _advised: tuple[int, int] = field(default=(0, 0), repr=False)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        """(C, H, W) of every image."""
        return tuple(self.images.shape[1:])

    def subset(self, index: torch.Tensor) -> "CachedImages":
        idx = np.asarray(index, dtype=np.int64)
        return CachedImages(self.path, self.images, self.labels[index], self.rows[idx], 0, 0, self._mapping)

    def gather(self, positions: torch.Tensor) -> torch.Tensor:
        """The uint8 images (n, C, H, W) at ``positions``, copied out of the mapping."""
        return torch.from_numpy(self.images[self.rows[np.asarray(positions, dtype=np.int64)]])

    def prefetch(self, positions: torch.Tensor) -> None:
        """Ask the kernel to read the rows of ``positions`` ahead (one range, their lowest to their highest row)."""
        if self._mapping is None or not hasattr(self._mapping, "madvise") or len(positions) == 0:
            return
        rows = self.rows[np.asarray(positions, dtype=np.int64)]
        lo, hi = int(rows.min()), int(rows.max()) + 1
        if self._advised[0] <= lo and hi <= self._advised[1]:
            return
        row_bytes = int(np.prod(self.shape))
        start = (HEADER_BYTES + lo * row_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
        end = HEADER_BYTES + hi * row_bytes
        try:
            self._mapping.madvise(mmap.MADV_WILLNEED, start, end - start)
            self._advised = (lo, hi)
        except (OSError, ValueError):
            pass

    def block_rows(self) -> int:
        """Rows per shuffling block: :data:`BLOCK_BYTES` of the array, at least one row."""
        return max(1, BLOCK_BYTES // max(1, int(np.prod(self.shape))))

    def epoch_order(
        self, generator: torch.Generator | None, shard: tuple[int, int] = (0, 1), block: int | None = None
    ) -> torch.Tensor:
        """A shuffled epoch's positions for rank ``shard[0]`` of ``shard[1]``, read in contiguous blocks.

        The positions sorted by row (file order) are padded by wrapping around to a multiple of the
        world size, as :func:`kdcompress.data.TensorData.batches` pads, and cut into one contiguous
        stretch per rank: rank r reads only its stretch of the file. Within it, blocks of ``block``
        rows (:meth:`block_rows` by default) come in a random order, and their rows in a random order.
        """
        rank, world = shard
        by_row = torch.from_numpy(np.argsort(self.rows, kind="stable"))
        n = len(by_row)
        per = -(-n // world)
        padded = torch.cat([by_row, by_row[: per * world - n]]) if world > 1 else by_row
        mine = padded[rank * per : (rank + 1) * per]
        block = block or self.block_rows()
        block_of = torch.arange(len(mine)) // block
        place = torch.randperm(int(block_of[-1]) + 1 if len(mine) else 0, generator=generator)
        key = place[block_of].double() + torch.rand(len(mine), generator=generator, dtype=torch.float64)
        return mine[torch.argsort(key)]


def fingerprints(files: list[str], labels: list[int], root: Path) -> np.ndarray:
    """(N, 2) uint64 per file: a hash of its path relative to ``root``, and one of its size, mtime_ns and label.

    A file that cannot be examined is a :class:`DataError` naming it.
    """
    out = np.empty((len(files), 2), dtype=np.uint64)
    prefix = os.path.join(os.path.abspath(root), "")
    for i, (path, label) in enumerate(zip(files, labels)):
        try:
            st = os.stat(path)
        except OSError as exc:
            raise DataError(f"cannot read {path}: {describe(exc)}; check the folder and rerun") from None
        rel = (path[len(prefix) :] if path.startswith(prefix) else os.path.relpath(path, root)).encode(
            "utf-8", "surrogateescape"
        )
        out[i, 0] = int.from_bytes(hashlib.blake2b(rel, digest_size=8).digest(), "little")
        stamp = f"{st.st_size}:{st.st_mtime_ns}:{int(label)}".encode()
        out[i, 1] = int.from_bytes(hashlib.blake2b(stamp, digest_size=8).digest(), "little")
    return out


def _cache_key(stored: np.ndarray, settings: dict) -> str:
    digest = hashlib.sha256(json.dumps({"version": FORMAT_VERSION, "settings": settings}, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(stored).tobytes())
    return digest.hexdigest()


def _cache_path(cache_dir: Path, root: Path, settings: dict) -> Path:
    named = json.dumps({"root": str(Path(root).resolve()), "settings": settings}, sort_keys=True)
    return Path(cache_dir) / f"{Path(root).name[:40]}-{hashlib.sha256(named.encode()).hexdigest()[:20]}{CACHE_SUFFIX}"


def _read_header(path: Path) -> tuple[dict | None, str]:
    """The header of the cache file at ``path`` when it is sound (magic, JSON, sizes that add up to its length),
    else (None, why it is refused); (None, "") when there is no file."""
    try:
        with open(path, "rb") as fh:
            length = os.fstat(fh.fileno()).st_size
            head = fh.read(HEADER_BYTES)
    except FileNotFoundError:
        return None, ""
    except OSError as exc:
        return None, f"it cannot be read ({describe(exc)})"
    if len(head) < HEADER_BYTES or not head.startswith(MAGIC):
        return None, "it is not a kdc image cache"
    try:
        header = json.loads(head[len(MAGIC) :].rstrip(b"\0").decode("utf-8"))
        shape = [int(d) for d in header["shape"]]
        count, key = int(header["count"]), str(header["key"])
        version, dtype = header["version"], header["dtype"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None, "its header is damaged"
    if version != FORMAT_VERSION or dtype != "uint8" or len(shape) != 4 or min(shape) < 1 or shape[0] != count:
        return None, "its header describes another format"
    expected = HEADER_BYTES + int(np.prod(shape, dtype=np.int64)) + count * 16
    if length != expected:
        return None, f"it holds {length:,} bytes where its header needs {expected:,} (a damaged or cut-short file)"
    return {"shape": shape, "count": count, "key": key, "length": length}, ""


def _map(path: Path, header: dict) -> tuple[mmap.mmap, np.ndarray, np.ndarray]:
    """(mapping, images, stored fingerprints) of a cache file whose header was checked."""
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size != header["length"]:
            raise DataError(f"the image cache {path} changed while it was opened; rerun")
        mapping = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    shape = header["shape"]
    size = int(np.prod(shape, dtype=np.int64))
    images = np.frombuffer(mapping, dtype=np.uint8, count=size, offset=HEADER_BYTES).reshape(shape)
    stored = np.frombuffer(mapping, dtype=np.uint64, count=2 * shape[0], offset=HEADER_BYTES + size).reshape(-1, 2)
    return mapping, images, stored


def _changes(old: np.ndarray, new: np.ndarray) -> tuple[int, int, int]:
    """(added, removed, modified) files between two fingerprint tables."""
    before = dict(zip(old[:, 0].tolist(), old[:, 1].tolist()))
    after = dict(zip(new[:, 0].tolist(), new[:, 1].tolist()))
    added = sum(1 for p in after if p not in before)
    removed = sum(1 for p in before if p not in after)
    modified = sum(1 for p, c in after.items() if p in before and before[p] != c)
    return added, removed, modified


def open_cache(
    files: list[str],
    labels: list[int],
    decode: Callable[[str], np.ndarray],
    settings: dict,
    cache_dir: Path,
    workers: int,
    console: Console | None = None,
    *,
    root: Path | None = None,
    name: str = "",
) -> CachedImages:
    """The decoded images of ``files`` (with their ``labels``), from the cache in ``cache_dir`` or decoded now.

    ``decode(path)`` returns one image as uint8 (C, H, W); ``settings`` (JSON-able) are whatever changes
    what it returns. ``root`` (default: the files' common folder) names the cache file; ``name`` the
    folder in messages. Under torchrun the first process of each machine (local rank 0) makes the cache
    while the others wait for the file, without a collective; then all map it.
    """
    if not files:
        raise DataError(f"{name or 'the image folder'} has no image files")
    console = console or Console(stderr=True, quiet=not distributed.is_main())
    root = Path(root) if root is not None else Path(os.path.commonpath([os.path.dirname(f) for f in files]))
    name = name or str(root)
    fps = fingerprints(files, labels, root)
    order = np.argsort(fps[:, 0], kind="stable")  # storage row -> position
    rows = np.empty(len(files), dtype=np.int64)
    rows[order] = np.arange(len(files))
    key = _cache_key(fps[order], settings)
    path = _cache_path(cache_dir, root, settings)
    decoded = changed = 0
    if distributed.local_rank() == 0:
        header, why = _read_header(path)
        if header is None or header["key"] != key:
            changed = _say_why(console, path, header, why, fps, name)
            _build(path, [files[i] for i in order], fps[order], decode, settings, key, workers, console, name)
            decoded = len(files)
    else:  # no collective: a stage that only rank 0 runs (export) loads data too
        _wait_for(path, key)
    header, why = _read_header(path)
    if header is None or header["key"] != key:
        raise DataError(f"the image cache {path} for {name} cannot be used after it was made ({why or 'key'}); rerun")
    mapping, images, _ = _map(path, header)
    labels_t = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    return CachedImages(path, images, labels_t, rows, decoded, changed, mapping)


def _wait_for(path: Path, key: str, every: float = 0.2) -> None:
    """Wait until the cache file at ``path`` has ``key``: local rank 0 of this machine is making it.

    If that rank fails, torchrun ends this process too.
    """
    while True:
        header, _ = _read_header(path)
        if header is not None and header["key"] == key:
            return
        time.sleep(every)


def _say_why(console: Console, path: Path, header: dict | None, why: str, fps: np.ndarray, name: str) -> int:
    """Print why the folder is decoded (again); return how many files changed since the cache was made."""
    if header is not None:
        _, _, stored = _map(path, header)
        added, removed, modified = _changes(np.array(stored), fps)
        changed = added + removed + modified
        what = ", ".join(f"{k} {w}" for k, w in ((added, "added"), (removed, "removed"), (modified, "modified")) if k)
        said = f"{changed} file{'s' if changed != 1 else ''} changed since the cache was made ({what or 'settings'})"
        console.print(f"{name}: {said}; decoding again", markup=False, highlight=False)
        return changed
    if why:
        console.print(f"{name}: the image cache {path} is refused: {why}; decoding again", markup=False)
    return 0


def _decode_chunk(decode: Callable[[str], np.ndarray], paths: list[str], shape: tuple[int, ...]) -> np.ndarray:
    """The images of ``paths`` as one uint8 array (n, *shape); a file that fails or differs is a DataError."""
    out = np.empty((len(paths), *shape), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = _decode_one(decode, path, shape)
    return out


def _decode_one(decode: Callable[[str], np.ndarray], path: str, shape: tuple[int, ...] | None) -> np.ndarray:
    try:
        image = decode(path)
    except KdcError:
        raise
    except Exception as exc:  # PIL raises many types for damaged data
        raise DataError(f"cannot decode image {path}: {type(exc).__name__}: {describe(exc)}") from None
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise DataError(f"decoding {path} gave a {image.dtype} array of shape {image.shape}, not uint8 (C, H, W)")
    if shape is not None and image.shape != tuple(shape):
        raise DataError(
            f"{path} decodes to {_dims(image.shape)}, where the folder's first image decodes to {_dims(shape)}; "
            f"every image must have the same size and channels: resize them, or set data.image_size"
        )
    return image


def _dims(shape) -> str:
    c, h, w = shape
    return f"{c} channel(s) of {h}x{w}"


def _chunks(
    decode: Callable[[str], np.ndarray], paths: list[str], shape: tuple[int, ...], workers: int
) -> Iterator[np.ndarray]:
    """Decoded chunks of ``paths`` in order; ``workers`` > 0: that many processes, a few chunks ahead."""
    pieces = [paths[i : i + CHUNK] for i in range(0, len(paths), CHUNK)]
    if workers <= 0:
        for piece in pieces:
            yield _decode_chunk(decode, piece, shape)
        return
    methods = multiprocessing.get_all_start_methods()
    pool: Executor = ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("fork" if "fork" in methods else None)
    )
    try:
        pending: deque = deque()
        for piece in pieces:
            pending.append(pool.submit(_decode_chunk, decode, piece, shape))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _build(
    path: Path,
    paths: list[str],
    stored: np.ndarray,
    decode: Callable[[str], np.ndarray],
    settings: dict,
    key: str,
    workers: int,
    console: Console,
    name: str,
) -> None:
    """Decode ``paths`` (in storage order) into the cache file at ``path``, written whole or not at all."""
    first = _decode_one(decode, paths[0], None)
    shape = [len(paths), *first.shape]
    needed = HEADER_BYTES + int(np.prod(shape, dtype=np.int64)) + 16 * len(paths)
    _check_room(path.parent, needed, name)
    header = json.dumps(
        {"version": FORMAT_VERSION, "key": key, "shape": shape, "count": len(paths), "dtype": "uint8"}
        | {"settings": settings, "folder": name, "made": time.strftime("%Y-%m-%dT%H:%M:%S")}
    ).encode()
    if len(MAGIC) + len(header) > HEADER_BYTES:
        raise DataError(f"the settings of {name} are too long for the image cache's header: {settings}")
    with _DecodeProgress(console, name, len(paths), path, needed) as progress:

        def write(fh) -> None:
            fh.write(MAGIC + header + b"\0" * (HEADER_BYTES - len(MAGIC) - len(header)))
            fh.write(first.tobytes())
            progress.advance(1)
            for chunk in _chunks(decode, paths[1:], tuple(first.shape), workers):
                fh.write(chunk.tobytes())
                progress.advance(len(chunk))
            fh.write(np.ascontiguousarray(stored, dtype=np.uint64).tobytes())

        try:
            tmp = write_temp(path, write)
            os.replace(tmp, path)
        except OSError as exc:
            raise DataError(
                f"cannot write the image cache {path}: {describe(exc)}; free some space, or set $KDC_CACHE to "
                f"another folder"
            ) from None


def _check_room(folder: Path, needed: int, name: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        raise DataError(
            f"cannot use {folder} for the image cache: {describe(exc)}; set $KDC_CACHE to a writable folder"
        ) from None
    if free < needed:
        raise DataError(
            f"{name} decodes to {needed / 1e9:.2f} GB and {folder} has {free / 1e9:.2f} GB free; free some space, "
            f"or set $KDC_CACHE to a folder with room"
        )


class _DecodeProgress:
    """A bar with images/s on a terminal; elsewhere one line before and one after (nothing when quiet)."""

    def __init__(self, console: Console, name: str, total: int, path: Path, size: int):
        self.console, self.name, self.total, self.path, self.size = console, name, total, path, size
        self.done, self.started, self.bar, self.task = 0, time.perf_counter(), None, None

    def __enter__(self) -> "_DecodeProgress":
        self.console.print(
            f"{self.name}: decoding {self.total:,} images once into {self.path} ({self.size / 1e6:,.0f} MB); "
            f"later runs read them from there",
            markup=False,
            highlight=False,
        )
        if self.console.is_terminal and not self.console.quiet:
            columns = (TextColumn("decoding"), BarColumn(bar_width=16), MofNCompleteColumn())
            rate = (TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
            self.bar = Progress(*columns, *rate, console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("decoding", total=self.total, rate="")
        return self

    def rate(self) -> float:
        return self.done / max(1e-9, time.perf_counter() - self.started)

    def advance(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, rate=f"{self.rate():,.0f} images/s")

    def __exit__(self, kind, exc, tb) -> None:
        if self.bar is not None:
            self.bar.stop()
        if kind is None:
            seconds = time.perf_counter() - self.started
            self.console.print(
                f"{self.name}: decoded {self.done:,} images in {seconds:.1f} s ({self.rate():,.0f} images/s)",
                markup=False,
                highlight=False,
            )
