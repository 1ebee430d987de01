"""``kdc sensitivity``: each prunable group of the distilled student pruned alone at a grid of ratios, scored on
the search split, written to ``<run dir>/sensitivity.json`` and reused while nothing it was made from changed.

The search split is never the test split: it is the validation split when the recipe holds one out
(``data.val_split``), else a fixed, seeded subset of the training images (the note says so, since the model
has seen them); at most ``prune.sensitivity_samples`` images either way (:func:`search_split`). The test split
is what the report quotes; choosing what to prune on it would make that figure optimistic.

The file is keyed (:func:`sensitivity_key`) by the distilled checkpoint's SHA-256 and fingerprint, the
pruning settings that shape the groups (method, importance, include, exclude, round_to), the ratios, the
sample count and the data settings that pick the images: a second call with all of them unchanged reads the
file back; any change measures again. :func:`load_sensitivity` reads it back for the pruned stage.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..checkpoint import read_manifest
from ..data import DataSplits, TensorData, load_data
from ..errors import CheckpointError, KdcError, StageOrderError
from ..files import atomic_write_text
from ..prune.sensitivity import Sensitivity, measure_sensitivity
from ..recipe import Recipe, recipe_to_dict
from ..stats import accuracy_se
from ..train import evaluate, recalibrate_batchnorm, resolve_device, seed_everything
from .context import load_stage_model
from .layout import checkpoint_path, sensitivity_path
from .lock import run_dir_lock
from .stages import COMMAND_OF
from .state import Origin, stage_status

__all__ = [
    "sensitivity_for",
    "SOURCE_STAGE",
    "MAX_SENSITIVITY_BYTES",
    "search_split",
    "sensitivity_key",
    "load_sensitivity",
    "run_sensitivity",
]

SOURCE_STAGE = "distilled"  # the model whose groups are measured: the one the pruned stage starts from
MAX_SENSITIVITY_BYTES = 32 << 20  # a sensitivity.json over this is not one kdc wrote
KEY_VERSION = 1
# data settings that do not change which images are scored or how they look
_NOT_DATA_IDENTITY = ("batch_size", "eval_batch_size", "workers", "root", "crop_padding", "hflip")
SENSITIVITY_WAIT_ADVICE = "wait for it to finish, then run kdc sensitivity"


def search_split(data: DataSplits, recipe: Recipe) -> tuple[str, TensorData, str]:
    """``(name, images, note)`` the sensitivity is scored on; never the test split.

    The validation split when ``data.val_split`` > 0, else the training split (whose images the model was
    trained on: the note says so). A fixed subset of at most ``prune.sensitivity_samples`` images, drawn with
    ``run.seed``, so that the same recipe always scores the same images.
    """
    limit = recipe.prune.sensitivity_samples
    if data.val is not None:
        name, split = "val", data.val
    else:
        name, split = "train", data.train
    n = min(limit, len(split))
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(recipe.run.seed + 7919))
    chosen = split.subset(order[:n].sort().values)
    if name == "val":
        note = f"scored on {n:,} of the {len(split):,} validation images (data.val_split {recipe.data.val_split:g})"
    else:
        note = (
            f"no validation split (data.val_split is 0): scored on {n:,} training images, a fixed subset the "
            f"model was trained on, so drops may read small; set data.val_split (e.g. 0.1) to score held-out images"
        )
    return name, chosen, note


def sensitivity_key(recipe: Recipe, manifest: dict) -> str:
    """A short hash of what a sensitivity file is made from: the distilled checkpoint (``manifest``, its SHA-256
    and fingerprint), the pruning settings that shape the groups, the ratios, the samples and the data settings
    that pick the images."""
    section = recipe.prune
    data = {k: v for k, v in recipe_to_dict(recipe)["data"].items() if k not in _NOT_DATA_IDENTITY}
    blob = {
        "version": KEY_VERSION,
        "checkpoint": manifest.get("sha256"),
        "fingerprint": manifest.get("fingerprint"),
        "method": section.method,
        "importance": section.importance,
        "include": list(section.include),
        "exclude": list(section.exclude),
        "round_to": section.round_to,
        "ratios": [float(r) for r in section.sensitivity_ratios],
        "samples": section.sensitivity_samples,
        "bn_batches": section.sensitivity_bn_batches,
        "data": data,
        "seed": recipe.run.seed,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def load_sensitivity(run_dir: str | Path, expected_key: str | None) -> Sensitivity | None:
    """The sensitivity measured in ``run_dir``, or None when there is none or it was made with another key.

    ``expected_key`` (:func:`sensitivity_key`) None takes whatever is there (the report shows it with its
    source fingerprint). The file is data: read bounded and fully checked; a damaged one is a CheckpointError
    that says to measure again.
    """
    path = sensitivity_path(run_dir)
    if not path.is_file():
        return None
    advice = f"delete it and run `kdc sensitivity {Path(run_dir)}` again"
    try:
        if path.stat().st_size > MAX_SENSITIVITY_BYTES:
            raise ValueError(f"it is over {MAX_SENSITIVITY_BYTES >> 20} MiB")
        found = Sensitivity.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"cannot read {path} ({type(exc).__name__}); {advice}") from None
    except ValueError as exc:  # JSONDecodeError included
        raise CheckpointError(f"{path} is damaged: {exc}; {advice}") from None
    if expected_key is not None and found.key != expected_key:
        return None
    return found


class _Display:
    """A bar on a terminal; elsewhere one line per group measured; nothing on a quiet console."""

    def __init__(self, console: Console, ratios: int):
        self.console, self.ratios, self.bar, self.task = console, ratios, None, None
        self.started = time.perf_counter()

    def __enter__(self) -> "_Display":
        if self.console.is_terminal and not self.console.quiet:
            columns = (TextColumn("sensitivity"), BarColumn(bar_width=20), MofNCompleteColumn())
            label = TextColumn("{task.fields[label]}")
            self.bar = Progress(*columns, TimeRemainingColumn(), label, console=self.console, transient=True)
            self.bar.start()
        return self

    def __call__(self, done: int, total: int, label: str) -> None:
        if self.bar is not None:
            if self.task is None:
                self.task = self.bar.add_task("sensitivity", total=total, label="")
            self.bar.update(self.task, completed=done, total=total, label=label)
        elif done > 1 and (done - 1) % self.ratios == 0:
            groups, group = (total - 1) // self.ratios, (done - 1) // self.ratios
            name = label.rsplit(" at ", 1)[0]
            self.console.print(
                f"sensitivity: group {group}/{groups} ({name}) measured, {time.perf_counter() - self.started:.1f} s",
                markup=False,
                highlight=False,
            )

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def _source(recipe: Recipe, origin: Origin) -> dict:
    """The distilled checkpoint's manifest; StageOrderError (one message) when the stage is not finished."""
    status = stage_status(recipe, SOURCE_STAGE)
    if not status.done:
        hint = origin.hint()
        raise StageOrderError(
            f"kdc sensitivity measures the distilled student, and the '{SOURCE_STAGE}' stage is not finished "
            f"({status.reason}); run `{COMMAND_OF[SOURCE_STAGE]} {hint}` (or `kdc run {hint}`) first"
        )
    return read_manifest(checkpoint_path(recipe.run_dir, SOURCE_STAGE))


def _scorer(split: TensorData, batch_size: int, device: torch.device, recalibrate=None):
    """``evaluate(model) -> (accuracy, se)`` on ``split``: batched, eval mode, no gradients; ``recalibrate(model)``
    first when given (BatchNorm's statistics recomputed on training batches: the pruned copy is the scorer's)."""

    def score(model: torch.nn.Module) -> tuple[float, float]:
        if recalibrate is not None:
            recalibrate(model)
        with torch.no_grad():
            accuracy = evaluate(model, split, batch_size, device)["accuracy"]
        return accuracy, accuracy_se(accuracy, len(split)) or 0.0

    return score


def _recalibrator(recipe: Recipe, data: DataSplits, device: torch.device):
    """Adaptive BatchNorm (Li et al. 2020, EagleEye): a pruned copy's BatchNorm statistics recomputed from
    ``prune.sensitivity_bn_batches`` training batches (a fixed order) before it is scored. Pruning a layer's
    channels shifts the statistics of the layers after it; scored with the stale ones, a copy can look ruined
    where a few steps of retraining recover it, and an allocation read off such curves spares the wrong layers.
    None when the setting is 0."""
    batches = recipe.prune.sensitivity_bn_batches
    if not batches:
        return None
    return lambda model: recalibrate_batchnorm(
        model, data.train, batches, recipe.data.batch_size, device, seed=recipe.run.seed
    )


def run_sensitivity(
    recipe: Recipe, force: bool = False, console: Console | None = None, origin: Origin = Origin()
) -> tuple[Sensitivity, Path, bool]:
    """Measure (or reuse) the sensitivity of the distilled student; return it, the file and whether it was reused.

    Needs a finished, up-to-date distilled stage (else StageOrderError naming the command to run). Reuses
    ``sensitivity.json`` when its key matches (:func:`sensitivity_key`), unless ``force``; a stale or damaged
    one is measured again. Holds the run directory's lock while it works.
    """
    console = console or Console(stderr=True)
    with run_dir_lock(recipe.run_dir, advice=SENSITIVITY_WAIT_ADVICE, create=False):
        return sensitivity_for(recipe, console, force=force, origin=origin)


def sensitivity_for(
    recipe: Recipe,
    console: Console,
    force: bool = False,
    origin: Origin = Origin(),
    data: DataSplits | None = None,
) -> tuple[Sensitivity, Path, bool]:
    """:func:`run_sensitivity`'s work, for a caller that already holds the run directory's lock (the pruned
    stage, for ``allocation: sensitivity``); ``data``, when given, is used instead of loading it again."""
    manifest = _source(recipe, origin)
    key = sensitivity_key(recipe, manifest)
    path = sensitivity_path(recipe.run_dir)
    if not force:
        try:
            found = load_sensitivity(recipe.run_dir, key)
        except CheckpointError as exc:
            console.print(f"[yellow]sensitivity[/]: measuring again ({exc})")
            found = None
        if found is not None:
            console.print(f"[green]sensitivity[/]: up to date, reused {path} (--force measures again)")
            return found, path, True
        if path.is_file():
            console.print(f"[yellow]sensitivity[/]: {path} was made from another checkpoint or settings")
    result = _measure(recipe, console, data)
    result.key, result.source_fingerprint = key, str(manifest.get("fingerprint") or "")
    atomic_write_text(path, json.dumps(result.to_dict(), indent=1) + "\n")
    return result, path, False


def _measure(recipe: Recipe, console: Console, data: DataSplits | None = None) -> Sensitivity:
    """Load the distilled model and the search split, and measure every group at every ratio."""
    started = time.perf_counter()
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    device = resolve_device(recipe.run.device)
    if data is None:
        data = load_data(recipe.data, seed=recipe.run.seed, console=console)
    name, split, note = search_split(data, recipe)
    if recipe.prune.sensitivity_bn_batches:
        note += (
            f"; BatchNorm statistics of each pruned copy recomputed from {recipe.prune.sensitivity_bn_batches} "
            f"training batches before it is scored (prune.sensitivity_bn_batches)"
        )
    model, arch = load_stage_model(recipe, SOURCE_STAGE, device)
    model.eval()
    section = recipe.prune
    seed_everything(recipe.run.seed)
    console.print(
        f"[bold]sensitivity[/]: {section.method} pruning of the distilled student, ratios "
        f"{', '.join(f'{r:g}' for r in section.sensitivity_ratios)}; {note}",
        soft_wrap=True,
    )
    split = split.to(device)
    with _Display(console, len(section.sensitivity_ratios)) as display:
        try:
            result = measure_sensitivity(
                model,
                arch.get("input_shape") or data.input_shape,
                _scorer(split, recipe.data.eval_batch_size, device, _recalibrator(recipe, data, device)),
                section.sensitivity_ratios,
                method=section.method,
                importance=section.importance,
                include=section.include,
                exclude=section.exclude,
                round_to=section.round_to,
                progress=display,
            )
        except ValueError as exc:  # nothing to prune, a model torch-pruning cannot trace
            raise KdcError(f"kdc sensitivity cannot measure the distilled student: {exc}") from None
    result.samples, result.split, result.note = len(split), name, note
    result.seconds = time.perf_counter() - started
    return result
