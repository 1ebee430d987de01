"""Reading recipes: YAML text (bounded, with a line for every key), ``--set`` overrides, and conversion.

:func:`load_recipe` and :func:`parse_recipe` read a recipe, apply the overrides and convert every value
with the schema's types and ranges (:func:`_convert`, a step per kind of type), then run the checks of
:mod:`kdcompress.recipe.validate`; every problem is collected, each with its key path and YAML line,
and raised together as one :class:`~kdcompress.errors.RecipeError`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ..bounds import first_oversized, value_children, value_size
from ..errors import Problem, RecipeError, describe, did_you_mean
from ..names import add_import_dir
from .schema import PruneSection, Recipe
from .validate import cross_checks, line_of, name_checks, resolve_files, run_name_checks

__all__ = [
    "key_sections",
    "load_recipe",
    "parse_recipe",
    "read_yaml",
    "MAX_YAML_SIZE",
    "recipe_from_dict",
    "recipe_to_dict",
    "section_fingerprint",
    "builtin_recipe_path",
]


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
    unchecked, for the caller to refuse or trust: see :mod:`kdcompress.run.trust`).
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
    relative ``teacher.checkpoint`` or ``imagefolder:PATH`` is looked up in, in order
    (default: the current directory); the recipe returned holds the absolute path of
    the checkpoint found, and of a folder found beyond the first of them.
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
    problems.extend(run_name_checks(recipe.run, lines))
    problems.extend(name_checks(raw, lines, import_code, search_dirs))
    recipe = resolve_files(recipe, lines, problems, search_dirs or [Path.cwd()])
    if not problems:
        problems.extend(cross_checks(recipe, lines))
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
    problems.extend(run_name_checks(recipe.run, {}))
    if not problems:
        problems.extend(cross_checks(recipe, {}))
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
    if key_sections(word):  # a real key, in the wrong section (or at the top level)
        return f"; {_belongs(word)}"
    close = _suggest(word, names)
    if close:
        return close
    for candidate in meant:
        if key_sections(candidate):
            return f"; did you mean '{candidate}'? {_belongs(candidate)}"
    return ""


def key_sections(key: str) -> list[str]:
    """The recipe sections that have a key named ``key`` (none: an empty list), e.g. ``["teacher", "distill", "prune"]``."""
    hints = _type_hints(Recipe)
    return [s.name for s in dataclasses.fields(Recipe) if key in {f.name for f in dataclasses.fields(hints[s.name])}]


def _belongs(key: str) -> str:
    """Where ``key`` is set, in words."""
    sections = key_sections(key)
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
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _convert_section(value, tp, path, lines, problems)
    if origin in (Union, types.UnionType):
        return _convert_union(value, tp, path, lines, problems)
    if origin is Literal:
        return _convert_choice(value, tp, path, lines, problems)
    if origin is list:
        return _convert_list(value, tp, path, lines, problems)
    if tp is dict or origin is dict:
        return _convert_mapping(value, path, lines, problems)
    if tp is Any:
        return value
    return _convert_scalar(value, tp, path, lines, problems)


def _convert_section(value: Any, tp: Any, path: tuple, lines: dict, problems: list[Problem]) -> Any:
    """A section (a schema dataclass) from a mapping: each known key converted and range-checked."""
    where = _dotted(path)
    if value is None:
        value = {}
    if not isinstance(value, dict):
        problems.append(Problem(where, f"expected a mapping of settings, got {_kind(value)}", line_of(lines, path)))
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
                    line_of(lines, path + (key,)),
                )
            )
            continue
        before = len(problems)
        converted = _convert(item, hints[key], path + (key,), lines, problems)
        if len(problems) == before:
            problems.extend(_check_range(converted, fields[key], path + (key,), lines))
            kwargs[key] = converted
    return tp(**kwargs)


def _convert_union(value: Any, tp: Any, path: tuple, lines: dict, problems: list[Problem]) -> Any:
    """``Optional[X]`` or ``Union[...]``: the first type, in the schema's order, that takes the value."""
    where = _dotted(path)
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
    problems.append(Problem(where, f"expected {words}, got {_kind(value)} {value!r}{hint}", line_of(lines, path)))
    return None


def _convert_choice(value: Any, tp: Any, path: tuple, lines: dict, problems: list[Problem]) -> Any:
    """A ``Literal`` value: one of its choices (else the first choice, with a problem and a hint)."""
    choices = typing.get_args(tp)
    if value not in choices:
        problems.append(
            Problem(
                _dotted(path),
                f"must be one of {', '.join(map(str, choices))}, got {value!r}"
                + (_schedule_hint(value, path) or _suggest(value, choices)),
                line_of(lines, path),
            )
        )
        return choices[0]
    return value


def _convert_list(value: Any, tp: Any, path: tuple, lines: dict, problems: list[Problem]) -> list:
    """A list, each item converted to the list's item type."""
    if not isinstance(value, list):
        problems.append(Problem(_dotted(path), f"expected a list, got {_kind(value)}", line_of(lines, path)))
        return []
    (inner,) = typing.get_args(tp) or (Any,)
    return [_convert(v, inner, path + (i,), lines, problems) for i, v in enumerate(value)]


def _convert_mapping(value: Any, path: tuple, lines: dict, problems: list[Problem]) -> dict:
    """A free-form mapping (model arguments): taken as it is; null is an empty one."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(Problem(_dotted(path), f"expected a mapping, got {_kind(value)}", line_of(lines, path)))
        return {}
    return value


def _convert_scalar(value: Any, tp: Any, path: tuple, lines: dict, problems: list[Problem]) -> Any:
    """A bool, int, float or str (a whole float is taken as an int; a float must be finite)."""
    where = _dotted(path)
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(
                Problem(where, f"expected true or false, got {_kind(value)} {value!r}", line_of(lines, path))
            )
            return False
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            problems.append(Problem(where, f"expected an integer, got {_kind(value)} {value!r}", line_of(lines, path)))
            return 0
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(Problem(where, f"expected a number, got {_kind(value)} {value!r}", line_of(lines, path)))
            return 0.0
        if value != value or value in (float("inf"), float("-inf")):
            problems.append(Problem(where, f"expected a finite number, got {value!r}", line_of(lines, path)))
            return 0.0
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(Problem(where, f"expected text, got {_kind(value)} {value!r}", line_of(lines, path)))
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
    return {int: "an integer", float: "a number", str: "text", bool: "true or false", dict: "a mapping"}.get(
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
            line_of(lines, path),
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
