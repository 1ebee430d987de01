"""Checks a recipe's values need beyond their types and ranges: names, files and keys read together.

Every check returns :class:`~kdcompress.errors.Problem` objects, each with its key path and YAML line
(``lines`` maps key paths to lines), so that a recipe's problems are reported all at once. Names of
models, datasets and losses are checked through :mod:`kdcompress.names`: validation builds no component.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import unicodedata
from pathlib import Path

from ..errors import Problem
from ..names import (
    dataset_name_problem,
    imagefolder_dirs,
    imagefolder_problem,
    loss_name_problem,
    model_name_problem,
    names_user_code,
)
from .schema import (
    BUDGET_KINDS,
    CODE_KEYS,
    IMAGEFOLDER_KEYS,
    DataSection,
    DistillSection,
    PruneSection,
    Recipe,
    ReportSection,
    RunSection,
    TeacherSection,
)

__all__ = [
    "line_of",
    "name_checks",
    "run_name_checks",
    "cross_checks",
    "resolve_files",
    "resolve_imagefolder",
    "find_imagefolder",
]


def line_of(lines: dict, path: tuple) -> int | str | None:
    """The line of ``path`` in the recipe text, else of the nearest key above it that has one (None: none has)."""
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return None


def name_checks(raw: dict, lines: dict, import_code: bool = True, folders: list[Path] | None = None) -> list[Problem]:
    """Model, dataset and loss names that resolve to nothing, each with its line, beside every other problem.

    An ``imagefolder:PATH`` is looked up in ``folders`` (default: the current directory), see
    :func:`find_imagefolder`.

    Reads the raw document, since a section with any other problem converts to
    its defaults. Only for recipes read from text (a recipe is code its user
    chose to run): :func:`kdcompress.recipe.recipe_from_dict` imports nothing.
    """
    problems = []
    for section, key, check in (
        ("teacher", "model", model_name_problem),
        ("student", "model", model_name_problem),
        ("data", "dataset", dataset_name_problem),
        ("distill", "loss", loss_name_problem),
    ):
        name = raw.get(section, {}).get(key) if isinstance(raw.get(section), dict) else None
        if key == "dataset" and isinstance(name, str) and name.startswith("imagefolder:"):
            check = lambda name: find_imagefolder(name, folders or [Path.cwd()])[1]  # noqa: E731
        if not import_code and isinstance(name, str) and names_user_code(name, CODE_KEYS[f"{section}.{key}"]):
            continue  # code a file that is data names: not imported here, even to check it
        message = check(name) if isinstance(name, str) else None  # another type is reported as such
        if message:
            problems.append(Problem(f"{section}.{key}", message, line_of(lines, (section, key))))
    return problems


def run_name_checks(run: RunSection, lines: dict) -> list[Problem]:
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
            line_of(lines, ("run", "name")),
        )
    ]


_SCHEDULE_STEPS = {
    "iterative": "its steps follow from rate and target_sparsity",
    "one-shot": "one step",
}


def cross_checks(recipe: Recipe, lines: dict) -> list[Problem]:
    """Checks that involve more than one value."""
    problems = []
    problems.extend(_report_checks(recipe.report, lines))
    problems.extend(_data_checks(recipe.data, lines))
    problems.extend(_teacher_checks(recipe.teacher, lines))
    problems.extend(_export_checks(recipe, lines))
    problems.extend(_device_checks(recipe.run, lines))
    problems.extend(_loss_checks(recipe.distill, lines))
    problems.extend(_teacher_cache_checks(recipe, lines))
    problems.extend(_seeds_checks(recipe.run, lines))
    # Whether the pruning steps fit in retraining depends on the batches per epoch, which needs the data:
    # kdcompress.run.checks.check_recipe plans the schedule (prune.schedule.plan_schedule) as the run will.
    problems.extend(_prune_checks(recipe.prune, lines))
    problems.extend(_budget_checks(recipe.prune, lines))
    return problems


def _teacher_checks(t: TeacherSection, lines: dict) -> list[Problem]:
    """teacher.pretrained: not with teacher.checkpoint, and only for a torchvision model."""
    problems = []
    if t.pretrained and t.checkpoint:
        problems.append(
            Problem(
                "teacher.pretrained",
                "and teacher.checkpoint both give the teacher's weights; keep one (teacher.checkpoint: your trained "
                "teacher, used as it is; teacher.pretrained: torchvision's ImageNet weights, then trained)",
                line_of(lines, ("teacher", "pretrained")),
            )
        )
    elif t.pretrained and not t.model.startswith("torchvision:"):
        problems.append(
            Problem(
                "teacher.pretrained",
                f"needs a torchvision model (teacher.model: torchvision:NAME), got {t.model!r}; for your own trained "
                f"weights use teacher.checkpoint: PATH",
                line_of(lines, ("teacher", "pretrained")),
            )
        )
    return problems


def _export_checks(recipe: Recipe, lines: dict) -> list[Problem]:
    """export.stage names a stage the run trains."""
    if recipe.export.formats and recipe.export.stage == "student" and not recipe.student.baseline:
        return [
            Problem(
                "export.stage",
                "is student, but student.baseline is false, so no student stage is trained; export pruned or distilled, "
                "or set student.baseline: true",
                line_of(lines, ("export", "stage")) or line_of(lines, ("export",)),
            )
        ]
    return []


def _device_checks(run: RunSection, lines: dict) -> list[Problem]:
    """run.device: auto, cpu, cuda or cuda:N."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", run.device):
        return [
            Problem(
                "run.device",
                f"must be auto, cpu, cuda or cuda:N, got {run.device!r}",
                line_of(lines, ("run", "device")),
            )
        ]
    return []


def _seeds_checks(run: RunSection, lines: dict) -> list[Problem]:
    """run.seeds: distinct, none below 0."""
    seeds = run.seeds
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        return [
            Problem(
                "run.seeds",
                f"must be distinct seeds of 0 or more, e.g. [0, 1, 2], got {list(seeds)}",
                line_of(lines, ("run", "seeds")),
            )
        ]
    return []


def _budget_checks(p: PruneSection, lines: dict) -> list[Problem]:
    """prune.budget: one kind, structured pruning, fractions below 1; allocation and ratios that make sense."""
    problems = []
    where = lambda *key: line_of(lines, ("prune", *key)) or line_of(lines, ("prune",))  # noqa: E731
    b = p.budget
    given = [k for k in BUDGET_KINDS if getattr(b, k) is not None]
    if len(given) > 1:
        problems.append(
            Problem(
                "prune.budget",
                f"sets {', '.join(given)}; a budget is one target: keep one of them",
                where("budget", given[1]),
            )
        )
    if given and p.method != "structured":
        problems.append(
            Problem(
                "prune.budget",
                f"needs prune.method: structured (a budget is met by removing channels; {p.method} pruning leaves "
                f"the model's MACs and latency as they were); set prune.method: structured, or drop prune.budget",
                where("budget"),
            )
        )
    for kind in ("macs", "params", "bytes"):
        value = getattr(b, kind)
        if value is not None and value == 1.0:
            problems.append(
                Problem(
                    f"prune.budget.{kind}",
                    "is 1, the distilled student's own size: nothing to prune; give a fraction below 1 or a count",
                    where("budget", kind),
                )
            )
    if p.allocation != "uniform" and not given:
        problems.append(
            Problem(
                "prune.allocation",
                f"is {p.allocation}, but there is no prune.budget to allocate; set prune.budget (e.g. macs: 0.25) or "
                f"drop prune.allocation",
                where("allocation"),
            )
        )
    bad = [r for r in p.sensitivity_ratios if not 0.0 < r < 1.0]
    if bad or not p.sensitivity_ratios:
        problems.append(
            Problem(
                "prune.sensitivity_ratios",
                f"each ratio must be in (0, 1), got {bad or 'an empty list'}",
                where("sensitivity_ratios"),
            )
        )
    return problems


def _prune_checks(p: PruneSection, lines: dict) -> list[Problem]:
    """Keys only agp reads are refused with another sparsity schedule; agp rises from initial to target."""
    problems = []
    where = lambda key: line_of(lines, ("prune", key)) or line_of(lines, ("prune",))  # noqa: E731
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


def resolve_files(recipe: Recipe, lines: dict, problems: list[Problem], folders: list[Path]) -> Recipe:
    """The recipe with its files found in ``folders``, in order: ``teacher.checkpoint`` and an
    ``imagefolder:PATH`` dataset (see :func:`resolve_imagefolder`).

    ``teacher.checkpoint`` is made absolute, so that the resolved recipe a run directory keeps
    (``kdc distill runs/NAME``) still finds it. A file found nowhere is a problem that names every place
    looked at.
    """
    recipe = resolve_imagefolder(recipe, folders)
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
            Problem("teacher.checkpoint", f"{folder} is a folder, not a weights file{hint}", line_of(lines, where))
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
            line_of(lines, where),
        )
    )
    return recipe


def _teacher_cache_checks(recipe: Recipe, lines: dict) -> list[Problem]:
    """distill.teacher_cache.views: only with augmentation to store views of, and without feature terms."""
    d = recipe.distill
    if d.teacher_cache.views == 0:
        return []
    where = line_of(lines, ("distill", "teacher_cache", "views"))
    if d.features:
        why = (
            "the feature terms in distill.features need the teacher's activations on every batch, so the "
            "teacher runs online; drop distill.teacher_cache, or the feature terms"
        )
        return [Problem("distill.teacher_cache.views", why, where)]
    if not (recipe.data.crop_padding or recipe.data.hflip):
        why = (
            "has no augmentation to store views of (data.crop_padding and data.hflip are off), and without "
            "augmentation the teacher's logits are cached once anyway; turn augmentation on, or drop "
            "distill.teacher_cache"
        )
        return [Problem("distill.teacher_cache.views", why, where)]
    return []


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
                        line_of(lines, ("distill", "features", i)) or line_of(lines, ("distill", "features")),
                    )
                )
    for key, is_unused in unused.items():
        if is_unused and getattr(d, key) != getattr(default, key):
            problems.append(
                Problem(
                    f"distill.{key}",
                    f"is not used by distill.loss {d.loss} ({reads}); {fix[key].format(key=key)}",
                    line_of(lines, ("distill", key)) or line_of(lines, ("distill",)),
                )
            )
    return problems


def _report_checks(report: ReportSection, lines: dict) -> list[Problem]:
    """Latency batch sizes: at least one, each >= 1; the deprecated single size only on its own."""
    problems = []
    where = ("report", "latency_batches")
    if not report.latency_batches:
        problems.append(
            Problem("report.latency_batches", "needs at least one batch size, e.g. [1, 64]", line_of(lines, where))
        )
    for i, batch in enumerate(report.latency_batches):
        if batch < 1:
            message = f"must be >= 1, got {batch!r} (a batch size)"
            problems.append(Problem(f"report.latency_batches.{i}", message, line_of(lines, where + (i,))))
    given = where in lines or report.latency_batches != ReportSection().latency_batches  # lines: keys in the text
    if report.latency_batch is not None and given:
        problems.append(
            Problem(
                "report.latency_batch",
                f"is the old name of report.latency_batches; keep only latency_batches (latency_batch: "
                f"{report.latency_batch} means latency_batches: [{report.latency_batch}])",
                line_of(lines, ("report", "latency_batch")),
            )
        )
    return problems


def find_imagefolder(name: str, folders: list[Path]) -> tuple[str, str | None]:
    """``(name to use, None)`` for ``imagefolder:PATH`` looked up in ``folders`` in order (the current
    directory, then the recipe's folder), as import paths and ``teacher.checkpoint`` are; else ``(name, why)``.

    Found in the first folder, the name stays as written, so runs made before this lookup keep their
    fingerprints; found only in a later one, it is made absolute, so that the recipe a run directory keeps
    still finds it. The folder's own problems (splits, class folders) are given for the folder found; a
    folder found nowhere names every place looked at.
    """
    given = Path(name.split(":", 1)[1]).expanduser()
    tried = [given] if given.is_absolute() else [Path(os.path.abspath(folder / given)) for folder in folders]
    tried = list(dict.fromkeys(tried))
    usable = [c for c in tried if imagefolder_dirs(f"imagefolder:{c}")[1] is None]
    existing = [c for c in tried if c.is_dir()]
    if not usable and not existing:
        relative = (
            ""
            if given.is_absolute()
            else " (a relative path is looked up in the current directory, then in the recipe's folder)"
        )
        return name, (
            f"{name}: folder not found: looked for {' and '.join(str(c) for c in tried)}{relative}; it needs "
            f"PATH/train/<class>/*.png and PATH/test/<class>/... (or val/)"
        )
    found = (usable or existing)[0]
    resolved = name if found == tried[0] else f"imagefolder:{found}"
    return resolved, imagefolder_problem(resolved)


def resolve_imagefolder(recipe: Recipe, folders: list[Path]) -> Recipe:
    """The recipe with its ``imagefolder:PATH`` dataset as :func:`find_imagefolder` finds it (unchanged when it
    is found nowhere: :func:`name_checks` reports that)."""
    name = recipe.data.dataset
    if not name.startswith("imagefolder:"):
        return recipe
    resolved, problem = find_imagefolder(name, folders)
    if problem or resolved == name:
        return recipe
    return dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, dataset=resolved))


def _data_checks(d: DataSection, lines: dict) -> list[Problem]:
    """The image-folder keys: only for ``imagefolder:PATH``, each well formed, ``resize`` only with a size."""
    where = lambda key: line_of(lines, ("data", key)) or line_of(lines, ("data",))  # noqa: E731
    default = DataSection()
    # a key at its default changes nothing, and a resolved recipe (recipe.yaml of a run) spells every key out
    given = {k for k in IMAGEFOLDER_KEYS if getattr(d, k) != getattr(default, k)}
    if not d.dataset.startswith("imagefolder:"):
        return [
            Problem(
                f"data.{key}",
                f"applies to imagefolder:PATH datasets only; {d.dataset} has its own channels, size and "
                f"normalisation, which stay as they are: drop data.{key}",
                where(key),
            )
            for key in IMAGEFOLDER_KEYS
            if key in given
        ]
    problems = []
    if isinstance(d.channels, bool):
        problems.append(Problem("data.channels", f"must be auto, 1 or 3, got {d.channels!r}", where("channels")))
    if d.image_size is not None and (len(d.image_size) != 2 or any(v < 1 for v in d.image_size)):
        problems.append(
            Problem(
                "data.image_size",
                f"must be [height, width], two whole numbers of 1 or more (e.g. [64, 64]), got {d.image_size}",
                where("image_size"),
            )
        )
    if d.image_size is None and "resize" in given:
        problems.append(
            Problem(
                "data.resize",
                "says how images are brought to data.image_size, which is not set; set data.image_size: [height, "
                "width], or drop data.resize",
                where("resize"),
            )
        )
    if isinstance(d.normalize, dict):
        problem = _normalize_problem(d.normalize)
        if problem:
            problems.append(Problem("data.normalize", problem, where("normalize")))
    return problems


def _normalize_problem(given: dict) -> str | None:
    """What is wrong with a ``data.normalize`` mapping ``{mean: [...], std: [...]}``, or None."""
    shape = "must be {mean: [...], std: [...]}, one value per channel in 0-1 units (e.g. {mean: [0.5], std: [0.25]})"
    if set(given) != {"mean", "std"}:
        extra = sorted(map(str, set(given) - {"mean", "std"}))
        missing = sorted({"mean", "std"} - set(given))
        what = "; ".join(
            ([f"unknown key {', '.join(extra)}"] if extra else []) + ([f"no {', '.join(missing)}"] if missing else [])
        )
        return f"{shape}; {what}"
    values = {}
    for key in ("mean", "std"):
        value = given[key]
        ok = isinstance(value, list) and len(value) in (1, 3)
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        if not ok:
            return f"{shape}; {key} is {value!r}"
        values[key] = value
    if len(values["mean"]) != len(values["std"]):
        return f"{shape}; mean has {len(values['mean'])} values and std {len(values['std'])}"
    if any(v <= 0 for v in values["std"]):
        return f"{shape}; every std must be above 0, got {values['std']}"
    return None
