"""Whether a stage is up to date: its fingerprint (a hash of the recipe values it declares it reads and of
the checkpoints it reads), its status against the run directory, what changed since it was made, and the
epoch an interrupted run of it would resume from."""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint, read_manifest
from ..errors import CheckpointError, StageOrderError
from ..files import manifest_path
from ..recipe import Recipe, recipe_to_dict
from . import layout
from .stages import COMMAND_OF, stage_named

__all__ = [
    "FINGERPRINT_VERSION",
    "Origin",
    "StageStatus",
    "stage_seed",
    "stage_inputs",
    "stage_fingerprint",
    "stale_dependency",
    "require_upstream",
    "upstream_fingerprints",
    "resume_epoch",
    "stage_status",
    "written_version",
]


FINGERPRINT_VERSION = 2  # 2: hashed from each stage's declared inputs (1: sections listed by hand)


def stage_seed(recipe: Recipe, stage: str) -> int:
    """The seed a stage is trained with: ``teacher.seed`` for the teacher when set, else ``run.seed``.

    The teacher's inputs hold the same value (:func:`kdcompress.run.stages.teacher_inputs`), so a teacher
    pinned to one seed is shared by runs at other seeds.
    """
    if stage == "teacher" and recipe.teacher.seed is not None:
        return recipe.teacher.seed
    return recipe.run.seed


def stage_inputs(recipe: dict, stage: str) -> dict:
    """The recipe values a stage is made from, as ``{dotted key: value}`` (from a resolved recipe dict)."""
    return stage_named(stage).inputs(recipe)


def stage_fingerprint(recipe: Recipe, stage: str, upstream: dict[str, str]) -> str:
    """A short hash of what the stage is made from: its declared inputs and the fingerprints of its upstream checkpoints."""
    blob = {
        "version": FINGERPRINT_VERSION,
        "stage": stage,
        "inputs": stage_inputs(recipe_to_dict(recipe), stage),
        "upstream": upstream,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _changes(old: dict, new: dict, stage: str) -> list[str]:
    """``key: old -> new`` for every input of ``stage`` that differs between two resolved recipes, in recipe order."""
    try:
        before, after = stage_inputs(old, stage), stage_inputs(new, stage)
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


def stale_dependency(recipe: Recipe, stage: str) -> StageStatus | None:
    """The status of the first stage ``stage`` reads that is not up to date, or None."""
    for dep in _deps(recipe, stage):
        status = stage_status(recipe, dep)
        if not status.done:
            return status
    return None


@dataclass(frozen=True)
class Origin:
    """The recipe argument and ``--set`` overrides a recipe was loaded with, for the commands messages suggest.

    The CLI passes one to :func:`kdcompress.run.pipeline.run_stage` and the others; a recipe loaded in
    code has none, and messages then say ``RECIPE``.
    """

    source: str = ""  # the RECIPE argument as given (a file or a run directory); "" for the built-in recipe
    overrides: tuple[str, ...] = ()  # every --set KEY=VALUE, in order

    def hint(self, stage: str | None = None) -> str:
        """The recipe argument and --set overrides this recipe was loaded with, for commands in messages.

        With ``stage``, only the overrides that stage reads, or that say where and how it runs (``run.*``,
        ``data.*``): the teacher's command gets no ``prune.rate``.
        """
        source = self.source or ""
        items = [item for item in self.overrides or () if stage is None or _stage_reads(stage, item)]
        overrides = " ".join(f"--set {shlex.quote(item)}" for item in items)
        return " ".join(part for part in (source, overrides) if part) or "RECIPE"


def _stage_reads(stage: str, override: str) -> bool:
    """Whether ``KEY=VALUE`` sets a value ``stage`` is made from, or where and how it runs."""
    key = override.partition("=")[0].strip()
    if key.partition(".")[0] in ("run", "data"):
        return True
    return any(key == r or key.startswith(f"{r}.") or r.startswith(f"{key}.") for r in stage_named(stage).reads)


def require_upstream(recipe: Recipe, stage: str, origin: Origin = Origin()) -> dict[str, str]:
    """Fingerprints of the checkpoints ``stage`` reads; each must exist and be up to date.

    Else StageOrderError names the commands to run first, with the recipe and overrides of ``origin``.
    """
    stale = stale_dependency(recipe, stage)
    if stale is not None:
        chain = [stale]
        while (deeper := stale_dependency(recipe, chain[-1].stage)) is not None:  # name every command it takes
            chain.append(deeper)
        source = origin.source or ""
        hint = origin.hint()
        again = ""
        if layout.recipe_path(recipe.run_dir).is_file() and Path(source) != recipe.run_dir:
            again = (
                f". To go on with the settings {recipe.run_dir} was made with (earlier --set values included), "
                f"give the run directory instead of the recipe: `{COMMAND_OF[stage]} {recipe.run_dir} --set KEY=VALUE`"
            )
        first = " && ".join(f"{COMMAND_OF[s.stage]} {origin.hint(s.stage)}" for s in reversed(chain))
        raise StageOrderError(
            f"the '{stage}' stage needs the '{stale.stage}' stage first ({stale.reason}); run `{first}`, then "
            f"this command again, or `kdc run {hint}` for every stage{again}"
        )
    return upstream_fingerprints(recipe, stage)


def upstream_fingerprints(recipe: Recipe, stage: str) -> dict[str, str]:
    """The fingerprints recorded in the checkpoints ``stage`` reads (checked up to date by the caller)."""
    return {dep: _read_fingerprint(layout.checkpoint_path(recipe.run_dir, dep)) for dep in _deps(recipe, stage)}


def resume_epoch(recipe: Recipe, stage: str, upstream: dict[str, str]) -> int | None:
    """The last completed epoch of an interrupted run of ``stage`` that the current recipe would resume, else None.

    A resume state made from another recipe (another fingerprint) is not counted: the stage starts over.
    """
    state_path = layout.state_path(recipe.run_dir, stage)
    if not state_path.is_file():
        return None
    try:  # mmap: only the small entries are read, not the weights
        state = torch.load(state_path, map_location="cpu", weights_only=True, mmap=True)
        tag, epoch = state["tag"], int(state["epoch"])
    except Exception:  # damaged: fit says so, with advice, when the stage runs
        return 0
    return epoch if tag == stage_fingerprint(recipe, stage, upstream) else None


def stage_status(recipe: Recipe, stage: str) -> StageStatus:
    """Whether ``stage`` has a checkpoint made from the current recipe and upstream checkpoints.

    The reason of a stage that is not up to date names what changed (``teacher.epochs: 8 -> 2``).
    A stage with an interrupted run to resume is not up to date, even beside an older checkpoint.
    A damaged checkpoint raises CheckpointError: it is never silently reused or overwritten.
    """
    path = layout.checkpoint_path(recipe.run_dir, stage)
    stale = stale_dependency(recipe, stage)
    if stale is not None:
        return StageStatus(stage, False, f"the '{stale.stage}' stage it reads is not up to date: {stale.reason}")
    upstream = upstream_fingerprints(recipe, stage)  # up to date, just checked: no second walk up the stages
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
    expected = stage_fingerprint(recipe, stage, upstream)
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
        changes = _diff_inputs(written_inputs, stage_inputs(recipe_to_dict(recipe), stage))
    else:
        changes = _changes(written, recipe_to_dict(recipe), stage)
    if changes:
        return f"changed since {path} was written: {'; '.join(changes)}"
    if written and written_version(path) != FINGERPRINT_VERSION:
        return f"{path} was written by an earlier kdc, whose fingerprints were made differently; it is made again once"
    return f"{path} was made from an earlier checkpoint of a stage it depends on"
