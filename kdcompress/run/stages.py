"""The stages of a kdc run, each declared once.

A stage's declaration holds its name (its folder and report row), its command, its descriptions, the
recipe values it reads, the stages it reads checkpoints from and the function that runs it. The
fingerprint (what makes a stage out of date), the CLI's stage commands, the order of ``kdc run`` and
the report's rows all come from here, so a new stage is one new entry::

    >>> from kdcompress.run.stages import STAGES, stage_named
    >>> [stage.command for stage in STAGES]
    ['train-teacher', 'train-student', 'distill', 'prune']
    >>> stage_named("distilled").upstream(None)
    ('teacher',)

This module imports no torch, so ``kdc --help`` stays fast: the function that runs each stage is in
:data:`kdcompress.run.bodies.RUNNERS`, keyed by the stage's name.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Callable

from ..files import file_sha256
from ..recipe import IMAGEFOLDER_KEYS, Recipe, TrainSettings

__all__ = [
    "Stage",
    "STAGES",
    "STAGE_NAMES",
    "COMMAND_OF",
    "COMMON_READS",
    "stage_named",
    "teacher_inputs",
]


@dataclass(frozen=True)
class Stage:
    """One stage of a run, declared once: the fingerprint, the CLI, the order and the report come from here.

    ``reads`` lists the recipe values the stage is made from: a dotted key (``distill.temperature``) or a
    whole section (``teacher``), whose keys marked ``input: False`` in the schema (``data.workers``: how
    batches are read, not what they hold) are left out. A value not listed can never make the stage rerun.
    ``refine_inputs(recipe, found)`` adjusts what was read: the teacher's adds the SHA-256 of a supplied
    ``teacher.checkpoint`` file and drops the training schedule it does not use.
    A key marked ``omit_default`` (``distill.loss``) counts only once it differs from its default.
    ``upstream(recipe)`` names the stages whose checkpoints it reads; ``enabled(recipe)`` whether
    ``kdc run`` runs it. The function that trains it and returns ``(model, spec, history, extra metrics)``
    is ``kdcompress.run.bodies.RUNNERS[name]`` (kept apart, so that declaring stages imports no torch).
    ``options`` are CLI shortcuts for recipe keys: ``(option name, dotted key, help, float or str)``.
    ``epochs(recipe)`` is how many epochs it trains (0: not trained) and ``trains`` which model, ``teacher`` or
    ``student``: the run's progress display estimates the time left from them.
    """

    name: str
    command: str
    summary: str
    description: str
    example: str
    reads: tuple[str, ...]
    upstream: Callable[[Recipe], tuple[str, ...]] = lambda recipe: ()
    enabled: Callable[[Recipe], bool] = lambda recipe: True
    options: tuple[tuple[str, str, str, type], ...] = ()
    # what the stage is made from beyond ``reads``: (resolved recipe, inputs read) -> the inputs
    refine_inputs: Callable[[dict, dict], dict] = lambda recipe, found: found
    epochs: Callable[[Recipe], int] = lambda recipe: 0
    trains: str = "student"  # stages that train the same model run at about the same batches per second

    def inputs(self, recipe: dict) -> dict:
        """``{dotted key: value}`` of what this stage reads, from a resolved recipe dict."""
        return self.refine_inputs(recipe, _read_fields(recipe, self.reads))

    def model(self, recipe: Recipe) -> str:
        """The model name ``recipe`` gives this stage's network (``teacher.model`` or ``student.model``).

        The only model kdc builds from this stage's checkpoint and artifacts: a name read from a file is compared
        with it (:func:`kdcompress.models.check_model_name`), never imported on its own say-so.
        """
        return getattr(recipe, self.trains).model


COMMON_READS = ("run.seed", "run.bn_recalibrate", "data")


def _read_fields(recipe: dict, reads: tuple[str, ...]) -> dict:
    found = {}
    for key in reads:
        section, _, name = key.partition(".")
        quiet = _quiet_defaults(section)
        if section == "data" and str(recipe["data"].get("dataset", "")).startswith("imagefolder:"):
            # these keys changed what an image folder's models are fed (channels, normalisation): counted even
            # at their defaults, so that a folder's run made before them is out of date
            quiet = {k: v for k, v in quiet.items() if k not in IMAGEFOLDER_KEYS}
        if name:
            if not (name in quiet and recipe[section][name] == quiet[name]):
                found[key] = recipe[section][name]
        else:
            skip = _not_inputs(section)
            found.update(
                {
                    f"{section}.{k}": v
                    for k, v in recipe[section].items()
                    if k not in skip and not (k in quiet and v == quiet[k])
                }
            )
    return found


def _quiet_defaults(section: str) -> dict:
    """``{key: default}`` for the keys of a section marked ``omit_default``: at their default, no input at all.

    A key added to a section after run directories were made carries this mark, so that the
    stages reading it keep the fingerprints they had (and stay up to date) until it is changed.
    """
    cls = typing.get_type_hints(Recipe)[section]
    quiet = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(cls)
        if f.metadata.get("omit_default")
    }
    # a nested section (prune.budget) is compared as the plain mapping the recipe holds
    return {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in quiet.items()}


def _not_inputs(section: str) -> set[str]:
    """The keys of a recipe section whose schema marks them ``input: False``."""
    cls = typing.get_type_hints(Recipe)[section]
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("input") is False}


_TRAIN = tuple(f"distill.{f.name}" for f in dataclasses.fields(TrainSettings))  # the baseline's schedule


def teacher_inputs(recipe: dict, found: dict) -> dict:
    """The teacher's inputs: a supplied one (``teacher.checkpoint``) is made from the file's content, not trained.

    So its SHA-256 is an input (a changed file reruns the teacher, and through it every later stage) and the
    training schedule is not. ``teacher.pretrained`` counts only when set, so that runs made before it existed
    keep their fingerprints. ``teacher.seed``, when set, stands in for ``run.seed``: a teacher made at
    ``run.seed=1, teacher.seed=0`` is the one made at ``run.seed=0`` (what ``kdc run --seeds`` relies on).
    """
    teacher = recipe.get("teacher", {})
    # the teacher is made with its own seed when it has one: runs at other run.seed values then share it
    found.pop("teacher.seed", None)
    if teacher.get("seed") is not None:
        found["run.seed"] = teacher["seed"]
    if not found.get("teacher.pretrained"):
        found.pop("teacher.pretrained", None)
    if teacher.get("checkpoint"):
        for f in dataclasses.fields(TrainSettings):
            found.pop(f"teacher.{f.name}", None)
        found["teacher.checkpoint_sha256"] = file_sha256(teacher["checkpoint"])
    return found


STAGES: tuple[Stage, ...] = (
    Stage(
        name="teacher",
        command="train-teacher",
        summary="Train the teacher with cross-entropy (or, with teacher.checkpoint, evaluate the one you supplied).",
        description="teacher, cross-entropy",
        example="kdc train-teacher my-recipe.yaml --set teacher.epochs=5   (`kdc recipes copy quickstart "
        "my-recipe.yaml` makes one)",
        reads=COMMON_READS + ("teacher",),
        refine_inputs=teacher_inputs,
        epochs=lambda recipe: 0 if recipe.teacher.checkpoint else recipe.teacher.epochs,
        trains="teacher",
    ),
    Stage(
        name="student",
        command="train-student",
        summary="Train the student alone with cross-entropy: the baseline that shows what distillation adds.",
        description="student alone, cross-entropy (baseline)",
        example="kdc train-student   (the built-in quickstart recipe)",
        reads=COMMON_READS + ("student.model", "student.args") + _TRAIN,
        enabled=lambda recipe: recipe.student.baseline,
        epochs=lambda recipe: recipe.distill.epochs,
    ),
    Stage(
        name="distilled",
        command="distill",
        summary="Distil the trained teacher into the student (soft targets at temperature T).",
        description="student distilled from the teacher",
        example="kdc distill --set distill.temperature=4 --set distill.alpha=0.5   or, going on from a run "
        "directory with the settings it was made with: kdc distill runs/quickstart --set distill.epochs=2",
        reads=COMMON_READS + ("student.model", "student.args", "distill"),
        upstream=lambda recipe: ("teacher",),
        epochs=lambda recipe: recipe.distill.epochs,
    ),
    Stage(
        name="pruned",
        command="prune",
        summary="Prune the distilled student (single weights by magnitude, or whole channels with "
        "--set prune.method=structured) and retrain it.",
        description="distilled student, pruned and retrained",
        example="kdc prune --rate 0.05   (45 steps to 90 % sparsity, spread over the first two thirds of "
        "retraining);   kdc prune --schedule agp --target 0.95",
        reads=COMMON_READS
        + (
            "prune",
            "distill.temperature",
            "distill.alpha",
            "distill.loss",
            "distill.dkd_alpha",
            "distill.dkd_beta",
            "distill.loss_args",
        ),
        upstream=lambda recipe: ("distilled", "teacher") if recipe.prune.distill else ("distilled",),
        epochs=lambda recipe: recipe.prune.epochs,
        options=(
            (
                "rate",
                "prune.rate",
                "fraction of the still-non-zero prunable weights removed at each pruning step",
                float,
            ),
            ("target", "prune.target_sparsity", "target sparsity: fraction of prunable weights at zero", float),
            ("schedule", "prune.sparsity_schedule", "how sparsity rises: iterative, agp or one-shot", str),
        ),
    ),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
COMMAND_OF = {stage.name: f"kdc {stage.command}" for stage in STAGES}


def stage_named(name: str) -> Stage:
    """The declaration of the stage called ``name``."""
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(f"no stage named {name!r}; the stages are {', '.join(STAGE_NAMES)}")
