"""Recipes: a typed, validated description of one kdc run, loaded from YAML.

A recipe is plain YAML with the sections ``run``, ``data``, ``teacher``,
``student``, ``distill``, ``prune`` and ``report``. Every key is optional and
has a default; unknown keys, wrong types and out-of-range values are reported
all at once, each with its key path and YAML line::

    >>> from kdcompress.recipe import load_recipe
    >>> recipe = load_recipe("recipes/quickstart.yaml", overrides=["distill.temperature=2"])
    >>> recipe.distill.temperature
    2.0

A recipe is code the user chose to run: ``model: package.module:factory``
imports and calls that factory. kdc never takes import paths from anywhere
else (not from checkpoints, not from the network).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import types
import typing
import unicodedata
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .bounds import first_oversized, value_children, value_size
from .errors import Problem, RecipeError, describe, did_you_mean
from .names import add_import_dir, dataset_name_problem, loss_name_problem, model_name_problem, names_user_code

__all__ = [
    "Recipe",
    "RunSection",
    "DataSection",
    "TrainSettings",
    "TeacherSection",
    "StudentSection",
    "DistillSection",
    "FeatureTerm",
    "PruneSection",
    "ReportSection",
    "ExportSection",
    "load_recipe",
    "CODE_KEYS",
    "parse_recipe",
    "read_yaml",
    "MAX_YAML_SIZE",
    "recipe_from_dict",
    "recipe_to_dict",
    "section_fingerprint",
    "builtin_recipe_path",
    "pruning_steps_needed",
]


def _range(lo=None, hi=None, lo_open=False, hi_open=False, doc=""):
    """Field metadata: an allowed numeric range and a one-line description."""
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "doc": doc}


def _doc(text):
    return {"doc": text}


@dataclass(frozen=True)
class RunSection:
    name: str = field(
        default="quickstart",
        metadata=_doc("run directory name: <out_dir>/<name>; default: the recipe file's name without .yaml"),
    )
    seed: int = field(default=0, metadata=_range(lo=0, doc="seed for weights, shuffling and splits"))
    # not an input of any stage: each seed is a run directory of its own, made with run.seed set to it
    seeds: list[int] = field(
        default_factory=list,
        metadata=_doc(
            "several seeds, e.g. [0, 1, 2] (kdc run --seeds 3): the teacher is trained once (with the first seed), "
            "every other stage once per seed; the first seed's run is this run directory, seed s's is "
            "<run dir>/seeds/seed-s; the report gives each stage's mean and std over the seeds"
        ),
    )
    device: str = field(default="auto", metadata=_doc("auto, cpu, cuda or cuda:N"))
    out_dir: str = field(default="runs", metadata=_doc("folder that holds run directories"))
    threads: Optional[int] = field(default=None, metadata=_range(lo=1, doc="CPU threads (default: all cores)"))
    precision: Literal["fp32", "bf16"] = field(default="fp32", metadata=_doc("bf16 autocast on CUDA (fp32 on CPU)"))
    channels_last: bool = field(default=False, metadata=_doc("channels-last memory format on CUDA"))
    compile: bool = field(default=False, metadata=_doc("torch.compile the model being trained"))
    bn_recalibrate: int = field(
        default=0,
        metadata=_range(
            lo=0,
            doc="after training, recompute BatchNorm running statistics from this many training batches (0 = off)",
        ),
    )


@dataclass(frozen=True)
class DataSection:
    dataset: str = field(
        default="fashion-mnist-mini",
        metadata=_doc("fashion-mnist-mini (shipped), fashion-mnist, mnist, imagefolder:PATH or package.module:factory"),
    )
    root: Optional[str] = field(default=None, metadata=_doc("data folder; else $KDC_DATA, else a cache dir"))
    batch_size: int = field(default=128, metadata=_range(lo=1, doc="training batch size"))
    eval_batch_size: int = field(default=1000, metadata=_range(lo=1, doc="evaluation batch size"))
    val_split: float = field(
        default=0.0,
        metadata=_range(lo=0.0, hi=1.0, hi_open=True, doc="share of training data held out for validation"),
    )
    crop_padding: int = field(default=0, metadata=_range(lo=0, doc="augment: random crop after zero padding (pixels)"))
    hflip: bool = field(default=False, metadata=_doc("augment: random horizontal flip"))
    # input: False -- how batches are read, not what they hold: changing it retrains no stage
    workers: int = field(
        default=2,
        metadata={**_range(lo=0, doc="DataLoader workers (imagefolder and your own datasets)"), "input": False},
    )


@dataclass(frozen=True)
class TrainSettings:
    """Optimiser and schedule settings shared by every training stage."""

    epochs: int = field(default=5, metadata=_range(lo=0, doc="epochs of training"))
    optimizer: Literal["sgd", "adam", "adamw"] = field(default="sgd", metadata=_doc("sgd, adam or adamw"))
    lr: float = field(default=0.05, metadata=_range(lo=0.0, lo_open=True, doc="learning rate"))
    momentum: float = field(default=0.9, metadata=_range(lo=0.0, hi=1.0, hi_open=True, doc="SGD momentum"))
    weight_decay: float = field(default=0.0, metadata=_range(lo=0.0, doc="L2 weight decay"))
    schedule: Literal["constant", "step", "cosine"] = field(
        default="cosine", metadata=_doc("learning-rate schedule: constant, step or cosine")
    )
    step_size: int = field(default=10, metadata=_range(lo=1, doc="epochs between decays (schedule: step)"))
    gamma: float = field(
        default=0.1, metadata=_range(lo=0.0, hi=1.0, lo_open=True, doc="decay factor (schedule: step)")
    )


@dataclass(frozen=True)
class TeacherSection(TrainSettings):
    model: str = field(default="cnn", metadata=_doc("mlp, cnn, lenet5, torchvision:NAME or package.module:factory"))
    args: dict = field(default_factory=dict, metadata=_doc("keyword arguments for the model factory"))
    epochs: int = field(default=8, metadata=_range(lo=0, doc="epochs of training"))
    # input: False -- the file's content is what the teacher is made from (the teacher stage's inputs hold its
    # SHA-256, teacher.checkpoint_sha256), not where it lies
    checkpoint: Optional[str] = field(
        default=None,
        metadata={
            **_doc(
                "your own trained teacher, not trained again: a state_dict file (torch.save(model.state_dict())) "
                "of teacher.model/args, or a kdc checkpoint (<run dir>/teacher/model.pt); a relative path is "
                "looked up in the current directory, then in the recipe's folder"
            ),
            "input": False,
        },
    )
    pretrained: bool = field(
        default=False,
        metadata=_doc(
            "torchvision:NAME teachers: start from torchvision's ImageNet weights, read from the local torch hub "
            "cache (never downloaded); a new classifier head when the data has other than 1000 classes"
        ),
    )
    # omit_default: added after run directories existed; at null the teacher keeps the fingerprint it had
    seed: Optional[int] = field(
        default=None,
        metadata={
            **_range(
                lo=0,
                doc="the teacher's own seed (default: run.seed); kdc run --seeds pins it to the first seed, "
                "so that every seed distils from the one teacher",
            ),
            "omit_default": True,
        },
    )


@dataclass(frozen=True)
class StudentSection:
    model: str = field(default="mlp", metadata=_doc("mlp, cnn, lenet5, torchvision:NAME or package.module:factory"))
    # No default arguments here: each model has its own (the MLP's hidden=(100,)), and another model's would break it
    args: dict = field(default_factory=dict, metadata=_doc("keyword arguments for the model factory"))
    baseline: bool = field(
        default=True,
        metadata=_doc("also train the student alone with cross-entropy (the 'student' row), with the distill settings"),
    )


@dataclass(frozen=True)
class FeatureTerm:
    """One ``distill.features`` term: a student module's output matched to a teacher module's output."""

    teacher: str = field(default="", metadata=_doc("the teacher module's dotted path (model.named_modules())"))
    student: str = field(default="", metadata=_doc("the student module's dotted path (model.named_modules())"))
    loss: Literal["hint", "at"] = field(
        default="hint",
        metadata=_doc(
            "hint (FitNets: MSE through a trainable 1x1 conv or linear adapter) or at (attention transfer: "
            "feature maps of the same height and width)"
        ),
    )
    weight: float = field(default=1.0, metadata=_range(lo=0.0, lo_open=True, doc="weight of this term in the loss"))


@dataclass(frozen=True)
class DistillSection(TrainSettings):
    temperature: float = field(default=4.0, metadata=_range(lo=0.0, lo_open=True, doc="softmax temperature T"))
    alpha: float = field(
        default=0.5,
        metadata=_range(lo=0.0, hi=1.0, doc="kd: weight of the soft (teacher) term (1 - alpha: cross-entropy)"),
    )
    # The keys below came after run directories existed: "omit_default" leaves a key at its default out of the
    # stage fingerprints, so adding them made no existing distilled or pruned stage out of date.
    loss: str = field(
        default="kd",
        metadata={
            **_doc("kd (Hinton), dkd (decoupled KD, Zhao et al. 2022) or package.module:function for your own"),
            "omit_default": True,
        },
    )
    dkd_alpha: float = field(
        default=1.0,
        metadata={**_range(lo=0.0, doc="dkd: weight of TCKD (target vs other classes)"), "omit_default": True},
    )
    dkd_beta: float = field(
        default=8.0,
        metadata={**_range(lo=0.0, doc="dkd: weight of NCKD (among the other classes)"), "omit_default": True},
    )
    dkd_warmup: int = field(
        default=20,
        metadata={
            **_range(
                lo=0,
                doc="dkd: epochs over which the DKD term rises linearly to full weight (at most the "
                "distill epochs; 0: none)",
            ),
            "omit_default": True,
        },
    )
    loss_args: dict = field(
        default_factory=dict,
        metadata={
            **_doc("your own loss: the args dict it is called with, fn(student_logits, teacher_logits, targets, args)"),
            "omit_default": True,
        },
    )
    features: list[FeatureTerm] = field(
        default_factory=list,
        metadata={
            **_doc(
                "feature terms added to the distilled stage's loss: a list of {teacher: module path, "
                "student: module path, loss: hint | at, weight: w}; the teacher then runs online"
            ),
            "omit_default": True,
        },
    )


@dataclass(frozen=True)
class PruneSection(TrainSettings):
    rate: float = field(
        default=0.3,
        metadata=_range(
            lo=0.0,
            hi=1.0,
            lo_open=True,
            hi_open=True,
            doc="fraction of still-non-zero prunable weights removed per step (schedule: iterative; channels when "
            "structured)",
        ),
    )
    target_sparsity: float = field(
        default=0.9,
        metadata=_range(
            lo=0.0,
            hi=1.0,
            hi_open=True,
            doc="fraction of all prunable weights that end at zero (channels when structured)",
        ),
    )
    # Not 'schedule': every training section's 'schedule' is its learning-rate schedule (prune.schedule: cosine)
    sparsity_schedule: Literal["iterative", "agp", "one-shot"] = field(
        default="iterative",
        metadata=_doc(
            "how sparsity rises: iterative (rate of what is left per step), agp (Zhu & Gupta's cubic ramp) or "
            "one-shot (all at the first batch)"
        ),
    )
    every: Union[Literal["auto"], float] = field(
        default="auto",
        metadata=_range(
            lo=0.0,
            lo_open=True,
            doc="auto (the steps spread evenly over the first two thirds of retraining) or epochs between steps",
        ),
    )
    steps: Union[Literal["auto"], int] = field(
        default="auto",
        metadata=_range(lo=1, doc="agp: pruning steps after the start (auto: as many as iterative takes at rate)"),
    )
    initial_sparsity: float = field(
        default=0.0,
        metadata=_range(lo=0.0, hi=1.0, hi_open=True, doc="agp: sparsity at the first step (s_i)"),
    )
    method: Literal["unstructured", "structured"] = field(
        default="unstructured",
        metadata=_doc(
            "unstructured: zero single weights (masks); structured: remove whole conv channels and linear neurons, "
            "so the model gets smaller and faster (rate and target_sparsity then count channels)"
        ),
    )
    importance: Literal["l1", "l2", "bn_scale"] = field(
        default="l1",
        metadata=_doc("structured: which channels go first; l1 or l2 norm of the channel's group, or BatchNorm scale"),
    )
    scope: Literal["global", "layer"] = field(default="global", metadata=_doc("rank weights globally or per layer"))
    include: list[str] = field(default_factory=lambda: ["*"], metadata=_doc("module-name patterns to prune"))
    exclude: list[str] = field(default_factory=list, metadata=_doc("module-name patterns to leave dense"))
    distill: bool = field(default=True, metadata=_doc("retrain with the distillation loss (else cross-entropy)"))
    epochs: int = field(default=8, metadata=_range(lo=0, doc="epochs of retraining"))
    lr: float = field(default=0.01, metadata=_range(lo=0.0, lo_open=True, doc="learning rate"))


@dataclass(frozen=True)
class ReportSection:
    latency: bool = field(default=True, metadata=_doc("measure CPU inference latency for each stage"))
    latency_batches: list[int] = field(
        default_factory=lambda: [1, 64], metadata=_doc("batch sizes for the latency measurement, each >= 1")
    )
    threads: int = field(
        default=2,
        metadata=_range(lo=1, doc="CPU threads for the latency measurement (fewer if the machine has fewer cores)"),
    )
    # Kept so that recipes and run directories written before latency_batches still load: a value here
    # measures that one batch size, as it did then.
    latency_batch: Optional[int] = field(
        default=None, metadata=_range(lo=1, doc="deprecated: one batch size; use latency_batches")
    )
    # omit_default: added after run directories existed. No stage reads this section today; marked like the
    # other late keys so that a stage that ever comes to read it keeps its fingerprint while it is false.
    tensorboard: bool = field(
        default=False,
        metadata={
            **_doc(
                "also write TensorBoard scalars every epoch to <run dir>/tensorboard/<stage>/ (needs "
                "`pip install tensorboard`)"
            ),
            "omit_default": True,
        },
    )


@dataclass(frozen=True)
class ExportSection:
    formats: list[Literal["sparse", "shared", "int8", "onnx"]] = field(
        default_factory=list,
        metadata=_doc("artifacts `kdc run` writes to <run dir>/export/: sparse, shared, int8, onnx (none: no export)"),
    )
    stage: Literal["teacher", "student", "distilled", "pruned"] = field(
        default="pruned", metadata=_doc("the stage whose model is exported")
    )
    dtype: Literal["fp16", "fp32"] = field(
        default="fp16", metadata=_doc("sparse: precision of the stored non-zeros (fp32 round-trips bit for bit)")
    )
    codec: Literal["lzma", "zlib"] = field(default="lzma", metadata=_doc("sparse, shared: entropy coder of the file"))
    bits: int = field(default=4, metadata=_range(lo=2, hi=8, doc="shared: bits per weight index (2**bits centroids)"))
    calibration_batches: int = field(
        default=8, metadata=_range(lo=1, doc="int8: training batches that calibrate the activation ranges")
    )


@dataclass(frozen=True)
class Recipe:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    student: StudentSection = field(default_factory=StudentSection)
    distill: DistillSection = field(default_factory=DistillSection)
    prune: PruneSection = field(default_factory=PruneSection)
    report: ReportSection = field(default_factory=ReportSection)
    export: ExportSection = field(default_factory=ExportSection)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name


# --------------------------------------------------------------------------- loading


# The recipe values that can name code to import (package.module:name), each with the NAME: forms that are not
# import paths. kdc imports them for a recipe the user gave; a run directory's recipe.yaml only when trusted.
CODE_KEYS: dict[str, tuple[str, ...]] = {
    "teacher.model": ("torchvision",),
    "student.model": ("torchvision",),
    "data.dataset": ("imagefolder",),
    "distill.loss": (),
}


def builtin_recipe_path(name: str = "quickstart") -> Path:
    """Path of a recipe shipped inside the package (``quickstart`` is the default)."""
    return Path(str(resources.files("kdcompress") / "recipes" / f"{name}.yaml"))


def load_recipe(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    import_folder: bool = True,
    import_code: bool = True,
) -> Recipe:
    """Read, override and validate a recipe; raise :class:`RecipeError` listing every problem.

    ``path=None`` loads the built-in quickstart recipe. ``overrides`` are
    ``key.path=value`` strings, converted with the schema's types. Without a
    ``run.name``, the run is named after the file (``recipes/cifar.yaml`` writes
    ``runs/cifar``). Import paths in the recipe (``model: mynets:build``) find
    modules in the current directory and in the recipe's directory, as
    ``python -m`` would; they are imported to check that they name something.

    A run directory's ``recipe.yaml`` is data: ``import_folder=False`` leaves
    its folder off the import path, and ``import_code=False`` imports none of
    the code it names (values listed in :data:`CODE_KEYS` are then left
    unchecked, for the caller to refuse or trust: see :mod:`kdcompress.trust`).
    """
    builtin = path is None
    path = builtin_recipe_path() if builtin else Path(path)
    source = str(path)
    if not path.is_file():
        hint = "check the path" if not path.exists() else "it is a folder, not a file"
        raise RecipeError(source, [Problem("", f"recipe file not found ({hint}); `kdc validate PATH` checks a recipe")])
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(source, [Problem("", f"cannot read the recipe: {exc}")]) from None
    if not builtin and import_folder:
        add_import_dir(path.parent)
    # file paths in the recipe are looked up as import paths are: the current directory, then the recipe's folder
    folders = [Path.cwd()] + ([path.parent] if not builtin else [])
    return parse_recipe(
        text,
        source=source,
        overrides=overrides,
        default_name=_run_name_from(path),
        search_dirs=folders,
        import_code=import_code,
    )


def _run_name_from(path: Path) -> str:
    """A run directory name from a recipe file's name: ``my recipe (v2).yaml`` -> ``my-recipe-v2``."""
    # Only letters, digits, '_', '-' and '.' survive, so the name is one plain folder in any shell and file
    # system; a leading dot would hide it (or, as '..', climb out of out_dir).
    name = re.sub(r"[^\w.-]+", "-", path.stem).strip(".-")
    return name or "run"


def parse_recipe(
    text: str,
    source: str = "<recipe>",
    overrides: list[str] | None = None,
    default_name: str | None = None,
    search_dirs: list[Path] | None = None,
    import_code: bool = True,
) -> Recipe:
    """Validate recipe text (YAML); see :func:`load_recipe` (and its ``import_code``).

    ``default_name`` is the ``run.name`` when the text and the overrides set none
    (else the schema's default, ``quickstart``). ``search_dirs`` are the folders a
    relative ``teacher.checkpoint`` is looked up in, in order (default: the current
    directory); the recipe returned holds the absolute path of the file found.
    """
    raw, lines, problems = read_yaml(text, source)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(source, [Problem("", f"a recipe is a mapping of sections, got {_kind(raw)}", 1)])
    for item in overrides or []:
        path = _apply_override(raw, item, problems)
        if path is not None:  # problems with this value point at the override, not at a file line
            for key in [k for k in lines if k[: len(path)] == path]:
                del lines[key]
            lines[path] = f"--set {item}"
    if default_name is not None:
        if raw.get("run") is None:  # no run section, or an empty one
            raw["run"] = {}
        if isinstance(raw["run"], dict):
            raw["run"].setdefault("name", default_name)
    recipe = _convert(raw, Recipe, (), lines, problems)
    problems.extend(_run_name_checks(recipe.run, lines))
    problems.extend(_name_checks(raw, lines, import_code))
    recipe = _resolve_files(recipe, lines, problems, search_dirs or [Path.cwd()])
    if not problems:
        problems.extend(_cross_checks(recipe, lines))
    if problems:
        # in file order (a stable sort: problems from --set, which have no line, come first)
        problems.sort(key=lambda p: p.line if isinstance(p.line, int) else 0)
        raise RecipeError(source, problems)
    return recipe


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``5e-2``, ``1e3`` and ``-2.5E-4`` as numbers, as YAML 1.2 and ``--set`` do.

    PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent, so
    ``lr: 5e-2`` would be the text '5e-2'.
    """


_FLOAT_12 = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
# A copy of SafeLoader's table with its float pattern swapped in place (SafeLoader's own stays as it is); the
# order matters: the float pattern is tried before the int one.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, _FLOAT_12 if tag == "tag:yaml.org,2002:float" else regexp) for tag, regexp in resolvers]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


# A recipe holds a few hundred values. An alias (*name) stands for everything its anchor (&name) holds without
# copying it, so 400 bytes with nine aliases per level stand for billions of values, and whatever walks the data
# (the line index, the schema check, JSON and YAML dumps, fingerprints) would walk every one of them. A document
# bigger than this once written out in full is refused before anything that size is built.
MAX_YAML_SIZE = 100_000  # values, plus the characters of each text value


def read_yaml(text: str, source: str = "<yaml>") -> tuple[Any, dict[tuple, int], list[Problem]]:
    """Parse YAML the way kdc reads every YAML: recipes, a run directory's recipe.yaml, ``--set`` values.

    Returns the data, the 1-based line of each key path and a :class:`Problem` for each duplicate key.
    Numbers follow YAML 1.2 (``5e-2`` is a number); ``!!python`` tags are refused. The document's node
    graph is measured before it is built, each node once, so the work stays proportional to the text: a
    document that would hold more than ``MAX_YAML_SIZE`` values and characters once its aliases are
    written out, or whose aliases make a value contain itself, raises :class:`RecipeError` naming the key
    path and line. A key under an alias has no line of its own; its problems point at the alias.
    """
    loader = None
    try:
        loader = _Loader(text)  # the reader already refuses unprintable characters here
        node = loader.get_single_node()
        lines: dict[tuple, int] = {}
        problems: list[Problem] = []
        if node is None:
            return None, lines, problems
        found = first_oversized(node, _node_children, _node_size, MAX_YAML_SIZE)
        if found is not None:
            raise RecipeError(source, [_oversized_problem(*found)])
        _index_lines(node, (), lines, problems, set())
        return loader.construct_document(node), lines, problems
    except yaml.YAMLError as exc:
        raise RecipeError(source, [_yaml_problem(exc)]) from None
    except RecursionError:
        raise RecipeError(source, [Problem("", "the YAML is nested too deeply to be a recipe")]) from None
    finally:
        if loader is not None:
            loader.dispose()


def _node_children(node: yaml.Node) -> list[tuple[Any, yaml.Node]]:
    if isinstance(node, yaml.MappingNode):
        return [
            (getattr(k, "value", "?") if isinstance(k, yaml.ScalarNode) else "?", child)
            for k, v in node.value
            for child in (k, v)
        ]
    if isinstance(node, yaml.SequenceNode):
        return list(enumerate(node.value))
    return []


def _node_size(node: yaml.Node) -> int:
    return 1 + len(node.value) if isinstance(node, yaml.ScalarNode) else 1


def _oversized_problem(path: tuple, value: Any, container: Any, cyclic: bool) -> Problem:
    """The Problem for what :func:`first_oversized` found (with a YAML line when the values are YAML nodes)."""
    mark = getattr(container, "start_mark", None)
    line = mark.line + 1 if mark is not None else None
    if cyclic:
        return Problem(
            _dotted(path),
            "is an alias (*name) inside the very value its anchor (&name) names, so the "
            "value would contain itself without end; write the value out instead",
            line,
        )
    return Problem(
        _dotted(path),
        f"is too big for a recipe: written out in full (each alias *name replaced by "
        f"what its anchor &name holds) it holds more than {MAX_YAML_SIZE:,} values and characters; write "
        f"the values out, or alias fewer of them",
        line,
    )


def _yaml_problem(exc: yaml.YAMLError) -> Problem:
    """One Problem for a YAML syntax error, placed where the broken construct starts."""
    problem = getattr(exc, "problem", None) or describe(exc)
    mark = getattr(exc, "problem_mark", None)
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    if context and context_mark is not None:
        # e.g. an unclosed quote: the error surfaces at the end of the file, the cause is where it opened
        return Problem(
            "",
            f"YAML syntax error {context} at column {context_mark.column + 1}: {problem}{where}",
            context_mark.line + 1,
        )
    col = f", column {mark.column + 1}" if mark is not None else ""
    return Problem("", f"YAML syntax error{col}: {problem}", mark.line + 1 if mark is not None else None)


def recipe_from_dict(data: dict, source: str = "<dict>") -> Recipe:
    """Validate a plain dict (for example a resolved recipe stored in a checkpoint)."""
    found = first_oversized(data, value_children, value_size, MAX_YAML_SIZE)
    if found is not None:  # a dict from a checkpoint can share (or contain) its own parts too
        raise RecipeError(source, [_oversized_problem(*found)])
    problems: list[Problem] = []
    recipe = _convert(copy.deepcopy(data), Recipe, (), {}, problems)
    problems.extend(_run_name_checks(recipe.run, {}))
    if not problems:
        problems.extend(_cross_checks(recipe, {}))
    if problems:
        raise RecipeError(source, problems)
    return recipe


def recipe_to_dict(recipe: Any) -> dict:
    """Plain, JSON-able dict of a recipe or one of its sections."""
    return json.loads(json.dumps(dataclasses.asdict(recipe)))


def section_fingerprint(*parts: Any) -> str:
    """Stable short hash of recipe sections (and any JSON-able extras)."""
    blob = json.dumps([recipe_to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pruning_steps_needed(rate: float, target: float) -> int:
    """Number of steps that each remove ``rate`` of what is left, to reach ``target`` sparsity."""
    if target <= 0:
        return 0
    # kept after n steps is (1 - rate)^n; the last step is trimmed to land exactly on the target.
    exact = math.log1p(-target) / math.log1p(-rate)
    return max(1, math.ceil(exact - 1e-9)) if math.isfinite(exact) else 10**18


# --------------------------------------------------------------------------- internals


def _index_lines(node: yaml.Node, path: tuple, lines: dict, problems: list[Problem], seen: set) -> None:
    """Record the 1-based line of every key path; report duplicate keys.

    Walks the node graph, each node once (``seen``: the ids of the nodes indexed): the keys inside a value
    reached again through an alias keep no line of their own, so an alias-heavy document costs no more
    than its text.
    """
    lines.setdefault(path, node.start_mark.line + 1)
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys: set = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # a list or mapping as a key: building the document refuses it, with its line
            key = key_node.value
            if key in keys:
                problems.append(
                    Problem(_dotted(path + (key,)), "duplicate key; keep one", key_node.start_mark.line + 1)
                )
            keys.add(key)
            lines[path + (key,)] = key_node.start_mark.line + 1
            _index_lines(value_node, path + (key,), lines, problems, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, child in enumerate(node.value):
            _index_lines(child, path + (i,), lines, problems, seen)


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return {
        dict: "a mapping",
        list: "a list",
        str: "text",
        bool: "true/false",
        int: "an integer",
        float: "a number",
    }.get(type(value), type(value).__name__)


def _line(lines: dict, path: tuple) -> int | str | None:
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return None


_suggest = did_you_mean


# Keys people bring from other tools, which difflib does not find (too short, or too different): the key as
# written, lower case -> the recipe's keys it may mean, tried in order against the section's own keys.
_SYNONYMS: dict[str, tuple[str, ...]] = {
    "learning_rate": ("lr",),
    "learningrate": ("lr",),
    "base_lr": ("lr",),
    "lr0": ("lr",),
    "eta": ("lr",),
    "lr_schedule": ("schedule",),
    "lr_scheduler": ("schedule",),
    "scheduler": ("schedule",),
    "lr_policy": ("schedule",),
    "sched": ("schedule",),
    "num_epochs": ("epochs",),
    "n_epochs": ("epochs",),
    "max_epochs": ("epochs",),
    "num_train_epochs": ("epochs",),
    "train_epochs": ("epochs",),
    "t": ("temperature",),
    "temp": ("temperature",),
    "tau": ("temperature",),
    "kd_temperature": ("temperature",),
    "soft_weight": ("alpha",),
    "kd_weight": ("alpha",),
    "kd_alpha": ("alpha",),
    "lambda": ("alpha",),
    "wd": ("weight_decay",),
    "l2": ("weight_decay",),
    "weightdecay": ("weight_decay",),
    "optim": ("optimizer",),
    "opt": ("optimizer",),
    "optimiser": ("optimizer",),
    "solver": ("optimizer",),
    "lr_step": ("step_size",),
    "decay_epochs": ("step_size",),
    "lr_decay": ("gamma",),
    "decay_rate": ("gamma",),
    "lr_gamma": ("gamma",),
    "sparsity": ("target_sparsity",),
    "final_sparsity": ("target_sparsity",),
    "target": ("target_sparsity",),
    "amount": ("rate",),
    "prune_rate": ("rate",),
    "pruning_rate": ("rate",),
    "ratio": ("rate",),
    "frequency": ("every",),
    "interval": ("every",),
    "prune_every": ("every",),
    "arch": ("model",),
    "architecture": ("model",),
    "network": ("model",),
    "net": ("model",),
    "name": ("model", "dataset"),
    "kwargs": ("args",),
    "model_args": ("args",),
    "model_kwargs": ("args",),
    "params": ("args",),
    "bs": ("batch_size",),
    "batch": ("batch_size",),
    "train_batch_size": ("batch_size",),
    "test_batch_size": ("eval_batch_size",),
    "val_batch_size": ("eval_batch_size",),
    "num_workers": ("workers",),
    "n_workers": ("workers",),
    "data_dir": ("root",),
    "data_root": ("root",),
    "data_path": ("root",),
    "dataset_root": ("root",),
    "path": ("root",),
    "dataset_name": ("dataset",),
    "output_dir": ("out_dir",),
    "output": ("out_dir",),
    "save_dir": ("out_dir",),
    "runs_dir": ("out_dir",),
    "random_seed": ("seed",),
    "manual_seed": ("seed",),
    "gpu": ("device",),
    "cuda": ("device",),
    "amp": ("precision",),
    "dtype": ("precision",),
    "mixed_precision": ("precision",),
    "num_threads": ("threads",),
    "validation_split": ("val_split",),
    "train_baseline": ("baseline",),
    "pruning_schedule": ("sparsity_schedule",),
    "prune_schedule": ("sparsity_schedule",),
    "num_steps": ("steps",),
    "n_steps": ("steps",),
    "start_sparsity": ("initial_sparsity",),
}


def _key_hint(key: Any, tp: Any) -> str:
    """'; did you mean ...' (or where the key belongs) for an unknown key of section type ``tp``."""
    names = [f.name for f in dataclasses.fields(tp)]
    word = str(key)
    meant = _SYNONYMS.get(word.lower(), ())
    for candidate in meant:  # first, so that teacher.name means teacher.model, not run.name
        if candidate in names:
            return f"; did you mean '{candidate}'?"
    if _owners(word):  # a real key, in the wrong section (or at the top level)
        return f"; {_belongs(word)}"
    close = _suggest(word, names)
    if close:
        return close
    for candidate in meant:
        if _owners(candidate):
            return f"; did you mean '{candidate}'? {_belongs(candidate)}"
    return ""


def _owners(key: str) -> list[str]:
    """The sections that have ``key`` (none: an empty list)."""
    hints = _type_hints(Recipe)
    return [s.name for s in dataclasses.fields(Recipe) if key in {f.name for f in dataclasses.fields(hints[s.name])}]


def _belongs(key: str) -> str:
    """Where ``key`` is set, in words."""
    sections = _owners(key)
    if set(sections) == {"teacher", "distill", "prune"}:
        return (
            f"'{key}' is a training setting of each stage: teacher.{key}, distill.{key} (which also trains the "
            f"student baseline) or prune.{key}"
        )
    return f"'{key}' belongs in {' or '.join(f'{s}.{key}' for s in sections)}"


def _type_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _convert(value: Any, tp: Any, path: tuple, lines: dict, problems: list[Problem]) -> Any:
    """Check ``value`` against type ``tp``; return the converted value (or a default on error)."""
    where = _dotted(path)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            problems.append(Problem(where, f"expected a mapping of settings, got {_kind(value)}", _line(lines, path)))
            return tp()
        hints = _type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        kwargs = {}
        for key, item in value.items():
            if key not in fields:
                known = ", ".join(fields)
                problems.append(
                    Problem(
                        _dotted(path + (key,)),
                        f"unknown key{_key_hint(key, tp)} (known keys: {known})",
                        _line(lines, path + (key,)),
                    )
                )
                continue
            before = len(problems)
            converted = _convert(item, hints[key], path + (key,), lines, problems)
            if len(problems) == before:
                problems.extend(_check_range(converted, fields[key], path + (key,), lines))
                kwargs[key] = converted
        return tp(**kwargs)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(value, inner[0], path, lines, problems)
        tried = {}
        for option in inner:  # the first type that takes the value, in the order the schema lists them
            trial: list[Problem] = []
            converted = _convert(value, option, path, lines, trial)
            if not trial:
                return converted
            tried[option] = trial
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        for option in (int, float):  # a number that is not the right one: the number's own problem (not finite, ...)
            if number and option in tried:
                problems.extend(tried[option])
                return None
        words = " or ".join(_type_words(option) for option in inner)
        choices = [c for option in inner if typing.get_origin(option) is Literal for c in typing.get_args(option)]
        hint = _suggest(value, choices) if isinstance(value, str) else ""
        problems.append(Problem(where, f"expected {words}, got {_kind(value)} {value!r}{hint}", _line(lines, path)))
        return None
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            problems.append(
                Problem(
                    where,
                    f"must be one of {', '.join(map(str, choices))}, got {value!r}"
                    + (_schedule_hint(value, path) or _suggest(value, choices)),
                    _line(lines, path),
                )
            )
            return choices[0]
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(Problem(where, f"expected a list, got {_kind(value)}", _line(lines, path)))
            return []
        (inner,) = typing.get_args(tp) or (Any,)
        return [_convert(v, inner, path + (i,), lines, problems) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            problems.append(Problem(where, f"expected a mapping, got {_kind(value)}", _line(lines, path)))
            return {}
        return value
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(Problem(where, f"expected true or false, got {_kind(value)} {value!r}", _line(lines, path)))
            return False
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            problems.append(Problem(where, f"expected an integer, got {_kind(value)} {value!r}", _line(lines, path)))
            return 0
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(Problem(where, f"expected a number, got {_kind(value)} {value!r}", _line(lines, path)))
            return 0.0
        if value != value or value in (float("inf"), float("-inf")):
            problems.append(Problem(where, f"expected a finite number, got {value!r}", _line(lines, path)))
            return 0.0
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(Problem(where, f"expected text, got {_kind(value)} {value!r}", _line(lines, path)))
            return ""
        return value
    raise TypeError(f"recipe schema uses an unsupported type {tp!r} at {where}")  # a bug, not user input


def _schedule_hint(value: Any, path: tuple) -> str:
    """For ``schedule: agp``: the learning-rate schedule key was given a pruning schedule."""
    pruning = typing.get_args(_type_hints(PruneSection)["sparsity_schedule"])
    if path and path[-1] == "schedule" and value in pruning:
        return (
            f"; {value} is a pruning schedule: set prune.sparsity_schedule (schedule is the learning-rate "
            f"schedule of each training section)"
        )
    return ""


def _type_words(tp: Any) -> str:
    """A schema type in words, for 'expected ...' messages: ``auto``, ``a number``."""
    if typing.get_origin(tp) is Literal:
        return " or ".join(str(c) for c in typing.get_args(tp))
    return {int: "an integer", float: "a number", str: "text", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _check_range(value: Any, f: dataclasses.Field, path: tuple, lines: dict) -> list[Problem]:
    meta = f.metadata
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return []
    lo, hi = meta.get("lo"), meta.get("hi")
    bad = (lo is not None and (value <= lo if meta.get("lo_open") else value < lo)) or (
        hi is not None and (value >= hi if meta.get("hi_open") else value > hi)
    )
    if not bad:
        return []
    parts = []
    if lo is not None:
        parts.append(f"{'>' if meta.get('lo_open') else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if meta.get('hi_open') else '<='} {hi}")
    what = meta.get("doc", "")
    return [
        Problem(
            _dotted(path),
            f"must be {' and '.join(parts)}, got {value!r}" + (f" ({what})" if what else ""),
            _line(lines, path),
        )
    ]


def _schema_type(path: list[str]) -> tuple[Any, str | None]:
    """The schema type at a dotted path, or (None, error message)."""
    tp: Any = Recipe
    for i, key in enumerate(path):
        if not dataclasses.is_dataclass(tp):
            if tp is dict or typing.get_origin(tp) is dict:
                return Any, None  # free-form model arguments
            return None, f"'{'.'.join(path[:i])}' has no sub-keys"
        names = [f.name for f in dataclasses.fields(tp)]
        if key not in names:
            return None, f"unknown key '{'.'.join(path[: i + 1])}'{_key_hint(key, tp)} (known keys: {', '.join(names)})"
        tp = _type_hints(tp)[key]
    return tp, None


def _number(text: str, tp: type) -> int | float | None:
    try:
        return int(text) if tp is int else float(text)
    except ValueError:
        return None


def _apply_override(raw: dict, item: str, problems: list[Problem]) -> tuple | None:
    """Apply one ``key.path=value`` override to the raw recipe dict; return its key path."""
    where = f"--set {item}"
    if "=" not in item:
        problems.append(Problem(where, "expected KEY.PATH=VALUE, for example distill.temperature=4"))
        return
    key, text = item.split("=", 1)
    keys = [k for k in key.strip().split(".")]
    if not all(keys):
        problems.append(Problem(where, "empty key in the path; expected KEY.PATH=VALUE"))
        return
    tp, error = _schema_type(keys)
    if error:
        problems.append(Problem(where, error))
        return
    inner = (
        [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (Union, types.UnionType)
        else [tp]
    )
    numeric = [a for a in inner if a in (int, float)]  # every: auto | <epochs> takes numbers too
    if tp is str or (typing.get_origin(tp) in (Union, types.UnionType) and str in typing.get_args(tp)):
        value: Any = text if text.lower() not in ("null", "~") or tp is str else None
    elif numeric and _number(text, numeric[0]) is not None:
        value = _number(text, numeric[0])  # 1e-3 is a number here, though YAML 1.1 reads it as text
    else:
        try:
            value = read_yaml(text, where)[0]
        except RecipeError as exc:
            reason = "; ".join(f"{p.path} {p.message}" if p.path else p.message for p in exc.problems)
            problems.append(Problem(where, f"cannot read the value {text!r}: {reason}"))
            return
    node = raw
    for k in keys[:-1]:
        child = node.get(k)
        # a copy: the section may be an alias of another (args: *shared), which must keep its value
        child = dict(child) if isinstance(child, dict) else {}
        node[k] = child
        node = child
    node[keys[-1]] = value
    return tuple(keys)


def _name_checks(raw: dict, lines: dict, import_code: bool = True) -> list[Problem]:
    """Model, dataset and loss names that resolve to nothing, each with its line, beside every other problem.

    Reads the raw document, since a section with any other problem converts to
    its defaults. Only for recipes read from text (a recipe is code its user
    chose to run): :func:`recipe_from_dict` imports nothing.
    """
    problems = []
    for section, key, check in (
        ("teacher", "model", model_name_problem),
        ("student", "model", model_name_problem),
        ("data", "dataset", dataset_name_problem),
        ("distill", "loss", loss_name_problem),
    ):
        name = raw.get(section, {}).get(key) if isinstance(raw.get(section), dict) else None
        if not import_code and isinstance(name, str) and names_user_code(name, CODE_KEYS[f"{section}.{key}"]):
            continue  # code a file that is data names: not imported here, even to check it
        message = check(name) if isinstance(name, str) else None  # another type is reported as such
        if message:
            problems.append(Problem(f"{section}.{key}", message, _line(lines, (section, key))))
    return problems


def _run_name_checks(run: RunSection, lines: dict) -> list[Problem]:
    """``run.name`` is one folder inside ``run.out_dir``: a name that would climb out of it (``..``, a path,
    an absolute path) or that names no folder (empty, control characters) is refused before anything is
    written."""
    name = run.name
    if not name.strip():
        why = "is empty"
    elif name in (".", ".."):
        why = f"is {name!r}, {'run.out_dir itself' if name == '.' else 'the folder above run.out_dir'}"
    elif "/" in name or "\\" in name:
        why = f"is a path ({name!r}), not a folder name"
    elif any(unicodedata.category(c) == "Cc" for c in name):
        why = f"holds a control character ({name!r})"
    else:
        return []
    return [
        Problem(
            "run.name",
            f"{why}: run.name is a folder name inside run.out_dir; use run.out_dir to put runs elsewhere "
            f"(e.g. run: {{out_dir: /data/runs, name: exp1}})",
            _line(lines, ("run", "name")),
        )
    ]


_SCHEDULE_STEPS = {
    "iterative": "its steps follow from rate and target_sparsity",
    "one-shot": "one step",
}


def _cross_checks(recipe: Recipe, lines: dict) -> list[Problem]:
    """Checks that involve more than one value."""
    problems = []
    problems.extend(_report_checks(recipe.report, lines))
    t = recipe.teacher
    if t.pretrained and t.checkpoint:
        problems.append(
            Problem(
                "teacher.pretrained",
                "and teacher.checkpoint both give the teacher's weights; keep one (teacher.checkpoint: your trained "
                "teacher, used as it is; teacher.pretrained: torchvision's ImageNet weights, then trained)",
                _line(lines, ("teacher", "pretrained")),
            )
        )
    elif t.pretrained and not t.model.startswith("torchvision:"):
        problems.append(
            Problem(
                "teacher.pretrained",
                f"needs a torchvision model (teacher.model: torchvision:NAME), got {t.model!r}; for your own trained "
                f"weights use teacher.checkpoint: PATH",
                _line(lines, ("teacher", "pretrained")),
            )
        )
    if recipe.export.formats and recipe.export.stage == "student" and not recipe.student.baseline:
        problems.append(
            Problem(
                "export.stage",
                "is student, but student.baseline is false, so no student stage is trained; export pruned or distilled, "
                "or set student.baseline: true",
                _line(lines, ("export", "stage")) or _line(lines, ("export",)),
            )
        )
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", recipe.run.device):
        problems.append(
            Problem(
                "run.device",
                f"must be auto, cpu, cuda or cuda:N, got {recipe.run.device!r}",
                _line(lines, ("run", "device")),
            )
        )
    problems.extend(_loss_checks(recipe.distill, lines))
    seeds = recipe.run.seeds
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        problems.append(
            Problem(
                "run.seeds",
                f"must be distinct seeds of 0 or more, e.g. [0, 1, 2], got {list(seeds)}",
                _line(lines, ("run", "seeds")),
            )
        )
    # Whether the pruning steps fit in retraining depends on the batches per epoch, which needs the data:
    # kdcompress.checks.check_recipe plans the schedule (prune.schedule.plan_schedule) as the run will.
    p = recipe.prune
    where = lambda key: _line(lines, ("prune", key)) or _line(lines, ("prune",))  # noqa: E731
    if p.sparsity_schedule != "agp":  # keys that only agp reads would be silently ignored
        if p.steps != "auto":
            problems.append(
                Problem(
                    "prune.steps",
                    f"sets the number of agp steps, but prune.sparsity_schedule is {p.sparsity_schedule} "
                    f"({_SCHEDULE_STEPS[p.sparsity_schedule]}); set prune.sparsity_schedule: agp, or drop prune.steps",
                    where("steps"),
                )
            )
        if p.initial_sparsity:
            problems.append(
                Problem(
                    "prune.initial_sparsity",
                    f"is the starting sparsity of agp, but prune.sparsity_schedule is {p.sparsity_schedule}; set "
                    f"prune.sparsity_schedule: agp, or drop prune.initial_sparsity",
                    where("initial_sparsity"),
                )
            )
    elif p.target_sparsity > 0 and p.initial_sparsity >= p.target_sparsity:
        problems.append(
            Problem(
                "prune.initial_sparsity",
                f"{p.initial_sparsity} must be below prune.target_sparsity ({p.target_sparsity}): agp rises from one to "
                f"the other",
                where("initial_sparsity"),
            )
        )
    return problems


def _resolve_files(recipe: Recipe, lines: dict, problems: list[Problem], folders: list[Path]) -> Recipe:
    """The recipe with ``teacher.checkpoint`` made absolute: the first of ``folders`` that holds it.

    Absolute, so that the resolved recipe a run directory keeps (``kdc distill runs/NAME``) still finds it.
    A file found nowhere is a problem that names every place looked at.
    """
    given = recipe.teacher.checkpoint
    if not given:
        return recipe
    where = ("teacher", "checkpoint")
    path = Path(given).expanduser()
    tried = [path] if path.is_absolute() else [Path(os.path.abspath(folder / path)) for folder in folders]
    for candidate in tried:
        if candidate.is_file():
            return dataclasses.replace(recipe, teacher=dataclasses.replace(recipe.teacher, checkpoint=str(candidate)))
    folder = next((c for c in tried if c.is_dir()), None)
    if folder is not None:
        inside = folder / "teacher" / "model.pt"
        hint = (
            f"; did you mean the teacher of that run directory, {inside}?"
            if inside.is_file()
            else "; give the file itself"
        )
        problems.append(
            Problem("teacher.checkpoint", f"{folder} is a folder, not a weights file{hint}", _line(lines, where))
        )
        return recipe
    looked = " and ".join(str(c) for c in dict.fromkeys(tried))
    relative = (
        ""
        if path.is_absolute()
        else " (a relative path is looked up in the current directory, then in the recipe's folder)"
    )
    problems.append(
        Problem(
            "teacher.checkpoint",
            f"file not found: looked for {looked}{relative}; give the path of a state_dict file "
            f"(torch.save(model.state_dict(), PATH)) or of a kdc checkpoint (<run dir>/teacher/model.pt)",
            _line(lines, where),
        )
    )
    return recipe


def _loss_checks(d: DistillSection, lines: dict) -> list[Problem]:
    """Distillation keys the chosen ``distill.loss`` does not read: set to anything but their defaults, refused."""
    default = DistillSection()
    builtin = d.loss in ("kd", "dkd")
    unused = {  # key -> why it does nothing with this loss
        "dkd_alpha": d.loss != "dkd",
        "dkd_beta": d.loss != "dkd",
        "dkd_warmup": d.loss != "dkd",
        "loss_args": builtin,
        "alpha": d.loss != "kd",
        "temperature": not builtin,
    }
    reads = {
        "kd": "kd reads temperature and alpha",
        "dkd": "dkd reads temperature, dkd_alpha, dkd_beta and dkd_warmup (cross-entropy keeps weight 1, as in the "
        "paper)",
    }.get(d.loss, "your own loss reads only distill.loss_args")
    fix = {  # what would read the key
        "dkd_alpha": "set distill.loss: dkd, or drop distill.{key}",
        "dkd_beta": "set distill.loss: dkd, or drop distill.{key}",
        "dkd_warmup": "set distill.loss: dkd, or drop distill.{key}",
        "loss_args": "set distill.loss to your package.module:function, or drop distill.{key}",
        "alpha": "drop distill.{key}"
        if builtin
        else "pass what your loss needs in distill.loss_args, and drop distill.{key}",
        "temperature": "pass what your loss needs in distill.loss_args, and drop distill.{key}",
    }
    problems = []
    for i, term in enumerate(d.features):  # module paths are looked up in the built models by check_recipe
        for side in ("teacher", "student"):
            if not getattr(term, side):
                problems.append(
                    Problem(
                        f"distill.features.{i}.{side}",
                        f"is missing: each feature term names a {side} module by its dotted path (model.named_modules(), "
                        f"e.g. features.3)",
                        _line(lines, ("distill", "features", i)) or _line(lines, ("distill", "features")),
                    )
                )
    for key, is_unused in unused.items():
        if is_unused and getattr(d, key) != getattr(default, key):
            problems.append(
                Problem(
                    f"distill.{key}",
                    f"is not used by distill.loss {d.loss} ({reads}); {fix[key].format(key=key)}",
                    _line(lines, ("distill", key)) or _line(lines, ("distill",)),
                )
            )
    return problems


def _report_checks(report: ReportSection, lines: dict) -> list[Problem]:
    """Latency batch sizes: at least one, each >= 1; the deprecated single size only on its own."""
    problems = []
    where = ("report", "latency_batches")
    if not report.latency_batches:
        problems.append(
            Problem("report.latency_batches", "needs at least one batch size, e.g. [1, 64]", _line(lines, where))
        )
    for i, batch in enumerate(report.latency_batches):
        if batch < 1:
            message = f"must be >= 1, got {batch!r} (a batch size)"
            problems.append(Problem(f"report.latency_batches.{i}", message, _line(lines, where + (i,))))
    given = where in lines or report.latency_batches != ReportSection().latency_batches  # lines: keys in the text
    if report.latency_batch is not None and given:
        problems.append(
            Problem(
                "report.latency_batch",
                f"is the old name of report.latency_batches; keep only latency_batches (latency_batch: "
                f"{report.latency_batch} means latency_batches: [{report.latency_batch}])",
                _line(lines, ("report", "latency_batch")),
            )
        )
    return problems
