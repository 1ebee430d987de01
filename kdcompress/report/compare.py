"""Several runs side by side: one comparison of their reports (``kdc report A B --out DIR``).

A comparison is plain data, written as DIR/report.json::

    {"schema_version": 1, "generated_at": "2025-01-01T00:00:00+00:00",
     "runs": [{"name": "quickstart", "report": {...}}, {"name": "t2", "report": {...}}]}

Each ``report`` is that run's report dict as :func:`kdcompress.report.build_report` makes it; ``name`` is its
run name, made unique. Example::

    >>> from kdcompress.report.compare import build_comparison, comparison_markdown
    >>> comparison = build_comparison([("a", {"stages": []}), ("a", {"stages": []})])
    >>> [run["name"] for run in comparison["runs"]]
    ['a', 'a (2)']
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from .text import number_text

__all__ = [
    "build_comparison",
    "comparison_markdown",
    "comparison_rows",
    "latency_at",
    "COMPARISON_SCHEMA_VERSION",
    "LATENCY_BATCH",
]

# the comparison file's own layout (the runs' reports carry theirs in report["schema_version"])
COMPARISON_SCHEMA_VERSION = 1
LATENCY_BATCH = 64  # the batch size the comparison's latency column shows


def build_comparison(reports: list[tuple[str, dict]]) -> dict:
    """A comparison of ``reports``, a list of (run name, report dict); a name that repeats gets " (2)", " (3)"...

    An empty name falls back to the report's ``run_name`` (or ``recipe``), else "run".
    """
    runs, seen = [], set()
    for name, report in reports:
        base = str(name or report.get("run_name") or report.get("recipe") or "run")
        unique, n = base, 1
        while unique in seen:
            n += 1
            unique = f"{base} ({n})"
        seen.add(unique)
        runs.append({"name": unique, "report": report})
    return {
        "schema_version": COMPARISON_SCHEMA_VERSION,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runs": runs,
    }


def latency_at(row: dict, batch: int) -> float | None:
    """A stage's or artifact's median latency in ms at ``batch`` (report.json keys are strings), or None."""
    timing = row.get("latency_ms") or {}
    value = timing.get(str(batch), timing.get(batch))
    return None if value is None else float(value)


def _stage_detail(row: dict) -> str | None:
    """A stage's model, and for a pruned stage how it was pruned (runs compared may prune differently)."""
    method = (row.get("settings") or {}).get("method")
    model = row.get("model")
    return f"{model}; {method}" if method and model else model or method


def comparison_rows(comparison: dict) -> list[dict]:
    """One flat row per stage and per loaded artifact of every run, in run order.

    Keys: ``run``, ``kind`` ("stage" or "artifact"), ``label`` (the stage, or the artifact's file name), ``stage``
    (the stage it is, or was exported from), ``detail`` (model, with how a pruned stage was pruned; or format), ``stale``, ``accuracy``, ``accuracy_se``,
    ``bytes``, ``nonzero_params``, ``macs``, ``latency_ms`` (at batch 64). A refused artifact has no numbers.
    """
    rows = []
    for run in comparison.get("runs") or []:
        report = run.get("report") or {}
        for r in report.get("stages") or []:
            rows.append(
                {
                    "run": run["name"],
                    "kind": "stage",
                    "label": r.get("stage"),
                    "stage": r.get("stage"),
                    "detail": _stage_detail(r),
                    "stale": bool(r.get("stale")),
                    "accuracy": r.get("accuracy"),
                    "accuracy_se": r.get("accuracy_se"),
                    "bytes": r.get("checkpoint_bytes"),
                    "nonzero_params": r.get("nonzero_params"),
                    "macs": r.get("macs"),
                    "latency_ms": latency_at(r, LATENCY_BATCH),
                    "refused": None,
                }
            )
        for a in report.get("artifacts") or []:
            refused = a.get("refused")
            rows.append(
                {
                    "run": run["name"],
                    "kind": "artifact",
                    "label": Path(str(a.get("path") or "?")).name,
                    "stage": a.get("stage"),
                    "detail": a.get("format"),
                    "stale": bool(a.get("stale")),
                    "accuracy": None if refused else a.get("accuracy"),
                    "accuracy_se": None if refused else a.get("accuracy_se"),
                    "bytes": None if refused else a.get("bytes"),
                    "nonzero_params": None,
                    "macs": None,
                    "latency_ms": None if refused else latency_at(a, LATENCY_BATCH),
                    "refused": refused,
                }
            )
    return rows


def _md(text) -> str:
    """A table cell: a pipe would end the cell, a newline the row."""
    return " ".join(str(text).split()).replace("|", "\\|")


def comparison_markdown(comparison: dict) -> str:
    """The comparison as Markdown: one table with every run's stages and artifacts, every number in full."""
    names = [run["name"] for run in comparison.get("runs") or []]
    columns = [
        "run",
        "stage / artifact",
        "model / format",
        "test acc",
        "± SE",
        "bytes on disk",
        "non-zero params",
        "MACs",
        f"latency batch {LATENCY_BATCH} median (ms)",
    ]
    lines = [
        f"# kdc comparison: {_md(', '.join(names))}",
        "",
        f"Generated {comparison.get('generated_at') or 'at an unknown time'}. One row per stage checkpoint and per "
        f"exported artifact (export/) of each run; each run's own report holds the details. ± SE is the binomial "
        f"standard error of the test accuracy; bytes on disk are the file's; latency is each run's own measurement "
        f"(blank where not measured at batch {LATENCY_BATCH}), so it compares only between runs timed on the same "
        f"machine.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join(" --- " if i < 3 else " ---: " for i in range(len(columns))) + "|",
    ]
    for r in comparison_rows(comparison):
        label = r["label"] if r["kind"] == "stage" else f"artifact {r['label']} (from {r['stage']})"
        if r["refused"]:
            cells = [r["run"], label, r["detail"] or "", f"refused: {r['refused']}", "", "", "", "", ""]
        else:
            cells = [
                r["run"],
                label + ("*" if r["stale"] else ""),
                r["detail"] or "",
                "" if r["accuracy"] is None else f"{r['accuracy']:.2%}",
                "" if r["accuracy_se"] is None else f"{r['accuracy_se'] * 100:.2f} pt",
                number_text(r["bytes"]),
                number_text(r["nonzero_params"]),
                number_text(r["macs"]),
                "" if r["latency_ms"] is None else f"{r['latency_ms']:.4f}",
            ]
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    if any(r["stale"] for r in comparison_rows(comparison)):
        lines += ["", "*: stale, see that run's report warnings."]
    lines.append("")
    return "\n".join(lines)
