"""Teacher views: K augmented views of every training image, drawn once, with the teacher's logits on each.

Distillation with augmentation needs the teacher's output on the very view the student sees (Beyer et al.
2022, "a good teacher is patient and consistent"); running the teacher on every batch makes an epoch cost a
teacher forward pass too. FKD (Shen & Xing 2022) stores the teacher's outputs per view instead. Here a view is
what :class:`kdcompress.data.Augment` draws for one image (crop offsets and flip): :func:`draw_views` draws
K of them per image, :func:`teacher_view_logits` runs the teacher once per view, and :class:`ViewAugment`,
the training augmentation, shows image ``i`` in epoch ``e`` its view ``(start[i] + e) mod K``, so the loss
reads the teacher's logits for that view from the :class:`ViewTable` and the teacher never runs in training.
With K at least the number of epochs every epoch shows every image a view it has not seen before.

The table is stored whole: K full logit vectors per image, in float16 by default (float32 on request), so it
takes ``n * K * (classes * 2 + 6)`` bytes; :func:`table_bytes` says how much before anything is computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .data import Augment
from .recipe import Recipe

__all__ = [
    "augment_of",
    "teacher_path",
    "ViewTable",
    "ViewAugment",
    "draw_views",
    "teacher_view_logits",
    "table_bytes",
    "table_problem",
]

DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class ViewTable:
    """K views per training image and the teacher's logits on each.

    ``views``: (n, K, 3) int16, one :meth:`Augment.draw` row per view; ``start``: (n,) int64, the view each
    image shows in epoch 0; ``logits``: (n, K, classes), float16 or float32.
    """

    views: torch.Tensor
    start: torch.Tensor
    logits: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.views.shape[1])

    def which(self, idx: torch.Tensor, epoch: int) -> torch.Tensor:
        """The view number images ``idx`` (positions in the training split) show in ``epoch`` (0-based)."""
        return (self.start.index_select(0, idx.to(self.start.device)) + epoch) % self.k

    def targets(self, idx: torch.Tensor, epoch: int) -> torch.Tensor:
        """The teacher's logits (float32) for images ``idx`` as they are shown in ``epoch``."""
        idx = idx.to(self.logits.device)
        return self.logits[idx, self.which(idx, epoch).to(self.logits.device)].float()

    def to(self, device: torch.device) -> "ViewTable":
        return ViewTable(self.views, self.start, self.logits.to(device))


def draw_views(augment: Augment, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(views, start)`` for ``n`` images: K random views each, (n, K, 3) int16, and the view each starts from."""
    generator = torch.Generator().manual_seed(seed)
    views = torch.stack([augment.draw(n, generator) for _ in range(k)], dim=1)
    start = torch.randint(0, k, (n,), generator=generator)
    return views, start


class _FixedView:
    """An augmentation that shows every image its view number ``view`` of ``views``."""

    def __init__(self, augment: Augment, views: torch.Tensor):
        self.augment, self.views = augment, views

    def __call__(self, images, generator=None, idx=None):
        return self.augment.apply(images, self.views.index_select(0, idx.to(self.views.device)))


@torch.no_grad()
def teacher_view_logits(
    teacher: nn.Module, data, augment: Augment, views: torch.Tensor, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's logits (float32, on the CPU) for every image of ``data`` seen through its view in ``views``
    ((n, 3): one view per image), in eval mode, as :func:`kdcompress.distill.teacher_logits` does unaugmented;
    and the images' labels, in the same order (to say how often the teacher is right on the views)."""
    was_training = teacher.training
    teacher.eval()
    shown = _FixedView(augment, views)
    logits, labels = [], []
    for x, y, _ in data.batches(batch_size, augment=shown):
        logits.append(teacher(x.to(device)).float().cpu())
        labels.append(y.cpu())
    teacher.train(was_training)
    return torch.cat(logits), torch.cat(labels)


class ViewAugment:
    """The training augmentation that reads a :class:`ViewTable`: in epoch ``e`` image ``i`` is shown its
    view ``(start[i] + e) mod K``, made again by ``augment`` from the stored offsets and flip.

    :func:`kdcompress.train.fit` calls :meth:`for_epoch` as each epoch starts; :attr:`epoch` then tells the
    loss which view of each image the batch holds (:meth:`targets`).
    """

    def __init__(self, augment: Augment, table: ViewTable):
        self.augment, self.table = augment, table
        self.epoch = 0

    def __bool__(self) -> bool:
        return True

    def for_epoch(self, epoch: int) -> "ViewAugment":
        self.epoch = epoch
        return self

    def __call__(self, images, generator=None, idx=None):
        if idx is None:
            raise ValueError("ViewAugment needs the images' positions in the training split (idx)")
        idx = idx.to(self.table.views.device)
        views = self.table.views[idx, self.table.which(idx, self.epoch)]
        return self.augment.apply(images, views)

    def targets(self, idx: torch.Tensor) -> torch.Tensor:
        """The teacher's logits for the views of images ``idx`` in the current epoch."""
        return self.table.targets(idx, self.epoch)


def table_bytes(n: int, k: int, classes: int, dtype: str) -> int:
    """What a table of ``k`` views of ``n`` images takes in memory and on disk (roughly: tensors only)."""
    return n * k * (classes * DTYPES[dtype].itemsize + 3 * 2) + n * 8


def table_problem(table: object, n: int, k: int, classes: int, dtype: str, augment: Augment) -> str | None:
    """What is wrong with a loaded table (shapes, types, views ``augment`` could not have drawn), or None."""
    if not isinstance(table, ViewTable):
        return "not a view table"
    views, start, logits = table.views, table.start, table.logits
    if not all(isinstance(t, torch.Tensor) for t in (views, start, logits)):
        return "its entries are not tensors"
    if views.dtype != torch.int16 or tuple(views.shape) != (n, k, 3):
        return f"views are {views.dtype} {tuple(views.shape)}, expected int16 {(n, k, 3)}"
    if start.dtype != torch.int64 or tuple(start.shape) != (n,):
        return f"start is {start.dtype} {tuple(start.shape)}, expected int64 {(n,)}"
    if logits.dtype != DTYPES[dtype] or tuple(logits.shape) != (n, k, classes):
        return f"logits are {logits.dtype} {tuple(logits.shape)}, expected {DTYPES[dtype]} {(n, k, classes)}"
    span, flips = 2 * augment.crop_padding, int(augment.hflip)
    if n and (views[..., :2].min() < 0 or views[..., :2].max() > span):
        return f"views hold crop offsets outside 0..{span}"
    if n and (views[..., 2].min() < 0 or views[..., 2].max() > flips):
        return f"views hold flips outside 0..{flips}"
    if n and (start.min() < 0 or start.max() >= k):
        return f"start views outside 0..{k - 1}"
    if not torch.isfinite(logits).all():
        return "logits that are not finite"
    return None


def augment_of(recipe: Recipe) -> Augment | None:
    """The recipe's training augmentation (data.crop_padding, data.hflip), or None."""
    augment = Augment(recipe.data.crop_padding, recipe.data.hflip)
    return augment if augment else None


def teacher_path(recipe: Recipe) -> str:
    """Where distillation gets the teacher's targets: ``cache`` (logits of the unaugmented data, computed once),
    ``views`` (the teacher-view table of distill.teacher_cache) or ``online`` (the teacher on every batch:
    augmentation without a teacher cache, or feature terms, which need the teacher's activations)."""
    if recipe.distill.features:
        return "online"
    if not augment_of(recipe):
        return "cache"
    return "views" if recipe.distill.teacher_cache.views > 0 else "online"
