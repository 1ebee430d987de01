"""``kdc frontier``: a sweep over pruning budgets (or any grid) whose points are all exported, ready for a frontier.

``kdc frontier RECIPE --budget macs=0.5,0.25,0.15`` is ``kdc sweep RECIPE --grid prune.budget.macs=0.5,0.25,0.15``
with every point's pruned model exported (the recipe's ``export.formats``, with ``onnx`` added when it names
none), and the distilled student, which the points share, exported once in the same format as a reference.
What this module returns, one :class:`FrontierPoint` per model, is what :func:`kdcompress.report.frontier.
write_frontier` reads the accuracy, latency and bytes of, to draw the non-dominated points. Example::

    >>> from kdcompress.run.frontier import budget_grid, point_label
    >>> budget_grid("macs=0.5,0.25")
    'prune.budget.macs=0.5,0.25'
    >>> point_label(["prune.budget.macs=0.25"])
    'macs 0.25'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from ..checkpoint import read_manifest
from ..errors import KdcError, UsageError, did_you_mean
from ..export import FORMATS, check_formats
from ..recipe import BUDGET_KINDS, Recipe, load_recipe
from . import layout
from .export import export_stage
from .lock import run_dir_lock
from .marker import write_resolved_recipe
from .state import Origin
from .sweep import grid_points, parse_grid, point_name, point_placement, run_sweep

__all__ = ["FrontierPoint", "budget_grid", "frontier_formats", "point_label", "run_frontier", "REFERENCE_STAGE"]

REFERENCE_STAGE = "distilled"  # the model the points are pruned from: the frontier's reference point
POINT_STAGE = "pruned"


@dataclass(frozen=True)
class FrontierPoint:
    """One model of a frontier: a sweep point's pruned stage, or the distilled student it was pruned from.

    ``role`` is "point" or "reference"; ``settings`` the point's grid values (``{"prune.budget.macs": "0.5"}``);
    ``recipe`` the recipe the point was run with (trusted: its models are built for the report).
    """

    label: str
    role: str
    settings: dict
    run_dir: Path
    stage: str
    recipe: Recipe | None = field(default=None, compare=False, repr=False)


def budget_grid(item: str) -> str:
    """``"macs=0.5,0.25"`` -> ``"prune.budget.macs=0.5,0.25"`` (a ``--grid`` item); UsageError for another kind."""
    kind, sep, values = item.partition("=")
    kind = kind.strip().removeprefix("prune.budget.")
    if not sep or kind not in BUDGET_KINDS:
        raise UsageError(
            f"--budget {item}: expected KIND=V1,V2,... with KIND one of {', '.join(BUDGET_KINDS)}, e.g. "
            f"--budget macs=0.5,0.25,0.15{did_you_mean(kind, BUDGET_KINDS) if sep else ''}"
        )
    return f"prune.budget.{kind}={values}"


def point_label(overrides: list[str]) -> str:
    """A point's label on the charts: each grid key's last part and its value, ``macs 0.25, round_to 8``."""
    parts = []
    for item in overrides:
        key, _, value = item.partition("=")
        parts.append(f"{key.strip().rsplit('.', 1)[-1]} {value.strip()}")
    return ", ".join(parts)


def frontier_formats(recipe: Recipe, fmt: str | None = None) -> tuple[str, list[str]]:
    """(the format whose file the frontier measures, every format to export).

    The formats are the recipe's ``export.formats`` (``onnx`` when it names none) plus ``fmt``; the measured one
    is ``fmt``, else ``onnx`` when exported, else the first of the recipe's formats.
    """
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"--format: must be one of {', '.join(FORMATS)}, got {fmt!r}{did_you_mean(fmt, FORMATS)}")
    formats = list(recipe.export.formats) or ["onnx"]
    measured = fmt or ("onnx" if "onnx" in formats else formats[0])
    return measured, formats + ([measured] if measured not in formats else [])


def run_frontier(
    recipe_path,
    grid_items: list[str],
    overrides: list[str] | None = None,
    fmt: str | None = None,
    force: bool = False,
    console=None,
    load=None,
) -> tuple[list[FrontierPoint], str]:
    """Sweep the grid with every point's pruned stage exported, then export the distilled reference; return
    (the reference and the points, in grid order; the measured format, see :func:`frontier_formats`).

    ``load(recipe_path, overrides)`` loads a recipe as the CLI does (:func:`kdcompress.run.sweep.run_sweep`).
    The points' stages are shared as in any sweep: a grid over ``prune.*`` keys trains the teacher and the
    distilled student once. A second run of the same command trains and exports nothing that is up to date.
    """
    console = console or Console(stderr=True)
    load = load or (lambda path, items: load_recipe(path, items))
    overrides = list(overrides or [])
    base = load(recipe_path, overrides)
    measured, formats = frontier_formats(base, fmt)
    check_formats(formats)  # onnx not installed: said before anything trains
    if list(base.export.formats) != formats:
        overrides.append(f"export.formats=[{','.join(formats)}]")
    if base.export.stage != POINT_STAGE:  # the points are the pruned models; the reference is exported below
        overrides.append(f"export.stage={POINT_STAGE}")
    run_sweep(recipe_path, grid_items, overrides, force=force, console=console, load=load)
    sweep_dir = layout.sweep_dir(base.run_dir)
    points, seen, references = [], set(), []
    for point in grid_points(parse_grid(grid_items)):
        name = point_name(point)
        items = overrides + point + point_placement(sweep_dir, name)
        placed = load(recipe_path, items)
        settings = dict(item.split("=", 1) for item in point)
        points.append(FrontierPoint(point_label(point), "point", settings, placed.run_dir, POINT_STAGE, placed))
        fingerprint = _fingerprint(placed.run_dir, REFERENCE_STAGE)
        if fingerprint is None or fingerprint in seen:
            continue  # no distilled student here, or the same one as an earlier point's: exported there
        seen.add(fingerprint)
        origin = Origin(str(recipe_path) if recipe_path else "", tuple(items))
        with run_dir_lock(placed.run_dir):
            reference = load(recipe_path, items + [f"export.stage={REFERENCE_STAGE}"])
            export_stage(reference, formats=[measured], force=force, console=console, origin=origin)
            write_resolved_recipe(placed)  # the point's recipe.yaml exports its pruned stage again
        references.append((point_label(point), placed))
    several = len(references) > 1  # the grid changed the distilled student: each reference says which point holds it
    shown = [
        FrontierPoint(
            f"{REFERENCE_STAGE} ({label})" if several else REFERENCE_STAGE,
            "reference",
            {},
            placed.run_dir,
            REFERENCE_STAGE,
            placed,
        )
        for label, placed in references
    ]
    return shown + points, measured


def _fingerprint(run_dir: Path, stage: str) -> str | None:
    """The fingerprint of ``stage``'s checkpoint in ``run_dir`` from its manifest, or None without one."""
    path = layout.checkpoint_path(run_dir, stage)
    if not path.is_file():
        return None
    try:
        return read_manifest(path).get("fingerprint")
    except KdcError:
        return None
