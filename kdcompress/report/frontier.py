"""A frontier, not a point: accuracy against latency and against bytes over a sweep's models, the best marked.

:func:`write_frontier` makes each point's report (:func:`kdcompress.report.write_report`, which times the
exported files), reads from it each model's test accuracy, latency and bytes (:func:`frontier_entry`), marks
the models no other beats on both accuracy and cost (:func:`non_dominated`) and writes ``frontier.json`` and
``frontier.html`` into the sweep's folder. A model is *dominated* when another is at least as accurate and
at most as costly, and better on one of the two; two models with the same accuracy and cost are both kept.
Example::

    >>> from kdcompress.report.frontier import non_dominated
    >>> points = [{"accuracy": 0.9, "bytes": 100}, {"accuracy": 0.8, "bytes": 200}, {"accuracy": 0.7, "bytes": 50}]
    >>> non_dominated(points, "bytes")
    [2, 0]
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..files import atomic_write_files
from ..run.layout import FRONTIER_DATA, FRONTIER_PAGE, MODEL_FILE
from ..run.lock import run_dir_lock
from .latency import now
from .write import write_report

__all__ = [
    "FRONTIER_SCHEMA_VERSION",
    "AXES",
    "dominates",
    "non_dominated",
    "frontier_entry",
    "build_frontier",
    "write_frontier",
]

FRONTIER_SCHEMA_VERSION = 1
AXES = (("latency", "latency_ms"), ("bytes", "bytes"))  # (name, the cost key of a point): lower is better


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def dominates(a: dict, b: dict, cost: str) -> bool:
    """Whether ``a`` beats ``b``: at least as accurate at no more ``cost``, and strictly better on one of them."""
    at_least = a["accuracy"] >= b["accuracy"] and a[cost] <= b[cost]
    return at_least and (a["accuracy"] > b["accuracy"] or a[cost] < b[cost])


def non_dominated(points: list[dict], cost: str) -> list[int]:
    """The indices of the points no other point dominates on accuracy and ``cost``, cheapest first.

    A point without a finite ``accuracy`` or ``cost`` takes no part (it is neither on the frontier nor beats one).
    """
    usable = [i for i, p in enumerate(points) if _number(p.get("accuracy")) and _number(p.get(cost))]
    kept = [i for i in usable if not any(dominates(points[j], points[i], cost) for j in usable if j != i)]
    return sorted(kept, key=lambda i: (points[i][cost], -points[i]["accuracy"], i))


def _latencies(row: dict) -> dict[str, float]:
    """A report row's median latency per batch size, keys as strings (report.json's), positive numbers only."""
    timing = row.get("latency_ms") if isinstance(row.get("latency_ms"), dict) else {}
    return {str(batch): float(ms) for batch, ms in timing.items() if _number(ms) and ms > 0}


def frontier_entry(report: dict, stage: str, fmt: str) -> dict:
    """What the frontier reads about ``stage`` from a run's report: its exported ``fmt`` file when the report has
    one (loaded, up to date): its test accuracy, its bytes and its latency as timed by the report; else the stage
    checkpoint's test accuracy, bytes and latency. ``*_source`` says which file each came from."""
    row = next((r for r in report.get("stages") or [] if r.get("stage") == stage), None)
    if row is None:
        return {"missing": f"no {stage} checkpoint in this run directory"}
    checkpoint = f"{stage}/{MODEL_FILE}"
    artifact = next(
        (
            a
            for a in report.get("artifacts") or []
            if a.get("stage") == stage
            and a.get("format") == fmt
            and not a.get("refused")
            and not a.get("stale")
            and _number(a.get("accuracy"))
            and _number(a.get("bytes"))
        ),
        None,
    )
    measured = artifact or row
    latencies = _latencies(artifact) if artifact else {}
    return {
        "accuracy": measured.get("accuracy"),
        "accuracy_se": measured.get("accuracy_se"),
        "stage_accuracy": row.get("accuracy"),
        "bytes": measured.get("bytes") if artifact else row.get("checkpoint_bytes"),
        "bytes_source": artifact["path"] if artifact else checkpoint,
        "latencies_ms": latencies or _latencies(row),
        "latency_source": artifact["path"] if latencies else checkpoint,
        "macs": row.get("macs"),
        "params": row.get("params"),
    }


def _common_batch(points: list[dict]) -> int | None:
    """The largest batch size every point with a latency was timed at (else the largest any was), or None."""
    timed = [set(p.get("latencies_ms") or {}) for p in points if p.get("latencies_ms")]
    if not timed:
        return None
    common = set.intersection(*timed)
    return max(int(b) for b in (common or set.union(*timed)))


def build_frontier(points: list[dict], fmt: str, grid: dict | None = None) -> dict:
    """The frontier of ``points`` (each a :func:`frontier_entry` with ``label``, ``role``, ``settings``,
    ``run_dir`` and ``stage``): each point's ``latency_ms`` at the common batch size and ``on_frontier`` per axis
    (None where the point has no value for it); ``frontier`` lists each axis's non-dominated labels, cheapest first.
    """
    batch = _common_batch(points)
    points = [{**p, "latency_ms": (p.get("latencies_ms") or {}).get(str(batch))} for p in points]
    frontier = {}
    for axis, cost in AXES:
        kept = non_dominated(points, cost)
        frontier[axis] = [points[i]["label"] for i in kept]
        for i, p in enumerate(points):
            usable = _number(p.get("accuracy")) and _number(p.get(cost))
            p.setdefault("on_frontier", {})[axis] = (i in kept) if usable else None
    return {
        "schema_version": FRONTIER_SCHEMA_VERSION,
        "generated_at": now(),
        "format": fmt,
        "latency_batch": batch,
        "grid": grid or {},
        "points": points,
        "frontier": frontier,
    }


def write_frontier(sweep_dir: str | Path, points: list, fmt: str) -> dict:
    """Make each point's report, then write ``frontier.json`` and ``frontier.html`` into ``sweep_dir`` (both, or
    neither); return the frontier (:func:`build_frontier`).

    ``points``: :class:`kdcompress.run.frontier.FrontierPoint` (label, role, settings, run_dir, stage, recipe);
    points in one run directory share its report. The sweep's base run directory is locked throughout.
    """
    from .html import render_frontier_html  # matplotlib is imported only when a page is written

    sweep_dir = Path(sweep_dir)
    reports: dict[str, dict] = {}
    entries = []
    with run_dir_lock(sweep_dir.parent, create=False):
        for p in points:
            key = str(p.run_dir)
            if key not in reports:
                reports[key] = write_report(p.run_dir, recipe=p.recipe)
            entries.append(
                {
                    "label": p.label,
                    "role": p.role,
                    "settings": dict(p.settings),
                    "run_dir": key,
                    "stage": p.stage,
                    **frontier_entry(reports[key], p.stage, fmt),
                }
            )
        grid: dict[str, list] = {}
        for e in entries:
            if e["role"] == "point":
                for k, v in e["settings"].items():
                    grid.setdefault(k, []).append(v)
        frontier = build_frontier(entries, fmt, grid)
        atomic_write_files(
            {
                sweep_dir / FRONTIER_DATA: json.dumps(frontier, indent=2) + "\n",
                sweep_dir / FRONTIER_PAGE: render_frontier_html(frontier),
            }
        )
    return frontier
