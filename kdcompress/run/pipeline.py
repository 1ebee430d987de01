"""The stages of a kdc run, in order: teacher, student baseline, distilled, pruned.

Each stage reads the recipe, builds its model, hands a loss (and, when
pruning, a hook) to :func:`kdcompress.train.fit`, evaluates the final model on
the test split and saves a checkpoint in ``<run dir>/<stage>/model.pt``.

A stage is up to date when its checkpoint exists and carries the fingerprint
of the recipe sections (and upstream checkpoints) it was made from; ``kdc
run`` skips such stages. Example::

    >>> from kdcompress.pipeline import run_pipeline
    >>> from kdcompress.recipe import load_recipe
    >>> run_pipeline(load_recipe())  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
import yaml
from rich.console import Console

from . import distributed
from .checkpoint import (
    atomic_write_text,
    load_checkpoint,
    manifest_path,
    read_manifest,
    remove_stale_temp_files,
    save_checkpoint,
    save_state,
)
from .checks import check_recipe
from .data import Augment, DataSplits, batches_per_epoch, load_data
from .distill import dkd_warmup_factor, get_loss, kd_loss, kd_loss_from_log_probs, teacher_log_probs, teacher_logits
from .errors import CheckpointError, KdcError, StageOrderError
from .measure import count_nonzero, count_params
from .models import build_from_checkpoint, build_model, model_spec
from .progress import RunProgress, tensorboard_writer_class
from .prune import MagnitudePruner, Schedule, plan_schedule, prunable_weights, weight_sparsity
from .recipe import Recipe, TrainSettings, recipe_to_dict
from .runlock import LOCK_FILE, run_dir_lock
from .stages import COMMAND_OF, STAGES, stage_named
from .train import (
    Hook,
    Runtime,
    device_words,
    evaluate,
    fit,
    recalibrate_batchnorm,
    resolve_device,
    seed_everything,
)

__all__ = [
    "STAGES",
    "COMMAND_OF",
    "run_pipeline",
    "run_stage",
    "stage_status",
    "checkpoint_path",
    "lock_run_dir",
    "RUNNING_LOG",
]

# An unfinished stage's epochs, one JSON line each, beside its resume state. metrics.jsonl is written
# only with the stage's checkpoint, so it always describes that checkpoint, even after a failed rerun.
RUNNING_LOG = "metrics.partial.jsonl"

FINGERPRINT_VERSION = 2  # 2: hashed from each stage's declared inputs (1: sections listed by hand)


def checkpoint_path(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / stage / "model.pt"


def stage_seed(recipe: Recipe, stage: str) -> int:
    """The seed a stage is trained with: ``teacher.seed`` for the teacher when set, else ``run.seed``.

    The teacher's inputs hold the same value (:func:`kdcompress.stages._teacher_inputs`), so a teacher
    pinned to one seed is shared by runs at other seeds.
    """
    if stage == "teacher" and recipe.teacher.seed is not None:
        return recipe.teacher.seed
    return recipe.run.seed


def _stage_inputs(recipe: dict, stage: str) -> dict:
    """The recipe values a stage is made from, as ``{dotted key: value}`` (from a resolved recipe dict)."""
    return stage_named(stage).inputs(recipe)


def _fingerprint(recipe: Recipe, stage: str, upstream: dict[str, str]) -> str:
    """A short hash of what the stage is made from: its declared inputs and the fingerprints of its upstream checkpoints."""
    blob = {
        "version": FINGERPRINT_VERSION,
        "stage": stage,
        "inputs": _stage_inputs(recipe_to_dict(recipe), stage),
        "upstream": upstream,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _changes(old: dict, new: dict, stage: str) -> list[str]:
    """``key: old -> new`` for every input of ``stage`` that differs between two resolved recipes, in recipe order."""
    try:
        before, after = _stage_inputs(old, stage), _stage_inputs(new, stage)
    except (KeyError, TypeError, AttributeError):  # a recipe from an older kdc: no detail to give
        return []
    return _diff_inputs(before, after)


def _diff_inputs(before: dict, after: dict) -> list[str]:
    """``key: old -> new`` for every stage input that differs, in recipe order."""
    keys = list(after) + [k for k in before if k not in after]
    missing = object()
    return [
        f"{k}: {_show(before.get(k, missing))} -> {_show(after.get(k, missing))}"
        for k in keys
        if before.get(k, missing) != after.get(k, missing)
    ]


def _show(value) -> str:
    return "(not set)" if not isinstance(value, (str, int, float, bool, list, dict, type(None))) else json.dumps(value)


@dataclass
class StageStatus:
    stage: str
    done: bool
    reason: str  # why it is not up to date


def _read_fingerprint(path: Path) -> str | None:
    """The fingerprint recorded in a checkpoint's manifest (raises CheckpointError if damaged)."""
    return read_manifest(path).get("fingerprint")


def _deps(recipe: Recipe, stage: str) -> tuple[str, ...]:
    """The stages whose checkpoints ``stage`` reads."""
    return stage_named(stage).upstream(recipe)


def _stale_dependency(recipe: Recipe, stage: str) -> StageStatus | None:
    """The status of the first stage ``stage`` reads that is not up to date, or None."""
    for dep in _deps(recipe, stage):
        status = stage_status(recipe, dep)
        if not status.done:
            return status
    return None


def _upstream(recipe: Recipe, stage: str) -> dict[str, str]:
    """Fingerprints of the checkpoints ``stage`` reads; each must exist and be up to date."""
    stale = _stale_dependency(recipe, stage)
    if stale is not None:
        chain = [stale]
        while (deeper := _stale_dependency(recipe, chain[-1].stage)) is not None:  # name every command it takes
            chain.append(deeper)
        source = getattr(recipe, "_source", "") or ""
        hint = _recipe_hint(recipe)
        again = ""
        if (recipe.run_dir / "recipe.yaml").is_file() and Path(source) != recipe.run_dir:
            again = (
                f". To go on with the settings {recipe.run_dir} was made with (earlier --set values included), "
                f"give the run directory instead of the recipe: `{COMMAND_OF[stage]} {recipe.run_dir} --set KEY=VALUE`"
            )
        raise StageOrderError(
            f"the '{stage}' stage needs the '{stale.stage}' stage first ({stale.reason}); run "
            + " then ".join(f"`{COMMAND_OF[s.stage]} {hint}`" for s in reversed(chain))
            + f", or `kdc run {hint}` for every stage{again}"
        )
    return _upstream_fingerprints(recipe, stage)


def _upstream_fingerprints(recipe: Recipe, stage: str) -> dict[str, str]:
    """The fingerprints recorded in the checkpoints ``stage`` reads (checked up to date by the caller)."""
    return {dep: _read_fingerprint(checkpoint_path(recipe.run_dir, dep)) for dep in _deps(recipe, stage)}


def _recipe_hint(recipe: Recipe) -> str:
    """The recipe argument and --set overrides this recipe was loaded with, for commands in messages."""
    source = getattr(recipe, "_source", "") or ""
    overrides = " ".join(f"--set {shlex.quote(item)}" for item in getattr(recipe, "_overrides", ()) or ())
    return " ".join(part for part in (source, overrides) if part) or "RECIPE"


def resume_epoch(recipe: Recipe, stage: str, upstream: dict[str, str]) -> int | None:
    """The last completed epoch of an interrupted run of ``stage`` that the current recipe would resume, else None.

    A resume state made from another recipe (another fingerprint) is not counted: the stage starts over.
    """
    state_path = checkpoint_path(recipe.run_dir, stage).parent / "state.pt"
    if not state_path.is_file():
        return None
    try:  # mmap: only the small entries are read, not the weights
        state = torch.load(state_path, map_location="cpu", weights_only=True, mmap=True)
        tag, epoch = state["tag"], int(state["epoch"])
    except Exception:  # damaged: fit says so, with advice, when the stage runs
        return 0
    return epoch if tag == _fingerprint(recipe, stage, upstream) else None


def stage_status(recipe: Recipe, stage: str) -> StageStatus:
    """Whether ``stage`` has a checkpoint made from the current recipe and upstream checkpoints.

    The reason of a stage that is not up to date names what changed (``teacher.epochs: 8 -> 2``).
    A stage with an interrupted run to resume is not up to date, even beside an older checkpoint.
    A damaged checkpoint raises CheckpointError: it is never silently reused or overwritten.
    """
    path = checkpoint_path(recipe.run_dir, stage)
    stale = _stale_dependency(recipe, stage)
    if stale is not None:
        return StageStatus(stage, False, f"the '{stale.stage}' stage it reads is not up to date: {stale.reason}")
    upstream = _upstream_fingerprints(recipe, stage)  # up to date, just checked: no second walk up the stages
    epoch = resume_epoch(recipe, stage, upstream)
    if epoch is not None:
        return StageStatus(
            stage,
            False,
            f"an interrupted run stopped after epoch {epoch}; it resumes from there (--restart starts it over)",
        )
    if not path.is_file() and not manifest_path(path).is_file():
        return StageStatus(stage, False, f"no checkpoint at {path}")
    found = _read_fingerprint(path)
    expected = _fingerprint(recipe, stage, upstream)
    if found != expected:
        return StageStatus(stage, False, _why_stale(recipe, stage, path))
    return StageStatus(stage, True, "up to date")


def written_version(path: Path) -> int:
    """The fingerprint version a checkpoint was written with (1 before versions were recorded)."""
    try:
        return int(read_manifest(path).get("fingerprint_version", 1))
    except (CheckpointError, TypeError, ValueError):
        return 1


def _why_stale(recipe: Recipe, stage: str, path: Path) -> str:
    """Which recipe values changed since the checkpoint at ``path`` was written, old -> new."""
    try:
        ckpt = load_checkpoint(path, verify=False)
        written, written_inputs = ckpt.get("recipe") or {}, ckpt.get("inputs")
    except CheckpointError:
        written, written_inputs = {}, None
    if isinstance(written_inputs, dict):  # the inputs as they were, a supplied file's hash included
        changes = _diff_inputs(written_inputs, _stage_inputs(recipe_to_dict(recipe), stage))
    else:
        changes = _changes(written, recipe_to_dict(recipe), stage)
    if changes:
        return f"changed since {path} was written: {'; '.join(changes)}"
    if written and written_version(path) != FINGERPRINT_VERSION:
        return f"{path} was written by an earlier kdc, whose fingerprints were made differently; it is made again once"
    return f"{path} was made from an earlier checkpoint of a stage it depends on"


class _Pruning(Hook):
    """Prunes on its schedule (:func:`kdcompress.prune.plan_schedule`) and keeps masks applied.

    At global batch ``step`` it prunes to ``schedule.due(step)`` when a step
    falls there. Its state (the pruner's, and the steps taken) plus the
    schedule, planned again from the recipe, resume mid-schedule exactly.
    """

    def __init__(self, pruner, schedule: Schedule):
        self.pruner, self.schedule = pruner, schedule
        self.steps_taken = 0

    def on_batch_start(self, step: int, batches_per_epoch: int) -> bool:
        if batches_per_epoch != self.schedule.batches_per_epoch:  # planned with another count: a kdc bug
            raise RuntimeError(
                f"the pruning schedule was planned for {self.schedule.batches_per_epoch} batches per epoch, but "
                f"training has {batches_per_epoch}"
            )
        target = self.schedule.due(step)
        if target is None:
            return False
        self.pruner.prune_to(target)
        self.steps_taken += 1
        return bool(self.pruner.changes_parameters)  # fit rebuilds its optimiser for new parameters

    def after_optimizer_step(self, step: int) -> None:
        self.pruner.apply()

    def state_dict(self) -> dict:
        return {"pruner": self.pruner.state_dict(), "steps_taken": self.steps_taken}

    def load_state_dict(self, state: dict) -> None:
        self.pruner.load_state_dict(state["pruner"])
        self.steps_taken = state["steps_taken"]

    def epoch_metrics(self) -> dict:
        return {"sparsity": self.pruner.sparsity(), "pruning_steps": self.steps_taken}


def run_pipeline(
    recipe: Recipe, force: bool = False, restart: bool = False, console: Console | None = None, stages=None
) -> dict:
    """Run every enabled stage in order (or those named in ``stages``), skipping up-to-date ones unless ``force``;
    return stage metrics. Holds the run directory's lock throughout (:func:`kdcompress.runlock.run_dir_lock`)."""
    with lock_run_dir(recipe.run_dir):  # one writer from the first stage to the export
        return _run_pipeline(recipe, force, restart, console, stages)


def _run_pipeline(recipe: Recipe, force: bool, restart: bool, console: Console | None, stages) -> dict:
    """:func:`run_pipeline`'s work, done while holding the run directory's lock."""
    console = console or Console(stderr=True)
    progress = RunProgress(console, _plan(recipe, force, restart, stages))
    results = {}
    for stage in STAGES:
        if (stages is not None and stage.name not in stages) or not stage.enabled(recipe):
            continue
        results[stage.name] = run_stage(
            recipe, stage.name, force=force, restart=restart, console=console, progress=progress
        )
    if stages is None and recipe.export.formats and distributed.is_main():
        from .export import export_stage  # the export section's artifacts, made from the stage they name

        results["export"] = export_stage(recipe, force=force, console=console)
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
                elif not restart and _stale_dependency(recipe, stage.name) is None:
                    done = resume_epoch(recipe, stage.name, _upstream_fingerprints(recipe, stage.name))
                    epochs = max(0, epochs - (done or 0))
            except KdcError:  # a damaged checkpoint: run_stage says what to do about it
                pass
        plan[stage.name] = (epochs, stage.trains)
    return plan


@dataclass
class _StageContext:
    """What every stage function gets: the recipe, the data and where to write."""

    recipe: Recipe
    stage: str
    data: DataSplits
    device: torch.device
    console: Console
    log_path: Path  # the running log (RUNNING_LOG); metrics.jsonl is written with the checkpoint
    state_path: Path
    tag: str
    progress: RunProgress | None = None  # the run's, so the time left covers the stages to come


RUN_FORMAT = 1  # bump when a run directory's layout changes incompatibly


def _check_run_dir(run_dir: Path) -> None:
    """Refuse a run directory written by an incompatible kdc; mark a new one as ours."""
    from . import __version__

    marker = run_dir / "kdc-run.json"
    if marker.is_file():
        try:
            found = json.loads(marker.read_text())
            fmt = found["format"]
        except (OSError, ValueError, KeyError, TypeError):
            raise KdcError(f"{marker} is damaged; delete it (or the whole run directory) and rerun") from None
        if fmt != RUN_FORMAT:
            raise KdcError(
                f"{run_dir} was written by kdc {found.get('kdc_version', '?')} (run format {fmt}); this kdc "
                f"{__version__} reads run format {RUN_FORMAT}. Use another run.name (or run.out_dir), or the kdc "
                f"version that wrote it"
            )
    elif run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        raise KdcError(
            f"{run_dir} exists but was not written by kdc (no kdc-run.json); choose another run.name or run.out_dir, "
            f"or empty it"
        )


@contextlib.contextmanager
def lock_run_dir(run_dir: Path) -> Iterator[None]:
    """Check that ``run_dir`` is kdc's (or new), then hold its lock (:func:`kdcompress.runlock.run_dir_lock`).

    Checked first so that no lock file goes into a folder kdc did not make; a second kdc writing
    there is refused with RunLockedError (exit 2).
    """
    _check_run_dir(Path(run_dir))
    with run_dir_lock(run_dir):
        yield


def _mark_run_dir(run_dir: Path) -> None:
    from . import __version__

    marker = run_dir / "kdc-run.json"
    if not marker.is_file():
        atomic_write_text(marker, json.dumps({"format": RUN_FORMAT, "kdc_version": __version__}) + "\n")


def run_stage(
    recipe: Recipe,
    stage: str,
    force: bool = False,
    restart: bool = False,
    console: Console | None = None,
    progress: RunProgress | None = None,
) -> dict:
    """Run one stage, resuming an interrupted one; skip it when up to date unless ``force``.

    ``restart`` drops the resume state of an unfinished stage and starts it over. ``progress``: the run's
    progress display (:func:`run_pipeline` passes one that knows the stages to come); else the stage
    shows its own. Returns the stage's metrics. Holds the run directory's lock
    (:func:`kdcompress.runlock.run_dir_lock`) throughout: another kdc writing there is refused.
    """
    with lock_run_dir(recipe.run_dir):
        return _run_stage(recipe, stage, force, restart, console, progress)


def _run_stage(
    recipe: Recipe, stage: str, force: bool, restart: bool, console: Console | None, progress: RunProgress | None
) -> dict:
    """:func:`run_stage`'s work, done while holding the run directory's lock."""
    console = console or Console(stderr=True)
    device = distributed.init(resolve_device(recipe.run.device))
    main = distributed.is_main()
    if not main:  # one voice: rank 0 speaks for all
        console = Console(stderr=True, quiet=True)
        progress = None
    run_dir = recipe.run_dir
    _check_run_dir(run_dir)
    distributed.barrier()  # every rank checks the run directory before rank 0 writes into it
    path = checkpoint_path(run_dir, stage)
    state_path = path.parent / "state.pt"
    try:
        status = stage_status(recipe, stage)
    except CheckpointError as exc:
        # A resume state means the stage never finished: its checkpoint was cut off while being
        # saved, and the state holds all the work. Otherwise only --force may replace it.
        if not (force or state_path.is_file()):
            raise
        status = StageStatus(stage, False, f"unfinished or damaged checkpoint: {exc}")
    if status.done and not force:
        console.print(f"[green]{stage}[/]: up to date, skipped ({path}; --force reruns it)")
        ckpt = load_checkpoint(path)
        if main:
            _restore_metrics_file(path.parent / "metrics.jsonl", ckpt)
        return ckpt["metrics"]
    # names resolve, models fit the data, the pruning schedule fits in retraining: fail now, not an hour into
    # training, and before asking for earlier stages that could not help
    check_recipe(recipe)
    upstream = _upstream(recipe, stage)
    if path.exists():
        console.print(f"[yellow]{stage}[/]: rerunning ({status.reason if not status.done else '--force'})")
    if recipe.run.threads and not distributed.is_distributed():
        torch.set_num_threads(recipe.run.threads)
    seed = stage_seed(recipe, stage)
    data = load_data(recipe.data, seed=seed)
    fingerprint = _fingerprint(recipe, stage, upstream)
    stage_dir = path.parent
    if (restart or force) and state_path.exists():
        distributed.barrier()  # every rank has seen it before it goes
        if main:
            state_path.unlink()
        console.print(f"[yellow]{stage}[/]: dropped the resume state, starting over")
    if main:
        _mark_run_dir(run_dir)
        _write_resolved_recipe(recipe)
        stage_dir.mkdir(parents=True, exist_ok=True)
        for folder in (run_dir, stage_dir, run_dir / "cache"):
            remove_stale_temp_files(folder, run_dir)  # left by a process killed while writing; we hold the lock
    distributed.barrier()
    seed_everything(seed)
    supplied = stage == "teacher" and recipe.teacher.checkpoint
    console.print(
        f"[bold]{stage}[/]: supplied: {recipe.teacher.checkpoint}, not trained; evaluating it on {data.name} "
        f"({len(data.test)} test) on {device}"
        if supplied
        else f"[bold]{stage}[/]: training on {data.name} ({len(data.train)} train, {len(data.test)} test) on {device}"
    )
    started = time.perf_counter()
    ctx = _StageContext(
        recipe, stage, data, device, console, stage_dir / RUNNING_LOG, state_path, fingerprint, progress
    )
    model, spec, history, extra = _RUN[stage](ctx)
    extra = dict(extra)
    structure = extra.pop("structure", None)  # a structurally pruned model's shapes, replayed when it is loaded
    if recipe.run.bn_recalibrate and not supplied:  # a supplied teacher is used as it was given
        used = recalibrate_batchnorm(
            model, data.train, recipe.run.bn_recalibrate, recipe.data.batch_size, device, seed=seed
        )
        if used:
            extra = {**extra, "bn_recalibrate_batches": used}
            console.print(f"{stage}: recomputed the BatchNorm running statistics from {used} training batches")
    # the confusion matrix lets the report show per-class accuracy without loading the dataset again
    test = evaluate(model, data.test, recipe.data.eval_batch_size, device, confusion=True)
    prune = recipe.prune
    world = distributed.world_size()
    metrics = {
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
    if main:
        _save_stage(
            path,
            state_path,
            {
                "stage": stage,
                "arch": spec,
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "fingerprint": fingerprint,
                "fingerprint_version": FINGERPRINT_VERSION,
                # what the fingerprint was made from, file hashes included, so a later run can say what changed
                "inputs": _stage_inputs(recipe_to_dict(recipe), stage),
                "recipe": recipe_to_dict(recipe),
                "metrics": metrics,
                "history": history,  # the epochs of metrics.jsonl, to restore it beside this checkpoint
                "dataset": data.name,
                "preprocess": data.preprocess,
                **({"structure": structure} if structure is not None else {}),
            },
        )
    distributed.barrier()  # no rank looks at this stage's files before they are written
    console.print(
        f"[green]{stage}[/]: test accuracy {metrics['test_accuracy']:.4f}, {metrics['nonzero_params']:,} of "
        f"{metrics['params']:,} parameters non-zero, saved {path} ({metrics['seconds']:.1f} s)"
    )
    return metrics


def _metrics_lines(history: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in history)


def _restore_metrics_file(metrics_path: Path, ckpt: dict) -> None:
    """Make ``metrics.jsonl`` describe the checkpoint beside it again.

    A process killed between writing a checkpoint and its metrics.jsonl, or a kdc from before the
    running log was kept apart (:data:`RUNNING_LOG`), can leave other epochs there.
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
    atomic_write_text(path.parent / "metrics.jsonl", _metrics_lines(payload["history"]))
    for done in (state_path, path.parent / RUNNING_LOG):  # the finished checkpoint supersedes both
        if done.exists():
            done.unlink()


def _write_resolved_recipe(recipe: Recipe) -> None:
    text = "# resolved recipe written by kdc: every value, defaults included\n" + yaml.safe_dump(
        recipe_to_dict(recipe), sort_keys=False
    )
    atomic_write_text(recipe.run_dir / "recipe.yaml", text)


def load_stage_model(recipe: Recipe, stage: str, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """A stage's trained model, on ``device``, and its architecture spec.

    Only the model ``recipe`` names for the stage is built: a checkpoint naming another is refused.
    """
    ckpt = load_checkpoint(checkpoint_path(recipe.run_dir, stage))
    model = build_from_checkpoint(ckpt, where=f"{stage} checkpoint", expected=stage_named(stage).model(recipe))
    return model.to(device), ckpt["arch"]


def _new_model(recipe: Recipe, which: str, data: DataSplits, device: torch.device):
    section = getattr(recipe, which)
    spec = model_spec(section.model, section.args, data.num_classes, data.input_shape)
    return build_model(spec, where=f"{which}.model").to(device), spec


def _ce(logits, y, idx, x):
    return F.cross_entropy(logits, y)


def _teacher_cache_path(ctx: _StageContext) -> tuple[Path, str]:
    """Where the teacher's training-split logits live, keyed by the teacher checkpoint and the data."""
    teacher_sha = read_manifest(checkpoint_path(ctx.recipe.run_dir, "teacher"))["sha256"]
    key = hashlib.sha256(f"{teacher_sha}|{ctx.data.identity}".encode()).hexdigest()[:16]
    return ctx.recipe.run_dir / "cache" / f"teacher-logits-{key}.pt", key


def cached_teacher_logits(ctx: _StageContext, teacher: torch.nn.Module) -> torch.Tensor:
    """The teacher's logits for the training split, computed once and reused across stages and runs.

    Rank 0 computes and stores them; a changed teacher checkpoint or dataset gives a new key.
    """
    path, key = _teacher_cache_path(ctx)
    if distributed.is_main() and not path.is_file():
        started = time.perf_counter()
        logits = teacher_logits(teacher, ctx.data.train, ctx.recipe.data.eval_batch_size, ctx.device)
        save_state(path, {"key": key, "logits": logits.cpu()})
        ctx.console.print(f"{ctx.stage}: cached the teacher's logits in {path} ({time.perf_counter() - started:.1f} s)")
        distributed.barrier()  # the other ranks read the file once it is there
        return logits
    distributed.barrier()
    try:
        cache = torch.load(path, map_location="cpu", weights_only=True)
        logits = cache["logits"]
        if cache.get("key") != key or logits.shape[0] != len(ctx.data.train):
            raise ValueError("key or size mismatch")
    except Exception as exc:
        raise CheckpointError(
            f"the teacher-logit cache {path} is damaged ({type(exc).__name__}); delete it and rerun"
        ) from None
    return logits.to(ctx.device)


def _distill_loss(ctx: _StageContext, warm_up: bool = False) -> tuple:
    """The distillation loss of ``distill.loss`` and the hooks it needs, as ``(loss, hooks)`` for :func:`_fit`.

    Without augmentation the teacher's logits come from the cache; with it the teacher runs online.
    ``warm_up``: DKD's term rises over ``distill.dkd_warmup`` epochs (for a student trained from scratch).
    """
    recipe = ctx.recipe
    teacher = load_stage_model(recipe, "teacher", ctx.device)[0].eval()
    d = recipe.distill
    if d.loss != "kd":
        logit_loss, hooks = _logit_loss(d, min(d.dkd_warmup, d.epochs) if warm_up else 0)
        if _augment(recipe):
            return _online_kd_loss(teacher, logit_loss), hooks
        cached = cached_teacher_logits(ctx, teacher)

        def loss(logits, y, idx, x):
            return logit_loss(logits, cached.index_select(0, idx.to(cached.device)), y)

        return loss, hooks
    temperature, alpha = d.temperature, d.alpha
    if _augment(recipe):
        return _online_kd_loss(teacher, lambda s, t, y: kd_loss(s, t, y, temperature, alpha)), []
    log_p = teacher_log_probs(cached_teacher_logits(ctx, teacher), temperature)  # once per stage, not per batch

    def loss(logits, y, idx, x):
        return kd_loss_from_log_probs(logits, log_p.index_select(0, idx.to(log_p.device)), y, temperature, alpha)

    return loss, []


class _EpochClock(Hook):
    """Knows which epoch :func:`fit` is in (from the global step, so it is right after a resume too)."""

    epoch = 0

    def on_batch_start(self, step: int, batches_per_epoch: int) -> None:
        self.epoch = step // max(1, batches_per_epoch)


def _logit_loss(d, warmup: int):
    """``(loss(student_logits, teacher_logits, targets), hooks)`` for dkd or a user's loss (``d``: the distill section).

    dkd follows the paper: ``CE + warm-up factor * (dkd_alpha TCKD + dkd_beta NCKD)``, the factor rising
    over ``warmup`` epochs.
    """
    fn = get_loss(d.loss)
    if d.loss == "dkd":
        clock = _EpochClock()

        def dkd(s, t, y):
            factor = dkd_warmup_factor(clock.epoch, warmup)
            return F.cross_entropy(s, y) + factor * fn(s, t, y, d.dkd_alpha, d.dkd_beta, d.temperature)

        return dkd, [clock]
    args = dict(d.loss_args)

    def user(s, t, y):
        value = fn(s, t, y, args)
        if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.requires_grad:
            what = (
                type(value).__name__
                if not isinstance(value, torch.Tensor)
                else (
                    f"a tensor of shape {tuple(value.shape)}" if value.numel() != 1 else "a tensor without a gradient"
                )
            )
            raise KdcError(
                f"distill.loss: {d.loss} returned {what}; it must return a scalar tensor computed from the "
                f"student's logits (its first argument)"
            )
        return value.reshape(())

    return user, []


def _online_kd_loss(teacher: torch.nn.Module, logit_loss):
    """A loss that runs the teacher on every (augmented) batch, in eval mode without gradients."""

    def loss(logits, y, idx, x):
        with torch.inference_mode():
            target = teacher(x).float()
        return logit_loss(logits, target.clone(), y)

    return loss


def _augment(recipe: Recipe) -> Augment | None:
    augment = Augment(recipe.data.crop_padding, recipe.data.hflip)
    return augment if augment else None


def _fit(ctx: _StageContext, model, loss, settings: TrainSettings, hooks=()):
    recipe = ctx.recipe
    # last: resume states list the hooks in order, and this one keeps no state
    board = (
        [_TensorBoard(recipe.run_dir / "tensorboard" / ctx.stage)]
        if (recipe.report.tensorboard and distributed.is_main())
        else []
    )
    try:
        return fit(
            model,
            loss,
            ctx.data,
            settings,
            batch_size=recipe.data.batch_size,
            eval_batch_size=recipe.data.eval_batch_size,
            device=ctx.device,
            seed=stage_seed(recipe, ctx.stage),
            stage=ctx.stage,
            metrics_path=ctx.log_path,
            hooks=[*hooks, *board],
            console=ctx.console,
            state_path=ctx.state_path,
            state_tag=ctx.tag,
            runtime=Runtime(
                precision=recipe.run.precision,
                channels_last=recipe.run.channels_last,
                compile=recipe.run.compile,
                augment=_augment(recipe),
            ),
            progress=ctx.progress,
        )
    finally:
        for writer in board:
            writer.close()


class _TensorBoard(Hook):
    """Writes every epoch's metrics as TensorBoard scalars to ``log_dir`` (``report.tensorboard: true``).

    Tags: ``loss/train``, ``loss/test`` (``loss/val`` with a validation split), ``accuracy/...``, ``lr``,
    ``sparsity`` when pruning, ``seconds``; the step is the epoch. A stage that starts over (from epoch 1)
    first removes the event files an earlier run of it left, so its curves are not drawn twice; a resumed
    one adds to them.
    """

    _SKIP = ("stage", "epoch", "pruning_steps")

    def __init__(self, log_dir: Path):
        self.writer_class = tensorboard_writer_class()  # check_recipe has checked; this names it for fit's users
        self.log_dir = Path(log_dir)
        self.writer = None

    def on_epoch_end(self, record: dict) -> None:
        if self.writer is None:
            if record["epoch"] == 1 and self.log_dir.is_dir():
                for old in self.log_dir.glob("events.out.tfevents.*"):
                    old.unlink()
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.writer = self.writer_class(log_dir=str(self.log_dir))
        for key, value in record.items():
            if key in self._SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            split, _, what = key.partition("_")
            tag = f"{what}/{split}" if what in ("loss", "accuracy") and split in ("train", "val", "test") else key
            self.writer.add_scalar(tag, value, record["epoch"])
        self.writer.flush()  # an interrupted run keeps the epochs it finished

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _stage_teacher(ctx: _StageContext):
    t = ctx.recipe.teacher
    if t.checkpoint:  # the user's own teacher: evaluated and saved as this run's, never trained
        from .supplied import supplied_teacher

        model, spec, info = supplied_teacher(
            ctx.recipe, ctx.data.num_classes, ctx.data.input_shape, ctx.data.preprocess
        )
        return model.to(ctx.device), spec, [], info  # no epochs: its metrics.jsonl is written empty
    model, spec = _new_model(ctx.recipe, "teacher", ctx.data, ctx.device)
    extra = {}
    if t.pretrained:
        from .supplied import load_pretrained

        extra = load_pretrained(model, t.model.split(":", 1)[1])
        ctx.console.print(f"teacher: starting from the pretrained weights in {extra['pretrained_from']}")
    return model, spec, _fit(ctx, model, _ce, t), extra


def _stage_student(ctx: _StageContext):
    model, spec = _new_model(ctx.recipe, "student", ctx.data, ctx.device)
    return model, spec, _fit(ctx, model, _ce, ctx.recipe.distill), {}


def _stage_distilled(ctx: _StageContext):
    model, spec = _new_model(ctx.recipe, "student", ctx.data, ctx.device)  # same seed and init as the baseline
    if ctx.recipe.distill.features:
        # the student and its hint adapters train as one module, so fit's optimiser and resume state hold both;
        # the stage returns the bare student, whose checkpoint has no adapter weights
        trained, loss, hooks = _feature_distill(ctx, model, warm_up=True)
        return model, spec, _fit(ctx, trained, loss, ctx.recipe.distill, hooks=hooks), {}
    loss, hooks = _distill_loss(ctx, warm_up=True)
    return model, spec, _fit(ctx, model, loss, ctx.recipe.distill, hooks=hooks), {}


class _FeatureStudent(torch.nn.Module):
    """The student plus one adapter per feature term (nn.Identity for ``at``), trained together.

    Its forward returns the student's logits and keeps, in ``features``, each term's student output passed
    through its adapter; the adapters run inside forward so that DDP sees them used.
    """

    def __init__(self, student: torch.nn.Module, names: list[str], adapters: list[torch.nn.Module]):
        super().__init__()
        self.student = student
        self.adapters = torch.nn.ModuleList(adapters)
        self.names = names
        self.features: list[torch.Tensor] = []

    def forward(self, x):
        from .features import FeatureTaps

        with FeatureTaps(self.student, set(self.names), "the student") as taps:
            logits = self.student(x)
        self.features = [adapter(taps[name]) for name, adapter in zip(self.names, self.adapters)]
        return logits


class _FeatureMeter(Hook):
    """Records the mean weighted feature loss of each epoch (``feature_loss`` in metrics.jsonl)."""

    def __init__(self):
        self.total, self.batches = 0.0, 0

    def add(self, value: torch.Tensor) -> None:
        self.total = self.total + value.detach()  # a tensor: no device sync per batch
        self.batches += 1

    def epoch_metrics(self) -> dict:
        mean = float(self.total) / max(1, self.batches)
        self.total, self.batches = 0.0, 0
        return {"feature_loss": mean}


def _feature_distill(ctx: _StageContext, student: torch.nn.Module, warm_up: bool = False) -> tuple:
    """``(module to train, loss, hooks)`` for ``distill.features``: the logit loss plus the weighted feature terms.

    The teacher runs online on every batch (eval mode, no gradients), giving its logits for the logit loss
    (kd, dkd or the user's) and its tapped features; the logit cache is not used. ``hint`` adapters are built
    from a dry-run batch (check_recipe has already checked the pairs line up).
    """
    from .checks import check_feature_terms
    from .features import FeatureTaps, at_loss, make_adapter

    recipe, d = ctx.recipe, ctx.recipe.distill
    teacher = load_stage_model(recipe, "teacher", ctx.device)[0].eval()
    terms = list(d.features)
    pairs = check_feature_terms(terms, teacher, student, ctx.data.input_shape, device=ctx.device)
    student.train()

    adapters = [
        make_adapter(s, t) if term.loss == "hint" else torch.nn.Identity() for term, (s, t) in zip(terms, pairs)
    ]
    wrapper = _FeatureStudent(student, [t.student for t in terms], adapters).to(ctx.device)
    if d.loss == "kd":
        temperature, alpha = d.temperature, d.alpha
        logit_loss, hooks = (lambda s, t, y: kd_loss(s, t, y, temperature, alpha)), []
    else:
        logit_loss, hooks = _logit_loss(d, min(d.dkd_warmup, d.epochs) if warm_up else 0)
    meter = _FeatureMeter()
    teacher_names = {t.teacher for t in terms}

    def loss(logits, y, idx, x):
        with torch.no_grad(), FeatureTaps(teacher, teacher_names, "the teacher") as taps:
            target = teacher(x).float()
        total = logit_loss(logits, target, y)
        feature_total = 0.0
        for term, s_feat in zip(terms, wrapper.features):
            t_feat = taps[term.teacher].float()
            s_feat = s_feat.float()
            value = at_loss(s_feat, t_feat) if term.loss == "at" else F.mse_loss(s_feat, t_feat)
            feature_total = feature_total + term.weight * value
        meter.add(feature_total)
        return total + feature_total

    return wrapper, loss, [*hooks, meter]


def _stage_pruned(ctx: _StageContext):
    model, spec = load_stage_model(ctx.recipe, "distilled", ctx.device)
    p = ctx.recipe.prune
    # check_recipe, run at the start of every stage, has made sure include/exclude leave weights to prune and
    # planned this schedule on one process; this is the plan for the batches each process really trains on
    bpe = batches_per_epoch(len(ctx.data.train), ctx.recipe.data.batch_size, distributed.world_size())
    schedule = plan_schedule(p, bpe)
    pruner = make_pruner(model, p, spec["input_shape"])
    # no DKD warm-up here: the distilled student it starts from has learnt from the full term already
    loss, loss_hooks = _distill_loss(ctx) if p.distill else (_ce, [])
    hook = _Pruning(pruner, schedule)
    history = _fit(ctx, model, loss, p, hooks=[hook, *loss_hooks])  # the pruning hook first: resume states list it so
    if hook.steps_taken < len(schedule.at):  # the plan fits in retraining, so only a kdc bug gets here
        raise KdcError(
            f"prune: retraining ended after {hook.steps_taken} of {len(schedule.at)} pruning steps, at sparsity "
            f"{pruner.sparsity():.3f}, short of the target {p.target_sparsity}"
        )
    extra = {"target_sparsity": p.target_sparsity, "pruning_steps": hook.steps_taken, "method": p.method}
    if p.method == "structured":
        # the share of prunable channels removed (the weights left hold no zeros: the channels are gone)
        extra.update(channel_sparsity=pruner.sparsity(), structure=pruner.history())
    return model, spec, history, extra


def make_pruner(model: torch.nn.Module, p, input_shape):
    """The pruner a recipe's ``prune`` section asks for, on ``model`` (structured: channels; else weights)."""
    if p.method == "structured":
        from .prune.structured import StructuredPruner  # torch-pruning is imported only when it is used

        return StructuredPruner(
            model, input_shape, importance=p.importance, scope=p.scope, include=p.include, exclude=p.exclude
        )
    return MagnitudePruner(model, p.rate, p.target_sparsity, p.scope, p.include, p.exclude)


_RUN = {  # each declared stage's run function: stages.STAGES names them, so declaring one imports no torch
    stage.name: globals()[stage.run] for stage in STAGES
}
