"""The report for the terminal: rich tables that fit 100 columns, their notes, the settings and the differences."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console, ConsoleOptions, Group
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from .budget import budget_lines
from .int8_notes import int8_notes
from .text import (
    SPARSE_MACS_NOTE,
    STALE_NOTE,
    accuracy_text,
    bytes_text,
    compact,
    comparison_name,
    comparison_text,
    duration_text,
    is_seeded,
    latency_note,
    latency_text,
    ms_text,
    points_text,
    ratio_text,
    seed_comparison_text,
    seeds_note,
    settings_text,
    sparsity_text,
    stage_name,
)

__all__ = ["report_table", "FittedTable"]


def report_table(report: dict) -> Group:
    """The report for the terminal: three tables that fit 100 columns (accuracy; size; MACs and latency, one
    column per batch size), their notes, the stage settings and the distilled-against-baseline comparison. A
    stale stage is named ``stage*`` (warnings are in ``report["warnings"]``; the CLI prints them)."""
    rows = report["stages"]
    seeded = any(is_seeded(r) for r in rows)
    first = _accuracy_table(report, seeded)
    second = _size_table(rows)
    third = _cost_table(report)
    settings = _settings_grid(rows)
    # notes as text, not captions: a caption wraps at its table's width
    notes = ([STALE_NOTE] if any(r.get("stale") for r in rows) else []) + [SPARSE_MACS_NOTE, latency_note(report)]
    if seeded:
        notes.insert(0, seeds_note(rows))
    parts = [first, second, third, Text("\n".join(notes)), Text("settings", style="bold"), settings]
    parts += [Text("\n".join(budget_lines(report)))] if report.get("budget") else []
    if report.get("artifacts"):
        parts.append(_artifact_table(report))
        parts.extend(Text(note) for note in int8_notes(report))
    if report.get("comparisons"):
        parts.append(
            Text(
                "differences (standard error of a test accuracy: sqrt(p(1-p)/n); latency: the median of the "
                "per-round ratios, the two timed side by side)",
                style="bold",
            )
        )
        parts.append(_differences_grid(report, seeded))
    return Group(*parts)


def _accuracy_table(report: dict, seeded: bool) -> Table:
    """Per stage: model, epochs, training time and accuracy, test accuracy (± SE, or mean ± std over the seeds)
    and its change against the teacher's."""
    rows = report["stages"]
    first = Table(title=f"kdc report: {report['recipe']} on {report['dataset']}", title_justify="left")
    first.add_column("stage", no_wrap=True)
    first.add_column("model", overflow="fold")  # the one column that may wrap: names can be long
    accuracy_header = "test acc %\nmean ± std" if seeded else "test acc %\n± SE"
    for header in ("epochs", "train\ntime", "train\nacc %", accuracy_header, "vs teacher\npoints"):
        first.add_column(header, justify="right", no_wrap=True)
    teacher_mean = next((r.get("accuracy_mean") for r in rows if r["stage"] == "teacher"), None)
    for r in rows:
        change = r.get("accuracy_change_vs_teacher")
        if seeded and is_seeded(r) and teacher_mean is not None:  # beside a mean, the change of the means
            change = r["accuracy_mean"] - teacher_mean
        first.add_row(
            stage_name(r) + (" (trained once)" if seeded and r.get("trained_once") else ""),  # as report.html
            Text(r["model"]),  # Text: a name is never read as rich markup
            "" if r.get("epochs") is None else str(r["epochs"]),
            duration_text(r.get("train_seconds")),
            "" if r.get("train_accuracy") is None else f"{r['train_accuracy'] * 100:.2f}",
            accuracy_text(r),
            points_text(change),
        )
    return first


def _size_table(rows: list[dict]) -> Table:
    """Per stage: parameters, non-zeros, sparsity, bytes, and the teacher's over the stage's."""
    second = Table(caption="ratio: teacher's / stage's (non-zero parameters; checkpoint bytes)", caption_justify="left")
    second.add_column("stage", no_wrap=True)
    for header in ("params", "non-zero", "sparsity", "non-zero\nratio", "bytes", "bytes\nratio"):
        second.add_column(header, justify="right", no_wrap=True)
    for r in rows:
        second.add_row(
            stage_name(r),
            compact(r["params"]),
            compact(r["nonzero_params"]),
            sparsity_text(r),
            ratio_text(r.get("nonzero_ratio_vs_teacher")),
            bytes_text(r["checkpoint_bytes"]),
            ratio_text(r.get("bytes_ratio_vs_teacher")),
        )
    return second


def _cost_table(report: dict) -> Table:
    """What a forward pass costs: MACs and latency, a table of its own so that a latency column per batch size
    fits."""
    batches = report.get("latency_batches") or []
    third = Table()
    third.add_column("stage", no_wrap=True)
    for header in ["MACs", "MACs if\nsparse"] + [f"latency ms, batch {b}\nmedian (IQR)" for b in batches]:
        third.add_column(header, justify="right", no_wrap=True)
    for r in report["stages"]:
        timing = r.get("latency") or {}
        third.add_row(
            stage_name(r),
            compact(r["macs"]),
            compact(r.get("sparse_macs")),
            *[latency_text(timing.get(str(b))) for b in batches],
        )
    return third


def _settings_grid(rows: list[dict]) -> Table:
    """Each stage's settings on one line beside its name."""
    # grids, not lines of text: a long setting wraps under its own column, not under the stage names
    settings = Table.grid(padding=(0, 2))
    settings.add_column(no_wrap=True)
    settings.add_column(overflow="fold")
    for r in rows:
        settings.add_row(f" {stage_name(r)}", Text(settings_text(r["settings"])))
    return settings


def _differences_grid(report: dict, seeded: bool) -> Table:
    """Each comparison's difference with its noise (the first seed's, then over the seeds when several)."""
    rows = report["stages"]
    diffs = Table.grid(padding=(0, 2))
    diffs.add_column(no_wrap=True)
    diffs.add_column(overflow="fold")
    for c in report["comparisons"]:
        first_seed = f", seed {rows[0]['seeds'][0]['seed']}" if seeded and rows[0].get("seeds") else ""
        diffs.add_row(f" {comparison_name(c)}{first_seed}", comparison_text(c))
        if (c.get("seeds") or {}).get("n", 0) > 1:
            diffs.add_row(f" {comparison_name(c)}, {c['seeds']['n']} seeds", seed_comparison_text(c["seeds"]))
    return diffs


def _artifact_name(a: dict) -> str:
    return Path(str(a["path"])).name + ("*" if a.get("stale") else "")


class FittedTable:
    """A table that leaves out its optional columns, least needed first, until it fits the width it is given.

    ``make(dropped)`` builds the table without the columns named in ``dropped``; ``optional`` lists the columns
    that may go, in the order they go. The columns that stay never wrap (a file name stays whole).
    """

    def __init__(self, make, optional: list[str]):
        self.make, self.optional = make, list(optional)

    def fitted(self, console: Console, width: int) -> Table:
        options = console.options.update(max_width=10_000)  # measured unconstrained: its natural width
        for count in range(len(self.optional) + 1):
            table = self.make(frozenset(self.optional[:count]))
            if Measurement.get(console, options, table).maximum <= width:
                break
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions):
        yield self.fitted(console, options.max_width)


# the artifact table's columns: (header, what it holds); those after the file and bytes may be left out, the
# teacher ratio first and the first latency last, when the terminal is narrow
_ARTIFACT_COLUMNS = ("teacher\n/ file", "stage\n/ file", "test acc %\n± SE", "vs\nstage")
_ARTIFACT_DROP_ORDER = ("teacher\n/ file", "vs\nstage", "stage\n/ file")


def _artifact_table(report: dict) -> FittedTable:
    """Exported files: bytes, how many times smaller than the teacher's and the stage's checkpoints,
    accuracy measured from the loaded file (against its stage's), latency medians; file names whole at any
    width (the ratios, then all but the first latency, go first)."""
    batches = [f"ms\nbatch {b}" for b in report.get("latency_batches") or []]
    optional = [_ARTIFACT_DROP_ORDER[0], *batches[1:][::-1], *_ARTIFACT_DROP_ORDER[1:]]
    return FittedTable(lambda dropped: _artifact_columns(report, dropped), optional)


def _artifact_columns(report: dict, dropped: frozenset) -> Table:
    batches = report.get("latency_batches") or []
    headers = [h for h in (*_ARTIFACT_COLUMNS, *(f"ms\nbatch {b}" for b in batches)) if h not in dropped]
    ratios = [h.replace("\n", " ") for h in headers if h.endswith("/ file")]
    notes = [f"{', '.join(ratios)}: checkpoint bytes over file bytes"] if ratios else []
    notes += ["vs stage: accuracy points against the stage checkpoint"] if "vs\nstage" in headers else []
    notes += ["ms: median latency"] if batches else []
    table = Table(
        title="artifacts (export/): accuracy measured from each file loaded back",
        title_justify="left",
        caption="; ".join(notes) or None,
        caption_justify="left",
    )
    names = [_artifact_name(a) for a in report["artifacts"]]
    table.add_column("file", no_wrap=True, min_width=max(map(len, names), default=4))  # a name is never cut
    for header in ["bytes", *headers]:
        table.add_column(header, justify="right", no_wrap=True)
    for a in report["artifacts"]:
        if a.get("refused"):
            table.add_row(Text(_artifact_name(a)), "refused", *[""] * len(headers))
            continue
        timing = a.get("latency_ms") or {}
        cells = {
            "teacher\n/ file": ratio_text(a.get("compression_vs_teacher")),
            "stage\n/ file": ratio_text(a.get("compression_vs_stage")),
            "test acc %\n± SE": "" if a.get("accuracy") is None else accuracy_text(a),
            "vs\nstage": points_text(a.get("accuracy_change_vs_stage")),
            **{f"ms\nbatch {b}": "-" if timing.get(str(b)) is None else ms_text(timing[str(b)]) for b in batches},
        }
        table.add_row(Text(_artifact_name(a)), bytes_text(a["bytes"]), *[cells[h] for h in headers])
    return table
