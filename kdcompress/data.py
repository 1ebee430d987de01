"""Datasets by name, data-root resolution and in-memory tensor batches.

The MNIST family fits in memory, so each split is held once as a uint8
tensor (N, C, H, W) with int64 labels; batches are sliced, converted to float
and normalised one batch at a time. That is far cheaper than decoding every
image through PIL and a per-sample transform.

Known datasets:

``fashion-mnist-mini``
    A fixed subset of real Fashion-MNIST shipped inside the package (made by
    ``scripts/make_fashion_mnist_mini.py``); works offline anywhere.
``fashion-mnist``, ``mnist``
    The full sets, read by torchvision from a data root: the recipe's
    ``data.root``, else ``$KDC_DATA``, else the user cache dir. For
    Fashion-MNIST, Debian's ``dataset-fashion-mnist`` package
    (``/usr/share/datasets/fashion-mnist/``) is used too.

Example::

    >>> from kdcompress.data import load_data
    >>> from kdcompress.recipe import DataSection
    >>> splits = load_data(DataSection(dataset="fashion-mnist-mini"), seed=0)
    >>> splits.train.images.shape, splits.num_classes
    (torch.Size([10000, 1, 28, 28]), 10)
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps
from rich.console import Console

from .errors import DataError, KdcError, describe
from .files import write_temp
from .imagecache import CachedImages, open_cache
from .names import (
    BAD_FILES_NAMED,
    class_folders,
    imagefolder_dirs,
    imagefolder_problem,
    import_factory,
    unknown_dataset,
)
from .recipe import DataSection

__all__ = [
    "TensorData",
    "DataSplits",
    "load_data",
    "DATASETS",
    "read_idx",
    "default_data_roots",
    "dataset_info",
    "Augment",
    "LoaderData",
    "MappedData",
    "image_cache_dir",
    "DEBIAN_FASHION_MNIST",
    "CLASS_NAMES",
    "preprocess_info",
    "dataset_summary",
    "batches_per_epoch",
    "IMAGE_EXTENSIONS",
    "image_format",
    "ImageFolderScan",
    "scan_imagefolder",
    "ImageSpec",
    "decode_image",
    "FolderPlan",
    "plan_imagefolder",
    "measure_stats",
    "GREY_MODES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "STATS_IMAGES",
    "IDX_FILES",
    "mini_dir",
    "unpack_gz",
]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# name -> (torchvision class name, per-channel mean, per-channel std, input shape, classes, training images);
# mean and std are statistics of the full training split; the size lets `kdc validate` plan the pruning
# schedule in batches without loading the data (a test checks it against the data)
DATASETS = {
    "fashion-mnist-mini": ("FashionMNIST", (0.2860,), (0.3530,), (1, 28, 28), 10, 10_000),
    "fashion-mnist": ("FashionMNIST", (0.2860,), (0.3530,), (1, 28, 28), 10, 60_000),
    "mnist": ("MNIST", (0.1307,), (0.3081,), (1, 28, 28), 10, 60_000),
}

# class names in label order, as torchvision's dataset classes list them; kept here so that the
# shipped set needs no torchvision import (tests check they still match)
CLASS_NAMES = {
    "FashionMNIST": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "MNIST": (
        "0 - zero",
        "1 - one",
        "2 - two",
        "3 - three",
        "4 - four",
        "5 - five",
        "6 - six",
        "7 - seven",
        "8 - eight",
        "9 - nine",
    ),
}

PREPROCESS_VERSION = 1


def preprocess_info(dataset: str, input_shape, classes=None, folder: "FolderPlan | None" = None) -> dict:
    """How raw images become a model's input for ``dataset``, as plain data for checkpoints.

    Built-in sets and ``imagefolder:PATH`` have a known transform: uint8
    images (0-255) scaled by 1/255, then ``(x - mean) / std`` per channel,
    fed as (N, C, H, W). A user's own dataset (``package.module:factory``)
    yields whatever its own transform makes, which kdc cannot know:
    ``known`` is False and scale, mean and std are None. ``classes`` (names in
    label order) defaults to the built-in set's names. The keys are listed in
    :mod:`kdcompress.checkpoint`. ``folder`` (an image folder's :class:`FolderPlan`, its statistics
    known) gives its mean and std, and adds ``normalize``, ``resize`` and ``channels_why``; without it an
    image folder gets the mean and std 0.5 that kdc used before it had those (older checkpoints).

    Example::

        >>> preprocess_info("mnist", (1, 28, 28))["mean"]
        [0.1307]
    """
    shape = [int(d) for d in input_shape]
    channels = shape[0] if shape else 0
    if dataset in DATASETS:
        tv_name, mean, std = DATASETS[dataset][:3]
        if classes is None:
            classes = CLASS_NAMES.get(tv_name)
        mean, std = list(mean), list(std)
    elif folder is not None:
        mean, std = list(folder.mean), list(folder.std)
    elif dataset.startswith("imagefolder:"):
        mean, std = (
            [0.5] * channels,
            [0.5] * channels,
        )  # checkpoints from before the folder plan: ToTensor + Normalize(0.5, 0.5)
    else:
        mean = std = None
    known = mean is not None
    extra = {}
    if folder is not None:
        extra = {"normalize": folder.normalize, "resize": folder.resize_record(), "channels_why": folder.channels_why}
    return {
        "version": PREPROCESS_VERSION,
        "dataset": dataset,
        "known": known,
        "input_shape": shape,
        "layout": "NCHW" if known else None,
        "channels": ({1: "L", 3: "RGB"}.get(channels) if known else None),
        "dtype": "uint8" if known else None,
        "scale": 1.0 / 255.0 if known else None,
        "mean": [float(m) for m in mean] if known else None,
        "std": [float(v) for v in std] if known else None,
        "classes": [str(c) for c in classes] if classes is not None else None,
        **extra,
    }


@dataclass
class TensorData:
    """One split held in memory: uint8 images (N, C, H, W) and int64 labels (N)."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> "TensorData":
        return TensorData(self.images.to(device), self.labels.to(device), self.mean, self.std)

    def subset(self, index: torch.Tensor) -> "TensorData":
        return TensorData(self.images[index], self.labels[index], self.mean, self.std)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> normalised float32 images: (x / 255 - mean) / std, as one scale and shift.

        Written as float(), mul_, add_: on CPU ``torch.addcmul`` with per-channel
        (1, C, 1, 1) operands was measured 2x (one channel) to 25x (three)
        slower than these three in-place passes.
        """
        scale, shift = self._affine(images.device)
        return images.float().mul_(scale).add_(shift)

    def _affine(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cached = getattr(self, "_affine_cache", None)
        if cached is None or cached[0].device != device:
            std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
            mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
            cached = (1.0 / (255.0 * std), -mean / std)
            self._affine_cache = cached
        return cached

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        shard: tuple[int, int] = (0, 1),
        augment: "Augment | None" = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(inputs, labels, indices)``; ``indices`` locate the samples in this split.

        ``shard=(rank, world)`` takes every world-th sample of the (shuffled)
        order, padded by wrapping around so every rank gets the same number of
        batches. ``augment`` is applied to each uint8 batch, drawing from ``generator``.
        """
        order = _epoch_order(len(self), shuffle, generator, shard).to(self.labels.device)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            images = self.images.index_select(0, idx)  # several times faster than images[idx] for uint8 rows
            if augment is not None:
                images = augment(images, generator, idx)
            yield self.normalise(images), self.labels.index_select(0, idx), idx

    def num_batches(self, batch_size: int, world: int = 1) -> int:
        return _num_batches(len(self), batch_size, world)


def _epoch_order(n: int, shuffle: bool, generator: torch.Generator | None, shard: tuple[int, int]) -> torch.Tensor:
    """Sample order for one epoch; with ``shard=(rank, world)`` this rank's share, padded by wrapping
    around so every rank gets the same number of batches."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    rank, world = shard
    if world > 1:
        padded = -(-n // world) * world
        order = torch.cat([order, order[: padded - n]])[rank::world]
    return order


def _num_batches(n: int, batch_size: int, world: int) -> int:
    per_rank = -(-n // world)
    return (per_rank + batch_size - 1) // batch_size


def _hold_out(train, section: DataSection, seed: int):
    """(train, validation) with ``section.val_split`` of the training data held out; validation is None at 0."""
    if section.val_split <= 0:
        return train, None
    n_val = _held_out(len(train), section)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.subset(order[n_val:]), train.subset(order[:n_val])


def _held_out(n: int, section: DataSection) -> int:
    """How many of ``n`` training samples ``section.val_split`` holds out for validation."""
    if section.val_split <= 0:
        return 0
    n_val = max(1, int(round(n * section.val_split)))
    if n_val >= n:
        raise DataError(f"data.val_split: {section.val_split} leaves no training data; use a smaller share")
    return n_val


@dataclass(frozen=True)
class Augment:
    """Random crop with zero padding and random horizontal flip, done on a whole uint8 batch.

    A view is three integers per image (:meth:`draw`): the vertical and horizontal offsets of the crop in the
    padded image and the flip; :meth:`apply` makes that view again, so a view drawn once (the teacher-view cache,
    :mod:`kdcompress.views`) is regenerated exactly for the student.
    """

    crop_padding: int = 0
    hflip: bool = False

    def __bool__(self) -> bool:
        return self.crop_padding > 0 or self.hflip

    def for_epoch(self, epoch: int) -> "Augment":
        """The augmentation of training epoch ``epoch``: the same random one every epoch."""
        return self

    def draw(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` random views as an (n, 3) int16 tensor of (vertical offset, horizontal offset, flip).

        Draws, in order: the vertical offsets, the horizontal offsets (both when ``crop_padding`` > 0) and
        the flips (when ``hflip``), one per image; what is not drawn is 0 (offset 0 with padding 0: no crop).
        """
        views = torch.zeros(n, 3, dtype=torch.int16)
        p = self.crop_padding
        if p > 0:
            views[:, 0] = torch.randint(0, 2 * p + 1, (n,), generator=generator)
            views[:, 1] = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        if self.hflip:
            views[:, 2] = torch.rand(n, generator=generator) < 0.5
        return views

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None, idx: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Crop and flip each image of the batch at random (``idx``, the images' positions, is not needed)."""
        if not self:
            return images
        return self.apply(images, self.draw(images.shape[0], generator))

    def apply(self, images: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """The batch seen through ``views`` (one row of :meth:`draw` per image), as one gather from the padded
        batch (about 4x faster than indexing rows and columns for 128x3x32x32; ``scripts/bench_augment.py``)."""
        if not self:
            return images
        n, c, h, w = images.shape
        device = images.device
        views = views.to(device=device, dtype=torch.long)
        p = self.crop_padding
        flip = views[:, 2:3].bool()
        if p == 0:  # flip alone: a select between the batch and its mirror is faster than a gather
            return torch.where(flip[:, :, None, None], images.flip(-1), images)
        images = torch.nn.functional.pad(images, (p, p, p, p))
        rows = torch.arange(h, device=device).expand(n, h) + views[:, 0:1]
        cols = torch.arange(w, device=device).expand(n, w)
        if self.hflip:
            cols = torch.where(flip, (w - 1) - cols, cols)
        index = rows[:, :, None] * (w + 2 * p) + (cols + views[:, 1:2])[:, None, :]  # (n, h, w) in the padded image
        return images.reshape(n, c, -1).gather(2, index.view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)


@dataclass
class DataSplits:
    """The splits of one dataset plus what models need to know about it."""

    name: str
    train: TensorData
    test: TensorData
    val: TensorData | None
    num_classes: int
    input_shape: tuple[int, ...]
    identity: str  # changes when the data or the split changes
    preprocess: dict | None = None  # preprocess_info(): how raw images become the model's input
    train_identity: str = ""  # the training split's alone: the same for every seed when no validation split is held out

    @property
    def eval_split(self) -> tuple[str, TensorData]:
        """The split used for per-epoch evaluation: validation if held out, else test (learning curve only)."""
        return ("val", self.val) if self.val is not None else ("test", self.test)


def read_idx(path: Path) -> torch.Tensor:
    """Read an idx file (optionally gzip-compressed) into a uint8 tensor."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            blob = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}; the file is damaged, fetch it again") from None
    if len(blob) < 4 or blob[0] != 0 or blob[1] != 0 or blob[2] != 0x08:
        raise DataError(f"{path} is not an idx file of unsigned bytes; fetch it again")
    ndim = blob[3]
    dims = [int.from_bytes(blob[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    count = 1
    for d in dims:
        count *= d
    if len(blob) - offset != count:
        raise DataError(f"{path} is truncated: expected {count} values, found {len(blob) - offset}; fetch it again")
    return torch.frombuffer(bytearray(blob[offset:]), dtype=torch.uint8).view(*dims)


def default_data_roots(section: DataSection) -> list[Path]:
    """Data roots in the order they are tried."""
    if section.root:
        return [Path(section.root).expanduser()]
    roots = []
    if os.environ.get("KDC_DATA"):
        roots.append(Path(os.environ["KDC_DATA"]).expanduser())
    roots.append(_cache_dir())
    return roots


def _cache_dir() -> Path:
    try:
        from platformdirs import user_cache_dir

        return Path(user_cache_dir("kdcompress")) / "data"
    except ImportError:  # platformdirs is a dependency; this is a fallback only
        return Path.home() / ".cache" / "kdcompress" / "data"


def image_cache_dir() -> Path:
    """Where image folders are decoded to (:mod:`kdcompress.imagecache`): ``$KDC_CACHE``, else the user cache dir.

    Beside the built-in datasets' default root, never inside a run directory: one folder's cache
    serves every run that reads it. Deleting it is safe; the next run decodes the folder again.
    """
    if os.environ.get("KDC_CACHE"):
        return Path(os.environ["KDC_CACHE"]).expanduser()
    return _cache_dir().parent / "images"


def _is_external(name: str) -> bool:
    """``imagefolder:PATH`` or ``package.module:factory``: read through a DataLoader."""
    return ":" in name


def dataset_info(section: DataSection | str) -> tuple[tuple[int, ...], int]:
    """(input shape, number of classes) of a dataset; built-in ones are not loaded for this."""
    return dataset_summary(section)[:2]


def dataset_summary(section: DataSection | str, plan: "FolderPlan | None" = None) -> tuple[tuple[int, ...], int, int]:
    """(input shape, number of classes, training samples after ``val_split``) of a dataset, without loading it.

    Built-in sets answer from :data:`DATASETS`; ``imagefolder:PATH`` and your own
    datasets are built (not read through) to ask; an image folder's ``plan``
    (:func:`plan_imagefolder`) is made here when not given. The training size is what one
    process trains on per epoch, so ``ceil(size / batch_size)`` is the batches per
    epoch that :func:`kdcompress.prune.plan_schedule` plans with.

    Example::

        >>> dataset_summary(DataSection(dataset="fashion-mnist-mini", val_split=0.1))
        ((1, 28, 28), 10, 9000)
    """
    if isinstance(section, str):
        section = DataSection(dataset=section)
    name = section.dataset
    if name.startswith("imagefolder:"):
        plan = plan or plan_imagefolder(section)
        size = len(plan.scan.samples["train"])
        return plan.spec.shape, len(plan.scan.classes), size - _held_out(size, section)
    if _is_external(name):
        train, _, num_classes = _external_datasets(section)
        return tuple(train[0][0].shape), num_classes, len(train) - _held_out(len(train), section)
    if name not in DATASETS:
        raise DataError(f"data.dataset: {unknown_dataset(name)}")
    size = DATASETS[name][5]
    return DATASETS[name][3], DATASETS[name][4], size - _held_out(size, section)


def batches_per_epoch(train_size: int, batch_size: int, world: int = 1) -> int:
    """Training batches per epoch for one process, as :func:`kdcompress.train.fit` counts them."""
    return _num_batches(train_size, max(1, batch_size // world), world)


# the file endings torchvision's ImageFolder reads (torchvision.datasets.folder.IMG_EXTENSIONS)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# the first bytes of each image format PIL reads from those files; PIL goes by the bytes, not the ending
IMAGE_SIGNATURES = (
    ("PNG", b"\x89PNG\r\n\x1a\n"),
    ("JPEG", b"\xff\xd8\xff"),
    ("BMP", b"BM"),
    ("GIF", b"GIF87a"),
    ("GIF", b"GIF89a"),
    ("TIFF", b"II*\x00"),
    ("TIFF", b"MM\x00*"),
    ("TIFF", b"II+\x00"),
    ("TIFF", b"MM\x00+"),
    *((f"Netpbm P{k}", f"P{k}".encode()) for k in range(1, 7)),
)


def image_format(head: bytes) -> str | None:
    """The image format whose signature ``head`` (a file's first 16 bytes) starts with, or None.

    >>> image_format(b"\\x89PNG\\r\\n\\x1a\\n" + bytes(8)), image_format(b"hello")
    ('PNG', None)
    """
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((fmt for fmt, magic in IMAGE_SIGNATURES if head.startswith(magic)), None)


@dataclass(frozen=True)
class ImageFolderScan:
    """What :func:`scan_imagefolder` found in ``imagefolder:PATH``.

    ``classes``: train's class folder names in label order (sorted); ``folders``: the folder read
    for each split (``"train"``, ``"test"``: ``test/`` or else ``val/``); ``samples``: per split,
    every image file (its path as a string, as torchvision keeps them: a million ``Path`` objects
    cost several times the memory) with its label, in torchvision's ImageFolder order.
    """

    root: Path
    classes: tuple[str, ...]
    folders: dict[str, Path]
    samples: dict[str, list[tuple[str, int]]]


def scan_imagefolder(name: str) -> ImageFolderScan:
    """List every image file of ``imagefolder:PATH`` per split with its class and check each one's header.

    Raises one :class:`DataError` for folders that cannot be used (see
    :func:`imagefolder_problem`), a class folder without image files, or files that
    are empty or do not start like an image, naming every such file. Reads the first
    16 bytes of each file, not the image: a 60,000-file folder takes well under a
    second with a warm cache. A file with a sound header whose data is damaged is
    found when it is decoded (:func:`decode_image`).
    """
    problem = imagefolder_problem(name)
    if problem:
        raise DataError(f"data.dataset: {problem}")
    train_dir, test_dir = imagefolder_dirs(name)[0]
    folders = {"train": train_dir, "test": test_dir}
    classes = tuple(class_folders(train_dir))
    samples: dict[str, list[tuple[str, int]]] = {}
    bad: list[str] = []
    empty_classes: list[Path] = []

    def unlisted(exc: OSError) -> None:  # os.walk skips a folder it cannot list unless told
        bad.append(f"{exc.filename}: cannot be listed ({describe(exc)})")

    for split, folder in folders.items():
        found = []
        for label, cls in enumerate(classes):
            start = len(found)
            for parent, _, files in sorted(os.walk(folder / cls, onerror=unlisted, followlinks=True)):
                for file in sorted(files):
                    if file.lower().endswith(IMAGE_EXTENSIONS):
                        path = os.path.join(parent, file)
                        why = _image_problem(path)
                        if why:
                            bad.append(f"{path}: {why}")
                        found.append((path, label))
            if len(found) == start:
                empty_classes.append(folder / cls)
        samples[split] = found
    if empty_classes:
        raise DataError(
            f"data.dataset: {name}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in "
            f"{', '.join(str(f) for f in empty_classes[:BAD_FILES_NAMED])}"
            + (f" and {len(empty_classes) - BAD_FILES_NAMED} more" if len(empty_classes) > BAD_FILES_NAMED else "")
            + "; put the class's images there, or remove its folder from every split"
        )
    if bad:
        shown = "; ".join(bad[:BAD_FILES_NAMED])
        more = f"; and {len(bad) - BAD_FILES_NAMED} more" if len(bad) > BAD_FILES_NAMED else ""
        raise DataError(
            f"data.dataset: {name}: {len(bad)} image file{'s' if len(bad) != 1 else ''} cannot be used: {shown}{more}. "
            f"Delete or replace {'them' if len(bad) != 1 else 'it'}"
        )
    return ImageFolderScan(train_dir.parent, classes, folders, samples)


def _image_problem(path: str) -> str | None:
    """What is wrong with the file at ``path`` as an image, judged by its first bytes; None when it starts like one."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        return f"cannot be read ({describe(exc)})"
    if not head:
        return "empty (0 bytes)"
    return None if image_format(head) else f"not an image (it starts with {head[:8]!r})"


# PIL modes whose pixels are one grey value (with alpha, for LA): a folder of only these gets 1 channel
GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STATS_IMAGES = 10_000  # data.normalize: measured reads at most this many training images (a seeded sample)
RESIZE_WORDS = {
    "resize": "stretched to it (bilinear)",
    "center-crop": "scaled to cover it, then the middle cut out",
    "pad": "scaled to fit inside it, then padded with black",
}


@dataclass(frozen=True)
class ImageSpec:
    """How one image file becomes one model input: ``channels`` (1: grey, PIL's L; 3: RGB), ``size``
    (height, width) and ``resize``, how an image of another size is brought to it (``resize``,
    ``center-crop`` or ``pad``; an image already that size is left as it is).

    >>> ImageSpec(1, (28, 28)).shape
    (1, 28, 28)
    """

    channels: int
    size: tuple[int, int]
    resize: str = "resize"

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.size)


def decode_image(path: str, spec: ImageSpec) -> np.ndarray:
    """The image file at ``path`` as ``spec`` makes it: a uint8 array (C, H, W), values 0-255.

    Colour becomes grey with PIL's L conversion (0.299 R + 0.587 G + 0.114 B) and grey becomes RGB by
    repeating it; alpha is dropped. A file that cannot be decoded is a :class:`DataError` naming it.

    >>> decode_image("cat.png", ImageSpec(3, (64, 64), "center-crop")).shape  # doctest: +SKIP
    (3, 64, 64)
    """
    try:
        with open(path, "rb") as fh:
            image = Image.open(fh)
            image = image.convert("L" if spec.channels == 1 else "RGB")
            image = _fit(image, spec)
            array = np.array(image, dtype=np.uint8)  # a writable copy (np.asarray of a PIL image is read-only)
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...) for damaged data
        raise DataError(
            f"cannot decode image {path}: {type(exc).__name__}: {describe(exc)}; it starts like an image but its "
            f"data is damaged: delete or replace it"
        ) from None
    return np.ascontiguousarray(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))


def _fit(image: Image.Image, spec: ImageSpec) -> Image.Image:
    """``image`` brought to ``spec.size`` by ``spec.resize`` (PIL's own resize, ImageOps.fit and ImageOps.pad)."""
    h, w = spec.size
    if image.size == (w, h):
        return image
    if spec.resize == "center-crop":
        return ImageOps.fit(image, (w, h), Image.BILINEAR)
    if spec.resize == "pad":
        return ImageOps.pad(image, (w, h), Image.BILINEAR, color=0)
    return image.resize((w, h), Image.BILINEAR)


@dataclass(frozen=True)
class FolderPlan:
    """What kdc will do with the images of ``imagefolder:PATH``: the decisions :func:`plan_imagefolder`
    made from the recipe and the files' headers, and why.

    ``spec`` decodes every image; ``sizes`` maps each (height, width) found to its first file and count;
    ``modes`` counts the files' PIL modes; ``normalize`` is ``measured``, ``imagenet``, ``none`` or
    ``given``; ``mean``/``std`` are None until measured (:meth:`with_stats`).
    """

    scan: ImageFolderScan
    spec: ImageSpec
    channels_why: str
    sizes: dict
    modes: dict
    image_size_set: bool
    normalize: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    stats_images: int = 0

    def with_stats(self, mean, std, images: int) -> "FolderPlan":
        return dataclasses.replace(self, mean=tuple(mean), std=tuple(std), stats_images=images)

    def resize_record(self) -> dict | None:
        """The resize as a checkpoint records it: ``{"size": [H, W], "method": ...}``, None when not set."""
        return {"size": list(self.spec.size), "method": self.spec.resize} if self.image_size_set else None

    def resize_words(self) -> str:
        h, w = self.spec.size
        if not self.image_size_set:
            return f"none: every image is {h}x{w} (height x width)"
        other = sum(n for size, (_, n) in self.sizes.items() if size != (h, w))
        total = sum(n for _, n in self.sizes.values())
        return (
            f"to {h}x{w} (data.image_size), data.resize {self.spec.resize}: an image of another size is "
            f"{RESIZE_WORDS[self.spec.resize]}; {other:,} of {total:,} images are another size"
        )

    def normalize_words(self) -> str:
        if self.mean is None:
            return (
                f"measured from the training split when the data is loaded (per-channel mean and std of at most "
                f"{STATS_IMAGES:,} images, a seeded sample), recorded in every checkpoint"
            )
        source = {
            "measured": f"measured from {self.stats_images:,} training images",
            "imagenet": "imagenet",
            "none": "none (x / 255 only)",
            "given": "data.normalize",
        }[self.normalize]
        return f"{source}: mean {_rounded(self.mean)}, std {_rounded(self.std)}"

    def lines(self, val_split: float = 0.0) -> list[str]:
        """What ``kdc validate`` prints about the folder: classes, images per class per split, input shape,
        channels and why, resize and normalisation, and a warning on heavy class imbalance."""
        c, h, w = self.spec.shape
        out = [f"classes ({len(self.scan.classes)}): {_names_list(self.scan.classes)}"]
        out += _count_lines(self.scan, val_split)
        out += [
            f"input: {c}x{h}x{w} (channels x height x width), what the models are built for",
            f"channels: {c} ({self.channels_why})",
            f"resize: {self.resize_words()}",
            f"normalisation: {self.normalize_words()}",
        ]
        return out + _imbalance_warnings(self.scan)


def _rounded(values) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def _names_list(names, limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


CLASS_LINES = 20  # kdc validate lists the images of this many classes, then counts the rest


def _class_counts(scan: ImageFolderScan, split: str) -> list[int]:
    counts = [0] * len(scan.classes)
    for _, label in scan.samples[split]:
        counts[label] += 1
    return counts


def _count_lines(scan: ImageFolderScan, val_split: float) -> list[str]:
    """Images per class per split, one line per class (``CLASS_LINES`` at most)."""
    train, test = _class_counts(scan, "train"), _class_counts(scan, "test")
    width = max(len(c) for c in scan.classes[:CLASS_LINES])
    held = f", {val_split:.0%} of it held out at random for validation (data.val_split)" if val_split > 0 else ""
    out = [
        f"images: {sum(train):,} in {scan.folders['train']}{held}; {sum(test):,} in {scan.folders['test']}",
        f"  {'class'.ljust(width)}  {'train':>7}  {scan.folders['test'].name:>7}",
    ]
    for name, a, b in list(zip(scan.classes, train, test))[:CLASS_LINES]:
        out.append(f"  {name.ljust(width)}  {a:>7,}  {b:>7,}")
    if len(scan.classes) > CLASS_LINES:
        out.append(f"  ... and {len(scan.classes) - CLASS_LINES} more classes")
    return out


IMBALANCE = 10  # a split whose largest class has over this many times the smallest one's images is warned about


def _imbalance_warnings(scan: ImageFolderScan) -> list[str]:
    out = []
    for split in ("train", "test"):
        counts = _class_counts(scan, split)
        big, small = max(range(len(counts)), key=counts.__getitem__), min(range(len(counts)), key=counts.__getitem__)
        if counts[big] > IMBALANCE * counts[small]:
            out.append(
                f"warning: {scan.folders[split]} is heavily imbalanced: its largest class, {scan.classes[big]!r}, "
                f"has {counts[big]:,} images, {counts[big] / counts[small]:.0f}x its smallest, "
                f"{scan.classes[small]!r} ({counts[small]:,}); accuracy then mostly measures the large classes: "
                f"read the per-class accuracy in the report, or even the classes out"
            )
    return out


def _image_headers(samples: list[tuple[str, int]]) -> tuple[Counter, dict]:
    """(count of each PIL mode, {(height, width): (first file, count)}) of ``samples``, from each file's header."""
    modes: Counter = Counter()
    sizes: dict = {}
    first_mode: dict = {}
    bad = []
    for path, _ in samples:
        try:
            with Image.open(path) as image:
                mode, (w, h) = image.mode, image.size
        except Exception as exc:  # PIL raises many types for a header it cannot read
            bad.append(f"{path}: {type(exc).__name__}: {describe(exc)}")
            continue
        modes[mode] += 1
        first_mode.setdefault(mode, path)
        file, count = sizes.get((h, w), (path, 0))
        sizes[(h, w)] = (file, count + 1)
    if bad:
        more = f"; and {len(bad) - BAD_FILES_NAMED} more" if len(bad) > BAD_FILES_NAMED else ""
        raise DataError(
            f"{len(bad)} image file{'s' if len(bad) != 1 else ''} cannot be read as images: "
            f"{'; '.join(bad[:BAD_FILES_NAMED])}{more}. Delete or replace {'them' if len(bad) != 1 else 'it'}"
        )
    return modes, {"sizes": sizes, "first_mode": first_mode}


def plan_imagefolder(section: DataSection) -> FolderPlan:
    """Decide channels, size and normalisation for ``section.dataset`` (``imagefolder:PATH``) from the
    recipe's ``data`` keys and every file's header (mode and size; no pixel is decoded).

    Raises a :class:`DataError` for images of mixed sizes without ``data.image_size`` (naming two sizes
    and a file of each), for ``imagenet`` or a ``{mean, std}`` that does not fit the channels, and for
    anything :func:`scan_imagefolder` refuses. ``mean``/``std`` stay None for ``measured``
    (:func:`measure_stats` fills them in).
    """
    name = section.dataset
    scan = scan_imagefolder(name)
    try:
        modes, found = _image_headers(scan.samples["train"] + scan.samples["test"])
    except DataError as exc:
        raise DataError(f"data.dataset: {name}: {exc}") from None
    channels, why = _channels(section.channels, modes, found["first_mode"])
    sizes = found["sizes"]
    if section.image_size:
        size = (int(section.image_size[0]), int(section.image_size[1]))
    elif len(sizes) > 1:
        (a, (file_a, n_a)), (b, (file_b, n_b)) = list(sizes.items())[:2]
        others = f" (and {len(sizes) - 2} more sizes)" if len(sizes) > 2 else ""
        raise DataError(
            f"data.dataset: {name}: its images have different sizes (height x width): {a[0]}x{a[1]} ({n_a:,} "
            f"images, e.g. {file_a}) and {b[0]}x{b[1]} ({n_b:,}, e.g. {file_b}){others}. Set data.image_size: "
            f"[height, width] to bring every image to one size (data.resize: resize, center-crop or pad says how)"
        )
    else:
        size = next(iter(sizes))
    spec = ImageSpec(channels, size, section.resize)
    plan = FolderPlan(scan, spec, why, sizes, dict(modes), bool(section.image_size), "measured")
    return _with_normalize(plan, section.normalize, name)


def _channels(asked, modes: Counter, first_mode: dict) -> tuple[int, str]:
    """(channels, why) for ``data.channels`` ``asked`` and the files' PIL ``modes``."""
    colour = {m: n for m, n in modes.items() if m not in GREY_MODES}
    total = sum(modes.values())
    listed = ", ".join(sorted(modes))
    if asked == "auto":
        if not colour:
            return 1, f"auto: every image is grey, PIL mode {listed}"
        mode, n = max(colour.items(), key=lambda item: item[1])
        return 3, (
            f"auto: {sum(colour.values()):,} of {total:,} images are not grey (e.g. {n:,} of PIL mode {mode}, such "
            f"as {first_mode[mode]}); kdc goes by each file's mode, not its pixels, so a grey picture saved as RGB "
            f"counts as colour: set data.channels: 1 to read them all as grey"
        )
    if asked == 1:
        return 1, "data.channels: 1" + (
            "; colour images become grey (PIL's L: 0.299 R + 0.587 G + 0.114 B)" if colour else ""
        )
    return 3, "data.channels: 3" + ("; grey images are repeated over R, G and B" if len(colour) < len(modes) else "")


def _with_normalize(plan: FolderPlan, normalize, name: str) -> FolderPlan:
    """``plan`` with the mean and std ``data.normalize`` gives, when known without reading pixels."""
    c = plan.spec.channels
    if normalize == "measured":
        return plan
    if normalize == "none":
        return dataclasses.replace(plan, normalize="none", mean=(0.0,) * c, std=(1.0,) * c)
    if normalize == "imagenet":
        if c != 3:
            raise DataError(
                f"data.normalize: imagenet holds statistics of 3 channels (RGB), but the models of {name} get "
                f"{c} ({plan.channels_why}); set data.channels: 3, or data.normalize: measured"
            )
        return dataclasses.replace(plan, normalize="imagenet", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    mean, std = tuple(float(v) for v in normalize["mean"]), tuple(float(v) for v in normalize["std"])
    if len(mean) != c:
        raise DataError(
            f"data.normalize: gives {len(mean)} mean and std value(s), but the models of {name} get {c} "
            f"channel(s) ({plan.channels_why}); give one value per channel"
        )
    return dataclasses.replace(plan, normalize="given", mean=mean, std=std)


_STATS_CACHE: dict = {}  # (spec, the files read with their sizes and times) -> (mean, std): for this process only


def measure_stats(
    samples: list[tuple[str, int]],
    spec: ImageSpec,
    limit: int = STATS_IMAGES,
    seed: int = 0,
    read: Callable[[int], np.ndarray] | None = None,
):
    """Per-channel ``(mean, std, images read)`` of the images of ``samples`` decoded by ``spec``, in 0-1 units.

    Reads all of them, or a seeded sample of ``limit`` when there are more; memory stays one image plus
    two sums per channel. std is the population std (numpy's default); a channel with none (one flat
    value) gets std 1. Remembered for the rest of the process, keyed by the files read (with their sizes
    and modification times) and ``spec``. ``read(i)``: the i-th sample as :func:`decode_image` gives it,
    from where it is already decoded (the image cache); by default each file is decoded.

    >>> mean, std, n = measure_stats(scan.samples["train"], ImageSpec(1, (28, 28)))  # doctest: +SKIP
    """
    chosen = range(len(samples))
    if len(samples) > limit:
        chosen = sorted(torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))[:limit].tolist())
    paths = [samples[i][0] for i in chosen]
    key = hashlib.sha256(repr(spec).encode())
    for path in paths:
        st = os.stat(path)
        key.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    if key.digest() in _STATS_CACHE:
        return _STATS_CACHE[key.digest()]
    total = np.zeros(spec.channels, dtype=np.float64)
    squares = np.zeros(spec.channels, dtype=np.float64)
    read = read or (lambda i: decode_image(samples[i][0], spec))
    for i in chosen:
        pixels = read(i).reshape(spec.channels, -1).astype(np.float64)
        total += pixels.sum(axis=1)
        squares += np.square(pixels).sum(axis=1)
    count = max(1, len(paths)) * spec.size[0] * spec.size[1]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    std = np.where(std > 1e-6, std, 255.0)
    result = (tuple(float(v) for v in mean / 255.0), tuple(float(v) for v in std / 255.0), len(paths))
    _STATS_CACHE[key.digest()] = result
    return result


def load_data(section: DataSection, seed: int = 0, console: Console | None = None) -> DataSplits:
    """Load the dataset a recipe names, with a validation split if it asks for one.

    ``console`` shows the decoding of an image folder the first time it is used (see :class:`MappedData`).
    """
    if section.dataset.startswith("imagefolder:"):
        return _load_imagefolder(section, seed, console)
    if _is_external(section.dataset):
        return _load_external(section, seed)
    dataset_info(section)
    mean, std = DATASETS[section.dataset][1:3]
    if section.dataset == "fashion-mnist-mini":
        train_x, train_y, test_x, test_y, source = _load_mini()
    else:
        train_x, train_y, test_x, test_y, source = _load_torchvision(section)
    train = TensorData(train_x.unsqueeze(1).contiguous(), train_y.long(), mean, std)
    test = TensorData(test_x.unsqueeze(1).contiguous(), test_y.long(), mean, std)
    train, val = _hold_out(train, section, seed)
    num_classes = int(max(train.labels.max(), test.labels.max()).item()) + 1
    digest = hashlib.sha256()
    for t in (train.labels, test.labels):
        digest.update(t.numpy().tobytes())
    digest.update(train.images[:: max(1, len(train) // 64)].numpy().tobytes())
    return DataSplits(
        name=section.dataset,
        train=train,
        test=test,
        val=val,
        num_classes=num_classes,
        input_shape=tuple(train.images.shape[1:]),
        **_identity(section, seed, len(train), len(test), digest.hexdigest()[:16]),
        preprocess=preprocess_info(section.dataset, train.images.shape[1:]),
    )


def _identity(section: DataSection, seed: int, n_train: int, n_test: int, made: str) -> dict[str, str]:
    """:attr:`DataSplits.identity` and :attr:`DataSplits.train_identity`, which leaves out the seed where it does
    not choose the training split (no validation split)."""
    whole = f"{section.dataset}:{n_train}:{n_test}:{section.val_split}:{seed}" + (f":{made}" if made else "")
    split_seed = seed if section.val_split > 0 else "-"
    return {"identity": whole, "train_identity": f"{section.dataset}:{n_train}:{section.val_split}:{split_seed}:{made}"}


class _Indexed(torch.utils.data.Dataset):
    """Yields (input, label, position in the split) so losses can look up per-sample targets."""

    def __init__(self, dataset, indices: torch.Tensor):
        self.dataset, self.indices = dataset, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, pos):
        try:
            x, y = self.dataset[int(self.indices[pos])]
        except DataError as exc:
            # a DataLoader worker hands exceptions back as a type and a traceback in the message: carry the
            # message as data instead, so the main process raises it as it reads
            return _Unreadable(str(exc))
        return x, int(y), pos


@dataclass(frozen=True)
class _Unreadable:
    """A sample that could not be read, as a worker returns it: the DataError's message."""

    message: str


def _collate(items: list):
    """DataLoader's default collation, unless a sample could not be read: then that sample's :class:`_Unreadable`."""
    bad = next((item for item in items if isinstance(item, _Unreadable)), None)
    return bad if bad is not None else torch.utils.data.default_collate(items)


class LoaderData:
    """A split read through a DataLoader (workers, pinned memory): for datasets that don't fit in RAM.

    Same interface as :class:`TensorData`: ``batches`` yields ``(inputs, labels, indices)``. With
    ``stats=(mean, std)`` the dataset yields uint8 images, augmented as uint8 batches and then normalised
    as :meth:`TensorData.normalise` does (an image folder); without, its items are used as they are.
    """

    def __init__(self, dataset, workers: int = 2, indices: torch.Tensor | None = None, stats=None):
        self.dataset, self.workers, self.stats = dataset, workers, stats
        empty = torch.empty(0, dtype=torch.uint8)
        self.normaliser = TensorData(empty, empty, *stats) if stats is not None else None  # its normalise() only
        self.indices = torch.arange(len(dataset)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, index: torch.Tensor) -> "LoaderData":
        return LoaderData(self.dataset, self.workers, self.indices[index], self.stats)

    def num_batches(self, batch_size: int, world: int = 1) -> int:
        return _num_batches(len(self), batch_size, world)

    def batches(self, batch_size, shuffle=False, generator=None, shard=(0, 1), augment=None):
        order = _epoch_order(len(self), shuffle, generator, shard)
        plan = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
        loader = torch.utils.data.DataLoader(
            _Indexed(self.dataset, self.indices),
            batch_sampler=plan,
            num_workers=self.workers,
            pin_memory=torch.cuda.is_available(),
            collate_fn=_collate,
        )
        try:
            for batch in loader:
                if isinstance(batch, _Unreadable):
                    raise DataError(batch.message)
                x, y, idx = batch
                if augment is not None:
                    x = augment(x, generator, idx)
                if self.normaliser is not None:
                    x = self.normaliser.normalise(x)
                yield x, y.long(), idx
        except RuntimeError as exc:
            raise DataError(
                f"reading a batch failed: {describe(exc)}; check that every sample has the same shape"
            ) from None


class MappedData:
    """A split read from an image folder's cache (:mod:`kdcompress.imagecache`): the fast path of :class:`TensorData`
    on an array mapped from disk, so memory holds a batch, not the split.

    Same interface as :class:`TensorData`: ``batches`` yields ``(inputs, labels, indices)``, slicing
    uint8 rows, augmenting and normalising a whole batch at a time. A shuffled epoch reads the array
    in large contiguous blocks (:meth:`CachedImages.epoch_order`), each rank of a torchrun job its own
    stretch of it; an unshuffled one goes in position order, as :class:`TensorData` does.
    """

    PREFETCH_BATCHES = 4  # how far ahead the kernel is asked to read

    def __init__(self, cache: CachedImages, mean: tuple[float, ...], std: tuple[float, ...]):
        self.cache, self.labels, self.mean, self.std = cache, cache.labels, tuple(mean), tuple(std)

    normalise = TensorData.normalise
    _affine = TensorData._affine

    def __len__(self) -> int:
        return len(self.cache)

    def subset(self, index: torch.Tensor) -> "MappedData":
        return MappedData(self.cache.subset(index), self.mean, self.std)

    def num_batches(self, batch_size: int, world: int = 1) -> int:
        return _num_batches(len(self), batch_size, world)

    def batches(self, batch_size, shuffle=False, generator=None, shard=(0, 1), augment=None):
        if shuffle:
            order = self.cache.epoch_order(generator, shard)
        else:
            order = _epoch_order(len(self), False, generator, shard)
        ahead = batch_size * self.PREFETCH_BATCHES
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            self.cache.prefetch(order[start + ahead : start + ahead + batch_size])
            images = self.cache.gather(idx)
            if augment is not None:
                images = augment(images, generator, idx)
            yield self.normalise(images), self.labels.index_select(0, idx), idx


def _external_datasets(section: DataSection):
    """(train dataset, test dataset, number of classes) for a package.module:factory dataset."""
    name = section.dataset
    try:
        factory = import_factory(name, "data.dataset", ("imagefolder",))
        made = factory(root=section.root) if section.root else factory()
    except KdcError as exc:
        raise DataError(str(exc)) from None
    except Exception as exc:
        raise DataError(f"data.dataset: {name} failed: {type(exc).__name__}: {exc}") from None
    if isinstance(made, dict) and "train" in made and "test" in made:
        train, test, num_classes = made["train"], made["test"], made.get("num_classes")
    elif isinstance(made, (tuple, list)) and len(made) in (2, 3):
        train, test, num_classes = made[0], made[1], made[2] if len(made) == 3 else None
    else:
        raise DataError(
            f"data.dataset: {name} must return {{'train': dataset, 'test': dataset, 'num_classes': int}} or "
            f"(train, test[, num_classes]); got {type(made).__name__}"
        )
    if num_classes is None:
        num_classes = len(getattr(train, "classes", [])) or None
    if not num_classes:
        raise DataError(f"data.dataset: {name} must say how many classes it has (return 'num_classes')")
    return train, test, int(num_classes)


def _load_imagefolder(section: DataSection, seed: int, console: Console | None) -> DataSplits:
    """``imagefolder:PATH`` as its :class:`FolderPlan` says, through its cache: each split decoded once by
    :func:`decode_image` into a memory-mapped uint8 array (:func:`kdcompress.imagecache.open_cache`), then sliced
    like the built-in sets and normalised per batch with the plan's statistics (measured from the training split
    once per process by default)."""
    plan = plan_imagefolder(section)
    settings = {"decoder": "decode_image", "spec": dataclasses.asdict(plan.spec)}  # what changes the decoded bytes
    decode = functools.partial(decode_image, spec=plan.spec)
    caches = {}
    for split in ("train", "test"):
        # both splits carry train's class numbers: a split numbered from its own folders shifts labels
        samples = plan.scan.samples[split]
        caches[split] = open_cache(
            [path for path, _ in samples],
            [label for _, label in samples],
            decode,
            settings,
            image_cache_dir(),
            section.workers,
            console,
            root=plan.scan.folders[split],
            name=f"{section.dataset} ({split})",
        )
    if plan.mean is None:  # from the cache's rows: the images are not decoded a second time
        train = caches["train"]
        plan = plan.with_stats(
            *measure_stats(plan.scan.samples["train"], plan.spec, read=lambda i: train.images[train.rows[i]])
        )
    parts = {split: MappedData(cache, plan.mean, plan.std) for split, cache in caches.items()}
    train, val = _hold_out(parts["train"], section, seed)
    made = hashlib.sha256(repr((plan.spec, plan.mean, plan.std)).encode()).hexdigest()[:16]
    return DataSplits(
        name=section.dataset,
        train=train,
        test=parts["test"],
        val=val,
        num_classes=len(plan.scan.classes),
        input_shape=plan.spec.shape,
        **_identity(section, seed, len(train), len(parts["test"]), made),
        preprocess=preprocess_info(section.dataset, plan.spec.shape, plan.scan.classes, folder=plan),
    )


def _load_external(section: DataSection, seed: int) -> DataSplits:
    train_ds, test_ds, num_classes = _external_datasets(section)
    train, test = LoaderData(train_ds, section.workers), LoaderData(test_ds, section.workers)
    train, val = _hold_out(train, section, seed)
    input_shape = tuple(train_ds[0][0].shape)
    return DataSplits(
        name=section.dataset,
        train=train,
        test=test,
        val=val,
        num_classes=num_classes,
        input_shape=input_shape,
        **_identity(section, seed, len(train), len(test), ""),
        preprocess=preprocess_info(section.dataset, input_shape, _class_names(train_ds, num_classes)),
    )


def _class_names(dataset, num_classes: int) -> list[str] | None:
    """A dataset's ``classes`` (names in label order) when it has one of the right length, else None."""
    classes = getattr(dataset, "classes", None)
    if isinstance(classes, (list, tuple)) and len(classes) == num_classes:
        return [str(c) for c in classes]
    return None


def mini_dir() -> Path:
    """The folder of the shipped fashion-mnist-mini set (its four idx files, gzipped) inside the package."""
    return Path(str(resources.files("kdcompress") / "embedded" / "fashion-mnist-mini"))


def _load_mini():
    folder = mini_dir()
    try:
        parts = [read_idx(folder / f"{name}.gz") for name in IDX_FILES]
    except DataError as exc:
        raise DataError(f"the shipped fashion-mnist-mini set is damaged ({exc}); reinstall kdcompress") from None
    return (*parts, str(folder))


def _load_torchvision(section: DataSection):
    from torchvision import datasets as tvd

    cls_name = DATASETS[section.dataset][0]
    cls = getattr(tvd, cls_name)
    roots = default_data_roots(section)
    tried = []
    for root in roots:
        tried.append(str(root / cls_name / "raw"))
        raw = root / cls_name / "raw"
        if not _has_raw(root, cls_name) and all((raw / f"{n}.gz").is_file() for n in IDX_FILES):
            unpack_gz(raw, raw)  # .gz files put there by hand
        if not _has_raw(root, cls_name) and section.dataset == "fashion-mnist" and _debian_available():
            unpack_gz(DEBIAN_FASHION_MNIST, raw)
            tried.append(f"{DEBIAN_FASHION_MNIST} (unpacked into {root / cls_name / 'raw'})")
        if _has_raw(root, cls_name):
            return (*_read_tv(cls, root), str(root))
    if section.dataset == "fashion-mnist" and not _debian_available():
        tried.append(str(DEBIAN_FASHION_MNIST))
    hint = (
        "install it with `apt-get install dataset-fashion-mnist` (Debian), or "
        if section.dataset == "fashion-mnist"
        else ""
    )
    raise DataError(
        f"dataset '{section.dataset}' not found; looked in: {'; '.join(tried)}. To get it, {hint}put the four idx "
        f"files ({', '.join(IDX_FILES)}, .gz allowed) in <root>/{cls_name}/raw/ and set data.root or $KDC_DATA to "
        f"<root>; with internet, python -c \"import torchvision; torchvision.datasets.{cls_name}('<root>', "
        f"download=True)\" fetches them. The shipped 'fashion-mnist-mini' needs no download."
    )


def _has_raw(root: Path, cls_name: str) -> bool:
    raw = root / cls_name / "raw"
    return all((raw / name).is_file() for name in IDX_FILES)


def _debian_available() -> bool:
    return all((DEBIAN_FASHION_MNIST / f"{name}.gz").is_file() for name in IDX_FILES)


def unpack_gz(source: Path, raw: Path) -> None:
    """Decompress idx .gz files from ``source`` into ``raw``, where torchvision looks for them.

    Debian's gzip bytes differ from the ones torchvision checksums, so they
    are decompressed here rather than handed to torchvision's downloader; the
    idx data inside is the standard set.
    """
    try:
        raw.mkdir(parents=True, exist_ok=True)
        for name in IDX_FILES:
            target = raw / name
            if target.is_file():
                continue
            with gzip.open(source / f"{name}.gz", "rb") as src:
                # write_temp gives the file a plain open()'s mode: a shared data root stays readable to the group
                tmp = write_temp(target, lambda out: shutil.copyfileobj(src, out))
            try:
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    except (OSError, EOFError) as exc:
        raise DataError(
            f"cannot unpack {source}/*.gz into {raw}: {describe(exc)}; check the files, or set data.root to a "
            f"writable folder"
        ) from None


def _read_tv(cls, root: Path):
    try:
        train = cls(str(root), train=True, download=False)
        test = cls(str(root), train=False, download=False)
    except Exception as exc:  # torchvision raises RuntimeError/ValueError/OSError for bad files
        raise DataError(
            f"cannot read the {cls.__name__} files under {root / cls.__name__ / 'raw'}: {exc}; delete them and fetch "
            f"them again"
        ) from None
    return train.data, train.targets, test.data, test.targets
