"""Sweeps: run a recipe at every point of a grid of values, sharing the stages the points have in common.

``kdc sweep RECIPE --grid distill.temperature=1,2,4,8 --grid distill.alpha=0.5,0.9`` runs the recipe
once per combination, each in its own run directory ``<run dir>/sweep/<point>/``. A stage whose
fingerprint (its declared inputs and upstream checkpoints) is the same in several points is trained
once: its checkpoint is hard-linked (copied where links are not possible) into the other points, so a
grid over distillation settings trains the teacher, and the student baseline, a single time. Each
point is an ordinary run directory: an interrupted sweep goes on where it stopped when the same
command is run again, and ``kdc report <point>`` works on any of them.

The ranked table (``sweep.md`` and ``sweep.json`` in ``<run dir>/sweep/``) lists each point's test
accuracy per stage and distilled minus student, best distilled first. Example::

    >>> from kdcompress.run.sweep import parse_grid
    >>> parse_grid(["distill.temperature=1,2", "distill.alpha=0.5"])
    [('distill.temperature', ['1', '2']), ('distill.alpha', ['0.5'])]
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

from rich.console import Console

from ..checkpoint import load_checkpoint
from ..errors import Problem, RecipeError, UsageError
from ..files import atomic_write_text
from ..recipe import load_recipe
from ..stats import NOISE_Z, accuracy_se, mean_std
from . import layout
from .layout import SEED_GLOB, SEEDS_DIR, SWEEP_DATA, SWEEP_TABLE, checkpoint_path
from .lock import run_dir_lock
from .marker import mark_run_dir
from .pipeline import run_pipeline
from .seeds import run_seeds, seed_run_dirs
from .share import expected_fingerprints, known_checkpoints, share_stages
from .stages import STAGES
from .state import Origin

__all__ = [
    "parse_grid",
    "grid_points",
    "point_name",
    "point_placement",
    "sweep_markdown",
    "run_sweep",
    "difference_se",
]


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["key=v1,v2", ...]`` -> ``[(key, ["v1", "v2"]), ...]``; RecipeError on a malformed item."""
    grid, problems = [], []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        parts = [v.strip() for v in values.split(",")]
        if not sep or not key or not all(parts):
            problems.append(Problem(f"--grid {item}", "expected KEY.PATH=V1,V2,..., e.g. distill.temperature=1,2,4,8"))
        elif key in (k for k, _ in grid):
            problems.append(Problem(f"--grid {item}", f"{key} is given twice; list all its values in one --grid"))
        else:
            grid.append((key, parts))
    if problems:
        raise RecipeError("kdc sweep", problems)
    return grid


def grid_points(grid: list[tuple[str, list[str]]]) -> list[list[str]]:
    """Every combination, as lists of ``key=value`` overrides, the last key varying fastest."""
    return [
        [f"{key}={value}" for (key, _), value in zip(grid, values)]
        for values in itertools.product(*(v for _, v in grid))
    ]


def point_name(overrides: list[str]) -> str:
    """A folder name for one point: ``temperature-4_alpha-0.5`` (the last part of each key, then its value)."""
    parts = []
    for item in overrides:
        key, _, value = item.partition("=")
        parts.append(f"{key.rsplit('.', 1)[-1]}-{value}")
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", "_".join(parts)).strip(".-") or "point"


def point_placement(sweep_dir: Path, name: str) -> list[str]:
    """The overrides that put a point's run directory at ``<sweep dir>/<name>``."""
    return [f"run.out_dir={sweep_dir}", f"run.name={name}"]


def _run_dirs(sweep_dir: Path) -> list[Path]:
    """Every point's run directory under ``sweep_dir`` and its seeds' (``<point>/seeds/seed-<s>``)."""
    points = sorted(p for p in sweep_dir.iterdir() if p.is_dir()) if sweep_dir.is_dir() else []
    return [d for p in points for d in [p, *sorted(q for q in (p / SEEDS_DIR).glob(SEED_GLOB) if q.is_dir())]]


def _point_row(run_dir: Path, overrides: list[str], seeds: list[int] | None = None) -> dict:
    """One point's accuracies. With several seeds, each stage's is the mean over the seeds whose checkpoint
    exists (``<stage>_std``: sample std) and ``distilled_minus_student`` is the mean of the per-seed
    differences, with its standard error ``distilled_minus_student_se`` (std / sqrt(n))."""
    row: dict = {
        "point": point_name(overrides),
        "settings": dict(o.split("=", 1) for o in overrides),
        "run_dir": str(run_dir),
    }
    dirs = seed_run_dirs(run_dir, seeds) if seeds and len(seeds) > 1 else {None: run_dir}
    per_seed: dict[str, dict] = {}
    for stage in STAGES:
        found = {}
        for seed, folder in dirs.items():
            path = checkpoint_path(folder, stage.name)
            if path.is_file():
                metrics = load_checkpoint(path)["metrics"]
                found[seed] = metrics["test_accuracy"]
                row[f"{stage.name}_test_samples"] = metrics.get("test_samples")
        if found:
            per_seed[stage.name] = found
            row[stage.name], std = mean_std(list(found.values()))
            if len(dirs) > 1:
                row[f"{stage.name}_std"] = std
                row[f"{stage.name}_seeds"] = sorted(found)
    common = [s for s in per_seed.get("distilled", {}) if s in per_seed.get("student", {})]
    if common:
        diffs = [per_seed["distilled"][s] - per_seed["student"][s] for s in common]
        row["distilled_minus_student"], std = mean_std(diffs)
        if len(dirs) > 1:
            row["seeds"] = len(common)
            row["distilled_minus_student_se"] = std / math.sqrt(len(diffs)) if std is not None else None
    return row


def _ranked(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: -(r.get("distilled") if r.get("distilled") is not None else -1.0))


def difference_se(row: dict) -> float | None:
    """The standard error of one point's distilled - student difference, from both test accuracies (one seed)."""
    errors = [accuracy_se(row[s], row.get(f"{s}_test_samples")) if row.get(s) is not None else None for s in _PAIR]
    return math.sqrt(sum(e * e for e in errors)) if None not in errors else None


_PAIR = ("distilled", "student")


def _one_seed_note(rows: list[dict]) -> str:
    """What noise is with one seed per point: the largest standard error of a difference in the table."""
    errors = [se for se in map(difference_se, rows) if se is not None]
    if not errors:
        return (
            "One seed per point: a difference can be noise (see each point's report for the standard errors, "
            "or sweep again with --seeds 3)."
        )
    se = max(errors)
    return (
        f"One seed per point: the distilled - student difference has a standard error of up to {se * 100:.2f} "
        f"points here (binomial, from the test set), so one within {NOISE_Z * se * 100:.2f} points can be noise "
        f"(sweep again with --seeds 3 for the seeds' own spread)."
    )


def sweep_markdown(rows: list[dict], grid) -> str:
    """The ranked table: best distilled accuracy first."""
    keys = [key for key, _ in grid]
    stages = [s.name for s in STAGES if any(s.name in r for r in rows)]
    seeded = any(r.get("seeds") for r in rows)
    columns = ["rank", *keys, *(f"{s} acc" for s in stages), "distilled - student", "run directory"]
    if seeded:
        n = max(r.get("seeds") or 0 for r in rows)
        about = (
            f"Mean over {n} seeds per point (± sample std for a stage; ± standard error for the difference, "
            "which is beyond seed noise when it is more than twice that error)."
        )
    else:
        about = _one_seed_note(rows)
    lines = [
        "# kdc sweep",
        "",
        "Test accuracy of each stage at every point of the grid, best distilled student first. Stages that "
        "points share (same fingerprint) were trained once. " + about,
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join(" ---: " for _ in columns) + "|",
    ]
    for rank, r in enumerate(rows, 1):
        cells = [str(rank), *(r["settings"].get(k, "") for k in keys)]
        for s in stages:
            std = r.get(f"{s}_std")
            cells.append("" if r.get(s) is None else f"{r[s]:.2%}" + (f" ± {std * 100:.2f}" if std is not None else ""))
        diff, se = r.get("distilled_minus_student"), r.get("distilled_minus_student_se")
        text = "" if diff is None else f"{diff * 100:+.2f} pt"
        if diff is not None and se is not None:
            text += f" ± {se * 100:.2f}" + (" (> 2 SE)" if diff > 2 * se else "")
        cells += [text, r["run_dir"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_sweep(
    recipe_path, grid_items: list[str], overrides: list[str] | None = None, force: bool = False, console=None, load=None
) -> list[dict]:
    """Run every point of the grid (see the module docstring); return the ranked rows.

    ``load(recipe_path, overrides)`` loads a recipe as the CLI does (run directories included).
    The base run directory (which holds ``sweep/``) is locked throughout
    (:func:`kdcompress.run.lock.run_dir_lock`), each point's while it runs.
    """
    console = console or Console(stderr=True)
    load = load or (lambda path, items: load_recipe(path, items))
    grid = parse_grid(grid_items)
    if not grid:
        raise UsageError("kdc sweep needs at least one --grid KEY=V1,V2 (e.g. --grid distill.temperature=1,2,4,8)")
    overrides = list(overrides or [])
    base = load(recipe_path, overrides)
    points = grid_points(grid)
    for point in points:  # every point's recipe is checked before anything trains
        load(recipe_path, overrides + point)
    sweep_dir = layout.sweep_dir(base.run_dir)
    names = [point_name(p) for p in points]
    if len(set(names)) != len(names):
        raise UsageError("two grid points give the same folder name; use values that differ in letters or digits")
    seeds = list(base.run.seeds) if len(base.run.seeds) > 1 else None
    with run_dir_lock(base.run_dir):
        earlier, earlier_grid = _earlier_points(sweep_dir)
        rows = []
        for i, (point, name) in enumerate(zip(points, names), 1):
            run_dir = sweep_dir / name
            placement = point_placement(sweep_dir, name)
            placed = load(recipe_path, overrides + point + placement)
            origin = Origin(str(recipe_path) if recipe_path else "", tuple(overrides + point + placement))
            console.print(f"[bold]sweep[/] point {i}/{len(points)}: {' '.join(point)} -> {run_dir}")
            if seeds:  # every seed of this point, sharing what earlier points (and their seeds) already trained
                others = [] if force else [base.run_dir, *_run_dirs(sweep_dir)]
                run_seeds(
                    recipe_path,
                    overrides + point + placement,
                    seeds,
                    force=force,
                    console=console,
                    load=load,
                    share_from=[d for d in others if d != run_dir],
                )
            else:
                with run_dir_lock(run_dir):  # shared checkpoints are linked in before its stages run
                    if not force:
                        mark_run_dir(run_dir)
                        pool = known_checkpoints([base.run_dir, *_run_dirs(sweep_dir)])
                        shared = share_stages(pool, expected_fingerprints(placed), run_dir)
                        if shared:
                            console.print(f"sweep: {', '.join(shared)} shared with an earlier point (same fingerprint)")
                    run_pipeline(placed, force=force, console=console, origin=origin)
            rows.append(_point_row(run_dir, point, seeds))
            # written after every point: an interrupted sweep keeps its table; points of earlier sweeps with
            # another grid in this folder stay listed
            ranked = _ranked(rows + [r for r in earlier if r["point"] not in names])
            keys = _merged_grid(grid, earlier_grid)
            atomic_write_text(sweep_dir / SWEEP_DATA, json.dumps({"grid": keys, "points": ranked}, indent=2) + "\n")
            atomic_write_text(sweep_dir / SWEEP_TABLE, sweep_markdown(ranked, list(keys.items())))
    return _ranked(rows)


def _earlier_points(sweep_dir: Path) -> tuple[list[dict], dict]:
    """The rows and grid of the last ``sweep.json`` in ``sweep_dir`` whose point folders still exist."""
    try:
        data = json.loads((sweep_dir / SWEEP_DATA).read_text(encoding="utf-8"))
        rows = [r for r in data.get("points", []) if Path(r["run_dir"]).is_dir()]
        return rows, dict(data.get("grid") or {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return [], {}  # none, or not one we can read: this sweep's table starts afresh


def _merged_grid(grid, earlier_grid: dict) -> dict:
    """This sweep's grid keys and values, then any key only an earlier sweep in the folder had."""
    merged = {key: list(values) for key, values in grid}
    for key, values in earlier_grid.items():
        merged.setdefault(key, list(values) if isinstance(values, list) else [values])
    return merged
