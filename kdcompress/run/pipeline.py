"""The stages of a kdc run, in order: teacher, student baseline, distilled, pruned, then the export.

:func:`run_stage` runs one: it skips a stage that is up to date (its checkpoint carries the fingerprint of
what it is made from, :mod:`kdcompress.run.state`), checks the recipe, runs the stage's body
(:mod:`kdcompress.run.bodies`), evaluates the model on the test split and saves ``<run dir>/<stage>/model.pt``.
:func:`run_pipeline` runs them all under the run directory's lock. Example::

    >>> from kdcompress.run import run_pipeline
    >>> from kdcompress.recipe import load_recipe
    >>> run_pipeline(load_recipe())  # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console

from .. import distributed
from ..checkpoint import load_checkpoint, save_checkpoint
from ..data import load_data
from ..errors import CheckpointError, KdcError
from ..files import atomic_write_text, remove_stale_temp_files
from ..measure import count_nonzero, count_params
from ..progress import RunProgress
from ..prune import prunable_weights, weight_sparsity
from ..recipe import Recipe, recipe_to_dict
from ..train import device_words, evaluate, recalibrate_batchnorm, resolve_device, seed_everything
from . import layout
from .bodies import RUNNERS
from .checks import check_recipe
from .context import StageContext
from .export import export_stage
from .marker import check_run_dir, lock_run_dir, mark_run_dir, write_resolved_recipe
from .stages import STAGES
from .state import (
    FINGERPRINT_VERSION,
    Origin,
    StageStatus,
    require_upstream,
    resume_epoch,
    stage_fingerprint,
    stage_inputs,
    stage_seed,
    stage_status,
    stale_dependency,
    upstream_fingerprints,
)

__all__ = ["run_pipeline", "run_stage"]


def run_pipeline(
    recipe: Recipe,
    force: bool = False,
    restart: bool = False,
    console: Console | None = None,
    stages=None,
    origin: Origin = Origin(),
) -> dict:
    """Run every enabled stage in order (or those named in ``stages``), skipping up-to-date ones unless ``force``;
    return stage metrics. Holds the run directory's lock throughout (:func:`kdcompress.run.lock.run_dir_lock`).
    ``origin``: the command line the recipe came from, for the commands messages suggest."""
    with lock_run_dir(recipe.run_dir):  # one writer from the first stage to the export
        return _run_pipeline(recipe, force, restart, console, stages, origin)


def _run_pipeline(recipe: Recipe, force: bool, restart: bool, console: Console | None, stages, origin: Origin) -> dict:
    """:func:`run_pipeline`'s work, done while holding the run directory's lock."""
    console = console or Console(stderr=True)
    progress = RunProgress(console, _plan(recipe, force, restart, stages))
    results = {}
    for stage in STAGES:
        if (stages is not None and stage.name not in stages) or not stage.enabled(recipe):
            continue
        results[stage.name] = run_stage(
            recipe, stage.name, force=force, restart=restart, console=console, progress=progress, origin=origin
        )
    if stages is None and recipe.export.formats and distributed.is_main():
        # the export section's artifacts, made from the stage they name
        results["export"] = export_stage(recipe, force=force, console=console, origin=origin)
    return results


def _plan(recipe: Recipe, force: bool, restart: bool, stages=None) -> dict[str, tuple[int, str]]:
    """``{stage: (epochs it still has to train, model it trains)}`` for the stages a run goes through, in order.

    What the run's time left is estimated from: an up-to-date stage trains none, an interrupted one the
    epochs after its resume state. A stage whose state cannot be read counts all its epochs.
    """
    plan = {}
    for stage in STAGES:
        if (stages is not None and stage.name not in stages) or not stage.enabled(recipe):
            continue
        epochs = stage.epochs(recipe)
        if not force:
            try:
                status = stage_status(recipe, stage.name)
                if status.done:
                    epochs = 0
                elif not restart and stale_dependency(recipe, stage.name) is None:
                    done = resume_epoch(recipe, stage.name, upstream_fingerprints(recipe, stage.name))
                    epochs = max(0, epochs - (done or 0))
            except KdcError:  # a damaged checkpoint: run_stage says what to do about it
                pass
        plan[stage.name] = (epochs, stage.trains)
    return plan


def run_stage(
    recipe: Recipe,
    stage: str,
    force: bool = False,
    restart: bool = False,
    console: Console | None = None,
    progress: RunProgress | None = None,
    origin: Origin = Origin(),
) -> dict:
    """Run one stage, resuming an interrupted one; skip it when up to date unless ``force``.

    ``restart`` drops the resume state of an unfinished stage and starts it over. ``progress``: the run's
    progress display (:func:`run_pipeline` passes one that knows the stages to come); else the stage
    shows its own. ``origin``: the command line the recipe came from, for the commands messages suggest.
    Returns the stage's metrics. Holds the run directory's lock
    (:func:`kdcompress.run.lock.run_dir_lock`) throughout: another kdc writing there is refused.
    """
    with lock_run_dir(recipe.run_dir):
        return _run_stage(recipe, stage, force, restart, console, progress, origin)


def _run_stage(
    recipe: Recipe,
    stage: str,
    force: bool,
    restart: bool,
    console: Console | None,
    progress: RunProgress | None,
    origin: Origin,
) -> dict:
    """:func:`run_stage`'s work, done while holding the run directory's lock."""
    console = console or Console(stderr=True)
    device = distributed.init(resolve_device(recipe.run.device))
    main = distributed.is_main()
    if not main:  # one voice: rank 0 speaks for all
        console = Console(stderr=True, quiet=True)
        progress = None
    check_run_dir(recipe.run_dir)
    distributed.barrier()  # every rank checks the run directory before rank 0 writes into it
    path = layout.checkpoint_path(recipe.run_dir, stage)
    status = _status_or_unfinished(recipe, stage, force)
    if status.done and not force:
        return _skip(stage, path, console, main)
    # names resolve, models fit the data, the pruning schedule fits in retraining: fail now, not an hour into
    # training, and before asking for earlier stages that could not help
    check_recipe(recipe)
    upstream = require_upstream(recipe, stage, origin)
    if path.exists():
        console.print(f"[yellow]{stage}[/]: rerunning ({status.reason if not status.done else '--force'})")
    ctx = _prepare(recipe, stage, upstream, force, restart, device, console, progress)
    started = time.perf_counter()
    model, spec, history, extra = RUNNERS[stage](ctx)
    extra = dict(extra)
    structure = extra.pop("structure", None)  # a structurally pruned model's shapes, replayed when it is loaded
    extra = _recalibrate(ctx, model, extra)
    metrics = _stage_metrics(ctx, model, history, extra, started)
    if main:
        _save_stage(path, ctx.state_path, _checkpoint_payload(ctx, model, spec, metrics, history, structure))
    distributed.barrier()  # no rank looks at this stage's files before they are written
    console.print(
        f"[green]{stage}[/]: test accuracy {metrics['test_accuracy']:.4f}, {metrics['nonzero_params']:,} of "
        f"{metrics['params']:,} parameters non-zero, saved {path} ({metrics['seconds']:.1f} s)"
    )
    return metrics


def _status_or_unfinished(recipe: Recipe, stage: str, force: bool) -> StageStatus:
    """The stage's status; a damaged checkpoint is unfinished work when a resume state is there or with ``force``."""
    try:
        return stage_status(recipe, stage)
    except CheckpointError as exc:
        # A resume state means the stage never finished: its checkpoint was cut off while being
        # saved, and the state holds all the work. Otherwise only --force may replace it.
        if not (force or layout.state_path(recipe.run_dir, stage).is_file()):
            raise
        return StageStatus(stage, False, f"unfinished or damaged checkpoint: {exc}")


def _skip(stage: str, path: Path, console: Console, main: bool) -> dict:
    """An up-to-date stage: its checkpoint's metrics, the metrics.jsonl beside it mended if need be."""
    console.print(f"[green]{stage}[/]: up to date, skipped ({path}; --force reruns it)")
    ckpt = load_checkpoint(path)
    if main:
        _restore_metrics_file(path.parent / layout.METRICS_FILE, ckpt)
    return ckpt["metrics"]


def _supplied(recipe: Recipe, stage: str):
    """The teacher file the user supplied when ``stage`` is the teacher and one is (``teacher.checkpoint``)."""
    return stage == "teacher" and recipe.teacher.checkpoint


def _prepare(
    recipe: Recipe,
    stage: str,
    upstream: dict[str, str],
    force: bool,
    restart: bool,
    device: torch.device,
    console: Console,
    progress: RunProgress | None,
) -> StageContext:
    """Load the data, seed, drop a resume state ``force`` or ``restart`` gives up, ready the run directory;
    return what the stage body works with."""
    run_dir = recipe.run_dir
    if recipe.run.threads and not distributed.is_distributed():
        torch.set_num_threads(recipe.run.threads)
    seed = stage_seed(recipe, stage)
    data = load_data(recipe.data, seed=seed, console=console)
    fingerprint = stage_fingerprint(recipe, stage, upstream)
    stage_dir = layout.stage_dir(run_dir, stage)
    state_path = layout.state_path(run_dir, stage)
    if (restart or force) and state_path.exists():
        distributed.barrier()  # every rank has seen it before it goes
        if distributed.is_main():
            state_path.unlink()
        console.print(f"[yellow]{stage}[/]: dropped the resume state, starting over")
    if distributed.is_main():
        mark_run_dir(run_dir)
        write_resolved_recipe(recipe)
        stage_dir.mkdir(parents=True, exist_ok=True)
        for folder in (run_dir, stage_dir, layout.cache_dir(run_dir)):
            remove_stale_temp_files(folder, run_dir)  # left by a process killed while writing; we hold the lock
    distributed.barrier()
    seed_everything(seed)
    console.print(
        f"[bold]{stage}[/]: supplied: {recipe.teacher.checkpoint}, not trained; evaluating it on {data.name} "
        f"({len(data.test)} test) on {device}"
        if _supplied(recipe, stage)
        else f"[bold]{stage}[/]: training on {data.name} ({len(data.train)} train, {len(data.test)} test) on {device}"
    )
    log_path = layout.running_log_path(run_dir, stage)
    return StageContext(recipe, stage, data, device, console, log_path, state_path, fingerprint, progress)


def _recalibrate(ctx: StageContext, model: torch.nn.Module, extra: dict) -> dict:
    """Recompute BatchNorm's running statistics when ``run.bn_recalibrate`` asks; return ``extra`` with the count."""
    recipe, stage = ctx.recipe, ctx.stage
    if recipe.run.bn_recalibrate and not _supplied(recipe, stage):  # a supplied teacher is used as it was given
        used = recalibrate_batchnorm(
            model,
            ctx.data.train,
            recipe.run.bn_recalibrate,
            recipe.data.batch_size,
            ctx.device,
            seed=stage_seed(recipe, stage),
        )
        if used:
            extra = {**extra, "bn_recalibrate_batches": used}
            ctx.console.print(f"{stage}: recomputed the BatchNorm running statistics from {used} training batches")
    return extra


def _stage_metrics(ctx: StageContext, model: torch.nn.Module, history: list, extra: dict, started: float) -> dict:
    """The trained model's metrics: test accuracy and loss (with the confusion matrix), size, sparsity, time."""
    data, device = ctx.data, ctx.device
    # the confusion matrix lets the report show per-class accuracy without loading the dataset again
    test = evaluate(model, data.test, ctx.recipe.data.eval_batch_size, device, confusion=True)
    prune = ctx.recipe.prune
    world = distributed.world_size()
    return {
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "test_samples": len(data.test),  # the report's noise estimate: binomial SE sqrt(p(1-p)/n)
        "confusion": test["confusion"],  # rows: true class, columns: predicted class
        "train_device": device_words(device) + (f" x {world} processes" if world > 1 else ""),
        "params": count_params(model),
        "nonzero_params": count_nonzero(model),
        "sparsity": weight_sparsity(
            {k: v.detach() for k, v in prunable_weights(model, prune.include, prune.exclude).items()}
        ),
        "epochs": len(history),
        "seconds": time.perf_counter() - started,
        **extra,
    }


def _checkpoint_payload(
    ctx: StageContext, model: torch.nn.Module, spec: dict, metrics: dict, history: list, structure
) -> dict:
    """What a finished stage's checkpoint holds."""
    recipe, data = ctx.recipe, ctx.data
    return {
        "stage": ctx.stage,
        "arch": spec,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "fingerprint": ctx.tag,
        "fingerprint_version": FINGERPRINT_VERSION,
        # what the fingerprint was made from, file hashes included, so a later run can say what changed
        "inputs": stage_inputs(recipe_to_dict(recipe), ctx.stage),
        "recipe": recipe_to_dict(recipe),
        "metrics": metrics,
        "history": history,  # the epochs of metrics.jsonl, to restore it beside this checkpoint
        "dataset": data.name,
        "preprocess": data.preprocess,
        **({"structure": structure} if structure is not None else {}),
    }


def _metrics_lines(history: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in history)


def _restore_metrics_file(metrics_path: Path, ckpt: dict) -> None:
    """Make ``metrics.jsonl`` describe the checkpoint beside it again.

    A process killed between writing a checkpoint and its metrics.jsonl, or a kdc from before the
    running log was kept apart (:data:`kdcompress.run.layout.RUNNING_LOG`), can leave other epochs there.
    """
    history = ckpt.get("history")
    if history is None:  # a checkpoint from before histories were saved
        return
    text = _metrics_lines(history)
    try:
        current = metrics_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        current = None
    if current != text:
        atomic_write_text(metrics_path, text)


def _save_stage(path: Path, state_path: Path, payload: dict) -> None:
    """Save a finished stage: its checkpoint, then the metrics.jsonl that describes it.

    A failed save keeps the previous checkpoint and its metrics.jsonl together; a kill between the two
    writes is mended when the stage is next skipped (:func:`_restore_metrics_file`).
    """
    save_checkpoint(path, payload)
    atomic_write_text(path.parent / layout.METRICS_FILE, _metrics_lines(payload["history"]))
    for done in (state_path, path.parent / layout.RUNNING_LOG):  # the finished checkpoint supersedes both
        if done.exists():
            done.unlink()
