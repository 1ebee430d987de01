"""The teacher-view cache of a run (``distill.teacher_cache: {views: K}``): K augmented views of every training
image and the teacher's logits on each (:mod:`kdcompress.views`), built once per teacher, data and augmentation,
one view at a time so an interrupted build goes on from the views it finished, and refused when damaged."""

from __future__ import annotations

import hashlib
import os
import shutil
import time

import torch

from .. import distributed
from ..checkpoint import read_manifest, save_state
from ..data import Augment
from ..errors import CheckpointError, KdcError
from ..files import atomic_write
from ..views import ViewTable, draw_views, table_bytes, table_problem, teacher_view_logits
from .context import StageContext
from .layout import checkpoint_path, related_run_dirs, teacher_views_path

__all__ = ["teacher_view_table", "check_table_size", "MAX_TABLE_BYTES"]

MAX_TABLE_BYTES = 4 * 2**30  # the table is held in memory whole: past this, fewer views or the online teacher


def _key(ctx: StageContext, augment: Augment) -> str:
    """The table's key: the teacher checkpoint, the training split, the augmentation, K and the stored type."""
    c = ctx.recipe.distill.teacher_cache
    teacher_sha = read_manifest(checkpoint_path(ctx.recipe.run_dir, "teacher"))["sha256"]
    data = ctx.data.train_identity or ctx.data.identity  # several seeds share one table when the split is the same
    what = f"{teacher_sha}|{data}|{augment.crop_padding}|{augment.hflip}|{c.views}|{c.dtype}"
    return hashlib.sha256(what.encode()).hexdigest()[:16]


def check_table_size(c, n: int, classes: int) -> int:
    """The bytes of a table of ``c`` (distill.teacher_cache) for ``n`` images; KdcError past MAX_TABLE_BYTES."""
    size = table_bytes(n, c.views, classes, c.dtype)
    if size > MAX_TABLE_BYTES:
        raise KdcError(
            f"distill.teacher_cache: {c.views} views of {n:,} images with {classes} classes take "
            f"{size / 2**30:.1f} GiB, more than the {MAX_TABLE_BYTES / 2**30:.0f} GiB kdc holds in memory; lower "
            f"views (or dtype: float16), or set views: 0 to run the teacher online"
        )
    return size


def teacher_view_table(ctx: StageContext, teacher: torch.nn.Module, augment: Augment) -> ViewTable:
    """The run's table for ``ctx``'s teacher, data and augmentation, on ``ctx.device``: read from the cache, or
    built (rank 0, one teacher pass per view) and stored there first."""
    c = ctx.recipe.distill.teacher_cache
    n, classes = len(ctx.data.train), ctx.data.num_classes
    size = check_table_size(c, n, classes)
    key = _key(ctx, augment)
    path = teacher_views_path(ctx.recipe.run_dir, key)
    if distributed.is_main() and not path.is_file():
        _share_related(ctx, key, path)
    if distributed.is_main() and not path.is_file():
        table = _build(ctx, teacher, augment, key)
        distributed.barrier()  # the other ranks read the file once it is there
        return table.to(ctx.device)
    distributed.barrier()
    return _read(path, key, (n, c.views, classes, c.dtype, augment), size)[0].to(ctx.device)


def _share_related(ctx: StageContext, key: str, path) -> None:
    """A further seed of ``kdc run --seeds``, or a point of ``kdc sweep``, takes a table with the same key (the same
    teacher, training split, augmentation and K) from the runs made with it (:func:`related_run_dirs`):
    hard-linked (copied where links fail), then read and checked as its own."""
    for other in related_run_dirs(ctx.recipe.run_dir):
        source = teacher_views_path(other, key)
        if source.is_symlink() or not source.is_file():  # only a file that lives in that run directory
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, path)
        except OSError:  # another file system: a copy, streamed (the table is checked as it is read)
            with open(source, "rb") as src:
                atomic_write(path, lambda fh: shutil.copyfileobj(src, fh))
        ctx.console.print(f"{ctx.stage}: using the teacher-view table of {other}")
        return


def _read(path, key: str, shape: tuple, size: int, partial: bool = False) -> tuple[ViewTable, int]:
    """A stored table (or the partial one being built) and its views done, checked against what it must hold;
    CheckpointError if it does not."""
    n, k, classes, dtype, augment = shape
    try:
        if os.path.getsize(path) > 2 * size + 2**20:  # refused before loading: memory stays bounded
            raise ValueError("larger than the table it should hold")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("key") != key:
            raise ValueError("made for another teacher, data or augmentation")
        done = state.get("done")
        if not isinstance(done, int) or not 0 <= done <= k or (not partial and done != k):
            raise ValueError("a bad count of views done")
        table = ViewTable(state["views"], state["start"], state["logits"])
        problem = table_problem(table, n, k, classes, dtype, augment)
        if problem:
            raise ValueError(problem)
    except Exception as exc:  # torch's own messages on an unreadable file run to paragraphs: its type says enough
        why = str(exc) if type(exc) is ValueError else f"unreadable: {type(exc).__name__}"
        what = "partial teacher-view table" if partial else "teacher-view cache"
        raise CheckpointError(f"the {what} {path} is damaged ({why}); delete it and rerun") from None
    return table, done


def _build(ctx: StageContext, teacher: torch.nn.Module, augment: Augment, key: str) -> ViewTable:
    """Run the teacher once per view, saving after each so an interrupted build resumes; then store the table."""
    c = ctx.recipe.distill.teacher_cache
    n, classes = len(ctx.data.train), ctx.data.num_classes
    dtype = {"float16": torch.float16, "float32": torch.float32}[c.dtype]
    partial_path = teacher_views_path(ctx.recipe.run_dir, key, partial=True)
    done = 0
    if partial_path.is_file():
        shape = (n, c.views, classes, c.dtype, augment)
        table, done = _read(partial_path, key, shape, table_bytes(n, c.views, classes, c.dtype), partial=True)
        ctx.console.print(f"{ctx.stage}: going on with the teacher-view table ({done} of {c.views} views done)")
    else:
        views, start = draw_views(augment, n, c.views, seed=int(key[:8], 16))
        table = ViewTable(views, start, torch.zeros(n, c.views, classes, dtype=dtype))
    started = time.perf_counter()
    for view in range(done, c.views):
        logits, labels = teacher_view_logits(
            teacher, ctx.data.train, augment, table.views[:, view], ctx.recipe.data.eval_batch_size, ctx.device
        )
        table.logits[:, view] = logits.to(dtype)
        state = {"key": key, "views": table.views, "start": table.start, "logits": table.logits, "done": view + 1}
        last = view + 1 == c.views
        save_state(teacher_views_path(ctx.recipe.run_dir, key) if last else partial_path, state)
        right = (logits.argmax(1) == labels).float().mean().item()
        ctx.console.print(
            f"{ctx.stage}: teacher-view table: view {view + 1}/{c.views}, the teacher right on {right:.1%} of "
            f"the training images as this view shows them ({time.perf_counter() - started:.1f} s)"
        )
    partial_path.unlink(missing_ok=True)
    return table
