"""The report as one self-contained HTML page (report.html), with its charts as inline SVG.

:func:`render_html` turns a report dict (report.json, :func:`kdcompress.report.build_report`) into a page;
:func:`render_comparison_html` does the same for a comparison of several runs (:mod:`kdcompress.report.compare`).
The page references nothing outside itself: no scripts, no style sheets, no fonts, no images to fetch. The
charts are drawn with matplotlib (one ``matplotlib.figure.Figure`` per chart, saved by its SVG backend: no
pyplot state, no GUI backend), written as SVG with text kept as text, every id in them prefixed so that
several charts on one page never clash. Every key added by
report schema 1 (curves, per-class accuracy, layers, environment...) may be missing from an older report:
its section then says "not recorded". Example::

    >>> import json
    >>> from kdcompress.report.html import render_html
    >>> page = render_html(json.load(open("runs/quickstart/report.json")))  # doctest: +SKIP
"""

from __future__ import annotations

import io
import math
import re
from contextlib import contextmanager
from html import escape
from pathlib import Path

import matplotlib
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from ..stats import NOISE_Z
from .compare import LATENCY_BATCH, comparison_rows, latency_at
from .text import (
    SPARSE_MACS_NOTE,
    bytes_text,
    compact,
    comparison_name,
    comparison_text,
    is_seeded,
    latency_note,
    ms_text,
    number_text,
    points_text,
    ratio_text,
    seed_comparison_text,
    settings_text,
    sparsity_text,
)

__all__ = ["render_html", "render_comparison_html"]

# one colour per stage, the same in every chart; an unknown stage name gets grey
STAGE_COLOURS = {"teacher": "#4c72b0", "student": "#dd8452", "distilled": "#55a868", "pruned": "#c44e52"}
RUN_COLOURS = [
    "#4c72b0",
    "#dd8452",
    "#55a868",
    "#c44e52",
    "#8172b3",
    "#937860",
    "#da8bc3",
    "#8c8c8c",
    "#ccb974",
    "#64b5cd",
]
PER_CLASS_STAGES = ("teacher", "student", "distilled", "pruned")
MAX_CLASSES_SHOWN = 30  # more classes than this: the chart shows those whose accuracy differs most between stages
MAX_LAYERS_SHOWN = 60
DODGE = 1.05  # the comparison chart shifts each run's points sideways by this factor (5 %) from the next run's
NOT_RECORDED = "not recorded in this report (it was made by an older kdc; `kdc report RUN_DIR` makes it again)"
# Matplotlib's text style, the page's fonts: local ones only, the generic family last
CHART_FONTS = "'DejaVu Sans', Verdana, Arial, sans-serif"
CHART_STYLE = {
    "svg.fonttype": "none",  # text stays text: small, searchable, drawn with the reader's fonts
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.grid": True,
    "grid.color": "#e6e6e6",
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.4,
    "lines.markersize": 4,
}

CSS = """
:root{color-scheme:light}
body{margin:0;color:#1d1d1f;background:#fff;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",
Arial,sans-serif}
main{max-width:64rem;margin:0 auto;padding:1rem}
h1{font-size:1.45rem;margin:.5rem 0}
h2{font-size:1.15rem;margin:2rem 0 .5rem;padding-bottom:.2rem;border-bottom:1px solid #ddd}
h3{font-size:1rem;margin:1.2rem 0 .3rem}
nav{font-size:.85rem}
nav a{margin-right:.6rem;white-space:nowrap}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:.82rem;font-variant-numeric:tabular-nums;margin:.3rem 0}
th,td{padding:.22rem .5rem;border-bottom:1px solid #e5e5e5;text-align:right;white-space:nowrap;vertical-align:top}
th{background:#f6f6f6;font-weight:600}
th.l,td.l{text-align:left}
td.wrap{white-space:normal;min-width:16rem;text-align:left}
figure{margin:.8rem 0;max-width:100%}
figure svg{display:block;max-width:100%;height:auto}
figcaption,.note{font-size:.8rem;color:#555}
.charts{display:flex;flex-wrap:wrap;gap:.5rem 1.5rem}
.missing{color:#777;font-style:italic}
.warnings li{margin:.3rem 0}
pre{background:#f6f6f6;padding:.7rem;overflow-x:auto;font-size:.78rem;line-height:1.35}
@media (max-width:40rem){body{font-size:14px}main{padding:.5rem}}
@media print{
body{font-size:10pt}
main{max-width:none;padding:0}
nav{display:none}
a{color:inherit;text-decoration:none}
.scroll{overflow:visible}
table{font-size:7.5pt}
th,td{white-space:normal}
pre{white-space:pre-wrap;font-size:7pt}
figure,table,pre{break-inside:avoid}
h2,h3{break-after:avoid}
}
"""


# --------------------------------------------------------------------------- charts


class _Charts:
    """Numbers the charts of one page: each chart's SVG ids get its own prefix (c1-, c2-...)."""

    def __init__(self):
        self.count = 0

    def svg(self, fig: Figure, title: str) -> str:
        """``fig`` as an inline <svg> element with the accessible name ``title``."""
        self.count += 1
        prefix = f"c{self.count}-"
        buffer = io.StringIO()
        # the salt makes matplotlib's hashed ids (clip paths, markers) the same from one rendering to the next
        with matplotlib.rc_context({**CHART_STYLE, "svg.hashsalt": prefix}):
            fig.savefig(buffer, format="svg", metadata={"Date": None})
        return _inline_svg(buffer.getvalue(), prefix, title)


def _inline_svg(text: str, prefix: str, title: str) -> str:
    """Matplotlib's SVG file made fit to sit in a page: no XML prolog, doctype or metadata, no namespace
    declarations (an HTML parser puts <svg> in its namespace itself), ids that are referenced prefixed (the
    others dropped: they are matplotlib's group names), one short local font list."""
    text = text[text.index("<svg") :]
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)
    tags = re.compile(r"<[^>]*>")  # the edits touch tags only: a label's text is written as it is
    used = {ref for tag in tags.findall(text) for ref in re.findall(r'(?:url\(#|href="#)([^")]+)', tag)}

    def edit(match: re.Match) -> str:
        tag = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", match.group(0))
        tag = re.sub(r'\sid="([^"]+)"', lambda m: f' id="{prefix}{m.group(1)}"' if m.group(1) in used else "", tag)
        tag = re.sub(r'(url\(#|href="#)([^")]+)', lambda m: f"{m.group(1)}{prefix}{m.group(2)}", tag)
        return re.sub(r'font-family: [^;"]*', f"font-family: {CHART_FONTS}", tag)

    text = tags.sub(edit, text)
    text = text.replace("<svg ", f'<svg role="img" aria-label="{escape(title)}" ', 1)
    return text.strip()


@contextmanager
def _style():
    """The charts' rc settings while a figure is built (matplotlib reads many of them when an artist is made)."""
    with matplotlib.rc_context(CHART_STYLE):
        yield


def _label(text) -> str:
    """Text for matplotlib drawn as written: a '$' would start mathtext."""
    return str(text).replace("$", r"\$")


def _colour(stage) -> str:
    return STAGE_COLOURS.get(str(stage), "#7f7f7f")


def _log_x(ax, xs: list[float], text) -> None:
    """A log x axis over ``xs`` with room for the labels right of the points, its ticks written by ``text``.

    Spanning less than two decades, the axis also labels 2 and 5 times each power of ten: a log axis over
    0.09 to 0.3 ms would otherwise show a single number.
    """
    lo, hi = min(xs), max(xs)
    left, right = lo / 1.8, hi * (3.5 if hi / lo > 2 else 6)
    ax.set_xscale("log")
    ax.set_xlim(left, right)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: text(v) if v > 0 else ""))
    if math.log10(right / left) < 2:

        def minor(v, _):
            mantissa = round(v / 10 ** math.floor(math.log10(v)), 6) if v > 0 else 0
            return text(v) if mantissa in (2, 5) else ""

        ax.xaxis.set_minor_formatter(FuncFormatter(minor))
    else:
        ax.xaxis.set_minor_formatter(NullFormatter())


def _bytes_text(value: float) -> str:
    return bytes_text(int(round(value)))


def _ms_text(value: float) -> str:
    return f"{value:g} ms"


def _percent(value) -> float:
    return float("nan") if value is None else float(value) * 100


LABEL_SIZE = 6.5  # points


CHAR_WIDTH = 0.62  # DejaVu Sans's mean advance in ems, a little generous: a margin rather roomy than cut
LEGEND_ROW = 0.22  # inches a row of a legend below the axes takes


def _text_inches(text, size: float) -> float:
    """About how wide ``text`` is at ``size`` points, in inches."""
    return CHAR_WIDTH * size * len(str(text)) / 72


def _short(text, limit: int) -> str:
    """``text`` cut in the middle to at most ``limit`` characters (long layer or class names on an axis)."""
    text = str(text)
    return text if len(text) <= limit else text[: limit // 2 - 1] + "…" + text[-(limit - limit // 2) :]


def _frame(fig: Figure, left=0.62, right=0.15, bottom=0.5, top=0.3, gap=0.0, columns=1) -> None:
    """Place the subplots with fixed margins, in inches.

    Matplotlib's constrained layout would find the margins itself, but it measures every text of a figure to do
    so, which doubled the time a report's charts take; and a report is written after every run.
    """
    width, height = fig.get_size_inches()
    axes_width = (width - left - right - gap * (columns - 1)) / columns
    fig.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        bottom=bottom / height,
        top=1 - top / height,
        wspace=gap / axes_width if columns > 1 else None,
    )


def _legend_below(fig: Figure, handles=None, labels=None, columns: int = 4) -> None:
    args = () if handles is None else (handles, labels)
    fig.legend(
        *args,
        loc="lower center",
        bbox_to_anchor=(0.5, 0.0),
        ncols=columns,
        frameon=False,
        handletextpad=0.4,
        columnspacing=1.2,
        borderaxespad=0.2,
    )


def _boxes_overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _place_labels(fig: Figure, ax, items: list[tuple[float, float, str, str]]) -> None:
    """Label each point (x, y, text, colour) beside it, on the first side where the label stays inside the axes
    and overlaps no other label.

    A label whose text is already written next to a point close by (two runs' points of the same stage) is left
    out: the points' colours tell the runs apart. The margins and axis limits must be set before.
    """
    ax.get_xlim(), ax.get_ylim()  # brings autoscaled limits up to date: transData reads them as they stand
    scale = 72 / fig.dpi
    frame = [v * scale for v in ax.get_window_extent().extents]
    height = LABEL_SIZE
    placed: list[tuple[float, float, float, float, str, float, float]] = []
    for x, y, text, colour in items:
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        px, py = (v * scale for v in ax.transData.transform((x, y)))
        w = _text_inches(text, LABEL_SIZE) * 72
        if any(other[4] == text and abs(other[5] - px) < 12 and abs(other[6] - py) < 2 * height for other in placed):
            continue
        sides = [
            (4, 2, "left"),
            (4, -2 - height, "left"),
            (-4, 2, "right"),
            (-4, -2 - height, "right"),
            (4, 2 + height, "left"),
            (4, -2 - 2 * height, "left"),
        ]
        choices = []
        for dx, dy, ha in sides:
            left = px + dx if ha == "left" else px + dx - w
            box = (left, py + dy, left + w, py + dy + height)
            inside = box[0] >= frame[0] and box[2] <= frame[2] and box[1] >= frame[1] and box[3] <= frame[3]
            free = not any(_boxes_overlap(box, other[:4]) for other in placed)
            choices.append((not (inside and free), not inside, (dx, dy, ha, box)))
        dx, dy, ha, box = min(choices, key=lambda c: c[:2])[2]  # the first free side inside; else inside; else right
        ax.annotate(
            _label(text),
            (x, y),
            xytext=(dx, dy),
            textcoords="offset points",
            fontsize=LABEL_SIZE,
            color=colour,
            ha=ha,
            va="bottom",
        )
        placed.append((*box, text, px, py))


def _points(report: dict) -> list[dict]:
    """Every stage and loaded artifact as a point: label, colour, accuracy (%), its SE, bytes, marker."""
    points = []
    for r in report.get("stages") or []:
        points.append(
            {
                "label": r.get("stage"),
                "colour": _colour(r.get("stage")),
                "marker": "o",
                "accuracy": r.get("accuracy"),
                "se": r.get("accuracy_se"),
                "bytes": r.get("checkpoint_bytes"),
                "row": r,
            }
        )
    for a in report.get("artifacts") or []:
        if a.get("refused") or a.get("accuracy") is None:
            continue
        points.append(
            {
                "label": Path(str(a.get("path"))).name,
                "colour": _colour(a.get("stage")),
                "marker": "s",
                "accuracy": a.get("accuracy"),
                "se": a.get("accuracy_se"),
                "bytes": a.get("bytes"),
                "row": a,
            }
        )
    return points


def _size_chart(report: dict, charts: _Charts) -> str | None:
    points = [p for p in _points(report) if p["bytes"] and p["accuracy"] is not None]
    if not points:
        return None
    with _style():
        fig = Figure(figsize=(6.4, 3.4))
        ax = fig.add_subplot()
        _frame(fig)
        for p in points:
            x, y = p["bytes"], _percent(p["accuracy"])
            ax.errorbar(
                [x],
                [y],
                yerr=None if p["se"] is None else [p["se"] * 100],
                fmt=p["marker"],
                color=p["colour"],
                capsize=2.5,
                elinewidth=1,
            )
        _log_x(ax, [p["bytes"] for p in points], _bytes_text)
        ax.set_xlabel("bytes on disk (log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("accuracy against size: stages (circles), exported files (squares)")
        _place_labels(fig, ax, [(p["bytes"], _percent(p["accuracy"]), p["label"], p["colour"]) for p in points])
        return charts.svg(fig, "accuracy against bytes on disk")


def _latency_batch(report: dict) -> int | None:
    """The batch size the latency chart shows: 64 when measured, else the largest one measured."""
    rows = list(report.get("stages") or []) + list(report.get("artifacts") or [])
    measured = {int(b) for r in rows for b in (r.get("latency_ms") or {})}
    if not measured:
        return None
    return LATENCY_BATCH if LATENCY_BATCH in measured else max(measured)


def _latency_chart(report: dict, batch: int, charts: _Charts) -> str | None:
    points = []
    for p in _points(report):
        ms = latency_at(p["row"], batch)
        if ms is None or ms <= 0:
            continue
        spread = (p["row"].get("latency") or {}).get(str(batch)) or {}
        low, high = spread.get("p25_ms"), spread.get("p75_ms")
        xerr = [[max(0.0, ms - low)], [max(0.0, high - ms)]] if low is not None and high is not None else None
        points.append((p, ms, xerr))
    if not points:
        return None
    with _style():
        fig = Figure(figsize=(6.4, 3.2))
        ax = fig.add_subplot()
        _frame(fig)
        for p, ms, xerr in points:
            y = _percent(p["accuracy"])
            ax.errorbar(
                [ms],
                [y],
                xerr=xerr,
                yerr=None if p["se"] is None else [p["se"] * 100],
                fmt=p["marker"],
                color=p["colour"],
                capsize=2.5,
                elinewidth=1,
            )
        _log_x(ax, [ms for _, ms, _ in points], _ms_text)
        ax.set_xlabel(f"latency at batch {batch}, median ms (log scale; bars: interquartile range)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"accuracy against latency, batch {batch}")
        _place_labels(fig, ax, [(ms, _percent(p["accuracy"]), p["label"], p["colour"]) for p, ms, _ in points])
        return charts.svg(fig, f"accuracy against latency at batch {batch}")


def _eval_split(curve: list[dict]) -> str:
    """'val' when the stage evaluated on a held-out validation split each epoch, else 'test'."""
    return "val" if any(p.get("val_accuracy") is not None for p in curve) else "test"


def _curve_chart(row: dict, charts: _Charts) -> str | None:
    curve = [p for p in row.get("curve") or [] if isinstance(p, dict) and p.get("epoch") is not None]
    if not curve:
        return None
    stage = row.get("stage")
    split = _eval_split(curve)
    epochs = [p["epoch"] for p in curve]

    def series(key):
        return [float("nan") if p.get(key) is None else float(p[key]) for p in curve]

    marker = "o" if len(curve) < 25 else None
    with _style():
        fig = Figure(figsize=(4.8, 2.5))  # two side by side on a wide screen
        loss_ax, acc_ax = fig.subplots(1, 2)
        loss_ax.plot(epochs, series("train_loss"), marker=marker, color="#4c72b0", label="train")
        loss_ax.plot(epochs, series(f"{split}_loss"), marker=marker, color="#dd8452", label=split)
        loss_ax.set_title(f"{_label(stage)}: loss")
        acc_ax.plot(epochs, [v * 100 for v in series("train_accuracy")], marker=marker, color="#4c72b0", label="train")
        acc_ax.plot(epochs, [v * 100 for v in series(f"{split}_accuracy")], marker=marker, color="#dd8452", label=split)
        acc_ax.set_title(f"{_label(stage)}: accuracy (%)")
        handles, labels = acc_ax.get_legend_handles_labels()
        sparsity = series("sparsity")
        if any(not math.isnan(v) for v in sparsity):
            acc_ax.spines["right"].set_visible(True)
            twin = acc_ax.twinx()
            twin.grid(False)
            twin.spines["top"].set_visible(False)
            line = twin.plot(
                epochs, [v * 100 for v in sparsity], marker=marker, linestyle="--", color="#c44e52", label="sparsity"
            )
            twin.set_ylabel("sparsity (%)", color="#c44e52")
            twin.set_ylim(0, 100)
            handles, labels = handles + line, labels + ["sparsity"]
        for ax in (loss_ax, acc_ax):
            ax.set_xlabel("epoch")
            if len(set(epochs)) < 8:
                ax.set_xticks(sorted(set(epochs)))
        _frame(
            fig,
            left=0.45,
            right=0.5 if len(labels) > 2 else 0.15,
            bottom=0.45 + LEGEND_ROW,
            top=0.28,
            gap=0.45,
            columns=2,
        )
        _legend_below(fig, handles, labels, columns=len(labels))
        return charts.svg(fig, f"training curves of the {stage} stage")


def _layers_chart(row: dict, charts: _Charts) -> tuple[str | None, str]:
    """Per-layer bars for one stage: the share of weights (or channels) kept, with the counts. Also a note."""
    layers = [layer for layer in row.get("layers") or [] if isinstance(layer, dict)]
    if not layers:
        return None, ""
    note = ""
    if len(layers) > MAX_LAYERS_SHOWN:
        note = f"The first {MAX_LAYERS_SHOWN} of {len(layers)} layers. "
        layers = layers[:MAX_LAYERS_SHOWN]
    kind = "channels" if any(layer.get("kind") == "channels" for layer in layers) else "weights"
    names = [_label(_short(layer.get("name") or "?", 36)) for layer in layers][::-1]  # first layer on top
    shares, texts = [], []
    for layer in layers[::-1]:
        kept, total = layer.get("kept"), layer.get("total")
        share = kept / total * 100 if kept is not None and total else float("nan")
        shares.append(share)
        texts.append(
            f"{number_text(kept)} / {number_text(total)}" if total else f"{number_text(kept)} (dense size unknown)"
        )
    with _style():
        fig = Figure(figsize=(6.4, 0.8 + 0.22 * len(layers)))
        ax = fig.add_subplot()
        left = 0.2 + max(_text_inches(n, 7) for n in names)
        _frame(fig, left=left, bottom=0.45, top=0.28)
        # the counts are written right of the 100 % mark: the axis goes on as far as the longest needs
        room = (max(_text_inches(t, LABEL_SIZE) for t in texts) + _text_inches("100.0%  ", LABEL_SIZE) + 0.05) / (
            6.4 - left - 0.15
        )
        xmax = 101 / (1 - min(room, 0.6))
        ax.barh(range(len(layers)), [100] * len(layers), color="#eeeeee", height=0.7)
        ax.barh(
            range(len(layers)), [0 if math.isnan(s) else s for s in shares], color=_colour(row.get("stage")), height=0.7
        )
        for i, (share, text) in enumerate(zip(shares, texts)):
            shown = "" if math.isnan(share) else f"{share:.1f}%  "
            ax.text(101, i, _label(shown + text), va="center", fontsize=LABEL_SIZE)
        ax.set_yticks(range(len(layers)), names)
        ax.set_xlim(0, xmax)
        ax.set_xticks([0, 25, 50, 75, 100])
        ax.grid(axis="y", visible=False)
        ax.set_xlabel(f"{kind} kept (%)")
        ax.set_title(f"{_label(row.get('stage'))}: kept {kind} per layer")
        svg = charts.svg(fig, f"kept {kind} per layer of the {row.get('stage')} stage")
    return svg, note


def _per_class_chart(rows: list[dict], classes: list[str], shown: list[int], charts: _Charts) -> str:
    width = 0.8 / len(rows)
    with _style():
        names = [_label(_short(classes[i], 24)) for i in shown]
        angle = 35 if len(shown) <= 12 else 65
        # the class names are written at an angle: their height below the axis
        below = max(_text_inches(n, 7) for n in names) * math.sin(math.radians(angle)) + 7 / 72 * math.cos(
            math.radians(angle)
        )
        fig = Figure(figsize=(min(9.6, max(6.4, 0.06 * len(shown) * len(rows) + 1)), 2.4 + below))
        ax = fig.add_subplot()
        _frame(fig, bottom=0.15 + below + LEGEND_ROW, top=0.28)
        for k, r in enumerate(rows):
            accuracy = r["per_class"].get("accuracy") or []
            values = [_percent(accuracy[i]) if i < len(accuracy) else float("nan") for i in shown]
            ax.bar(
                [i + (k - (len(rows) - 1) / 2) * width for i in range(len(shown))],
                values,
                width=width,
                color=_colour(r["stage"]),
                label=_label(r["stage"]),
            )
        ax.set_xticks(range(len(shown)), names, rotation=angle, ha="right", rotation_mode="anchor")
        ax.set_ylim(0, 100)
        ax.grid(axis="x", visible=False)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("per-class test accuracy")
        _legend_below(fig, columns=len(rows))
        return charts.svg(fig, "per-class test accuracy of each stage")


def _seeds_chart(rows: list[dict], charts: _Charts) -> str:
    with _style():
        fig = Figure(figsize=(5.2, 2.6))
        ax = fig.add_subplot()
        _frame(fig, bottom=0.3, top=0.28)
        for i, r in enumerate(rows):
            accs = [_percent(e.get("accuracy")) for e in r.get("seeds") or []]
            colour = _colour(r.get("stage"))
            ax.plot([i - 0.12] * len(accs), accs, "o", color=colour, alpha=0.7, markersize=3.5)
            std = r.get("accuracy_std")
            ax.errorbar(
                [i + 0.12],
                [_percent(r.get("accuracy_mean"))],
                yerr=None if std is None else [std * 100],
                fmt="D",
                color=colour,
                capsize=3,
                markersize=4,
            )
        ax.set_xticks(range(len(rows)), [_label(r.get("stage")) for r in rows])
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.grid(axis="x", visible=False)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("each seed (dots) and mean ± std (diamonds)")
        return charts.svg(fig, "test accuracy of each seed per stage")


def _comparison_chart(comparison: dict, charts: _Charts) -> str | None:
    runs = comparison.get("runs") or []
    with _style():
        legend_rows = math.ceil(max(1, len(runs)) / 4)
        fig = Figure(figsize=(6.8, 3.4 + LEGEND_ROW * legend_rows))
        ax = fig.add_subplot()
        _frame(fig, bottom=0.5 + LEGEND_ROW * legend_rows)
        labels = []
        for n, run in enumerate(runs):
            colour = RUN_COLOURS[n % len(RUN_COLOURS)]
            # runs side by side: two runs' equal points would hide one another
            dodge = DODGE ** (n - (len(runs) - 1) / 2)
            points = [p for p in _points(run.get("report") or {}) if p["bytes"] and p["accuracy"] is not None]
            for k, p in enumerate(points):
                x, y = p["bytes"] * dodge, _percent(p["accuracy"])
                ax.errorbar(
                    [x],
                    [y],
                    yerr=None if p["se"] is None else [p["se"] * 100],
                    fmt=p["marker"],
                    color=colour,
                    capsize=2.5,
                    elinewidth=1,
                    label=_label(run["name"]) if k == 0 else None,
                )
                labels.append((x, y, p["label"], colour))
        if not labels:
            return None
        _log_x(ax, [x for x, _, _, _ in labels], _bytes_text)
        ax.set_xlabel("bytes on disk (log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("accuracy against size, every run: stages (circles), exported files (squares)")
        _legend_below(fig, columns=min(len(runs), 4))
        _place_labels(fig, ax, labels)
        return charts.svg(fig, "accuracy against bytes on disk, every run")


# --------------------------------------------------------------------------- page pieces


def _e(value) -> str:
    return escape("" if value is None else str(value))


def _table(header: list[str] | None, rows: list[list[str]], left: int = 1) -> str:
    """A table (cells already escaped HTML) in a box that scrolls sideways on a narrow screen; the first
    ``left`` columns are text, aligned left. No header row when ``header`` is None. A row may end in a tuple
    (html, n): one cell spanning n columns."""
    head = (
        ""
        if header is None
        else "<thead><tr>"
        + "".join(f"<th{' class=l' if i < left else ''}>{h}</th>" for i, h in enumerate(header))
        + "</tr></thead>"
    )
    body = "".join(
        "<tr>" + "".join(f"<td{' class=l' if i < left else ''}>{c}</td>" for i, c in enumerate(row)) + "</tr>"
        if not isinstance(row[-1], tuple)
        # a row that ends in (html, span): that cell spans the remaining columns (a refused file's reason)
        else "<tr>"
        + "".join(f"<td class=l>{c}</td>" for c in row[:-1])
        + f"<td class=l colspan={row[-1][1]}>{row[-1][0]}</td></tr>"
        for row in rows
    )
    return f'<div class="scroll"><table>{head}<tbody>{body}</tbody></table></div>'


def _figure(svg: str | None, caption: str, missing: str = "nothing to draw") -> str:
    if svg is None:
        return f'<p class="missing">{escape(missing)}</p>'
    # as wide as its chart, so that the caption wraps under it and charts sit side by side where there is room
    width = re.search(r'<svg[^>]*\swidth="([0-9.]+pt)"', svg)
    style = f' style="width:{width.group(1)}"' if width else ""
    return f"<figure{style}>{svg}<figcaption>{escape(caption)}</figcaption></figure>"


def _missing(text: str = NOT_RECORDED) -> str:
    return f'<p class="missing">{escape(text)}</p>'


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def _accuracy_cell(row: dict) -> str:
    if is_seeded(row) and row.get("accuracy_mean") is not None:
        std = row.get("accuracy_std")
        return f"{row['accuracy_mean'] * 100:.2f} ± {(std or 0.0) * 100:.2f} (std)"
    if row.get("accuracy") is None:
        return ""
    se = row.get("accuracy_se")
    return f"{row['accuracy'] * 100:.2f} ± " + ("?" if se is None else f"{se * 100:.2f}")


def _stage_table(report: dict) -> str:
    rows = report.get("stages") or []
    batches = report.get("latency_batches") or []
    header = [
        "stage",
        "model",
        "epochs",
        "test acc %<br>± SE",
        "vs teacher<br>points",
        "params",
        "non-zero",
        "sparsity",
        "bytes on disk",
        "bytes ratio<br>vs teacher",
        "MACs",
        "MACs if<br>sparse",
    ]
    header += [f"latency ms<br>batch {b}" for b in batches]
    body = []
    for r in rows:
        cells = [
            _e(r.get("stage")) + ("*" if r.get("stale") else ""),
            _e(r.get("model")),
            _e(r.get("epochs")),
            _accuracy_cell(r),
            points_text(r.get("accuracy_change_vs_teacher")),
            compact(r.get("params")),
            compact(r.get("nonzero_params")),
            _e(sparsity_text(r)) if r.get("sparsity") is not None or r.get("channel_sparsity") is not None else "",
            "" if r.get("checkpoint_bytes") is None else _e(bytes_text(r["checkpoint_bytes"])),
            ratio_text(r.get("bytes_ratio_vs_teacher")),
            compact(r.get("macs")),
            compact(r.get("sparse_macs")),
        ]
        cells += ["" if latency_at(r, b) is None else ms_text(latency_at(r, b)) for b in batches]
        body.append(cells)
    return _table(header, body, left=2)


def _artifact_table(report: dict) -> str:
    batches = report.get("latency_batches") or []
    header = [
        "file",
        "stage",
        "format",
        "bytes",
        "teacher<br>/ file",
        "stage<br>/ file",
        "test acc %<br>± SE",
        "vs stage<br>points",
    ] + [f"latency ms<br>batch {b}" for b in batches]
    body = []
    for a in report.get("artifacts") or []:
        name = _e(a.get("path")) + ("*" if a.get("stale") else "")
        options = a.get("options") or {}
        fmt = _e(a.get("format")) + (
            _e(" (" + ", ".join(f"{k} {v}" for k, v in options.items()) + ")") if options else ""
        )
        if a.get("refused"):
            body.append(
                [
                    name,
                    _e(a.get("stage")),
                    fmt,
                    (f'<span class="missing">refused: {_e(a["refused"])}</span>', 5 + len(batches)),
                ]
            )
            continue
        body.append(
            [
                name,
                _e(a.get("stage")),
                fmt,
                "" if a.get("bytes") is None else _e(bytes_text(a["bytes"])),
                ratio_text(a.get("compression_vs_teacher")),
                ratio_text(a.get("compression_vs_stage")),
                "" if a.get("accuracy") is None else _accuracy_cell(a),
                points_text(a.get("accuracy_change_vs_stage")),
            ]
            + ["" if latency_at(a, b) is None else ms_text(latency_at(a, b)) for b in batches]
        )
    return _table(header, body, left=3)


def _stages_section(report: dict) -> str:
    rows = report.get("stages") or []
    parts = ['<section id="stages"><h2>Stages and artifacts</h2>', _stage_table(report)]
    notes = [
        f"Test accuracy ± its binomial standard error sqrt(p(1-p)/n); a difference counts as within noise when at "
        f"most {report.get('noise_z', NOISE_Z):g} standard errors of the difference.",
        'Sparsity: the share of prunable weights that are exactly zero ("ch": the share of channels removed).',
        "Bytes on disk are the checkpoint file's; zeros in a dense tensor do not shrink it.",
        _sentence(SPARSE_MACS_NOTE),
        _sentence(latency_note(report)),
    ]
    if any(r.get("stale") for r in rows):
        notes.insert(0, "*: stale, the checkpoint is not what the run's recipe.yaml now describes (see the warnings).")
    if any(is_seeded(r) for r in rows):
        notes.insert(0, "Test accuracy: mean ± sample std over the seeds; the other columns are the first seed's.")
    parts.append("".join(f'<p class="note">{escape(n)}</p>' for n in notes))
    settings = [(r.get("stage"), r.get("description"), r.get("settings")) for r in rows if r.get("settings")]
    if settings:
        parts.append(
            "<h3>Settings</h3><ul>"
            + "".join(
                f"<li><b>{_e(stage)}</b>{': ' + _e(desc) if desc else ''}: {_e(settings_text(s))}</li>"
                for stage, desc, s in settings
            )
            + "</ul>"
        )
    if report.get("comparisons"):
        parts.append(
            "<h3>Differences</h3><ul>"
            + "".join(f"<li>{_e(comparison_name(c))}: {_e(comparison_text(c))}</li>" for c in report["comparisons"])
            + "</ul>"
        )
    parts.append("<h3>Exported artifacts</h3>")
    if report.get("artifacts"):
        parts.append(_artifact_table(report))
        parts.append(
            '<p class="note">Files written by <code>kdc export</code> to export/; accuracy measured from each '
            "file loaded back; teacher / file and stage / file: checkpoint bytes over file bytes.</p>"
        )
    else:
        parts.append(_missing("none: `kdc export RUN_DIR` writes the files to ship and adds them here"))
    parts.append("</section>")
    return "".join(parts)


def _size_section(report: dict, charts: _Charts) -> str:
    return (
        '<section id="size"><h2>Accuracy against size</h2>'
        + _figure(
            _size_chart(report, charts),
            "Test accuracy against bytes on disk (log scale), one point per stage checkpoint and per exported "
            "file; the bars are ± one standard error of the accuracy.",
        )
        + "</section>"
    )


def _latency_section(report: dict, charts: _Charts) -> str:
    batch = _latency_batch(report)
    if batch is None:
        body = _missing("latency not measured (report.latency: false, or no batch size measured)")
    else:
        body = _figure(
            _latency_chart(report, batch, charts),
            f"Test accuracy against the median latency of a CPU forward pass at batch {batch}; "
            + latency_note(report)
            + ".",
        )
    return f'<section id="latency"><h2>Accuracy against latency</h2>{body}</section>'


def _curves_section(report: dict, charts: _Charts) -> str:
    rows = report.get("stages") or []
    parts = ['<section id="curves"><h2>Training curves</h2>']
    if not any("curve" in r for r in rows):
        parts.append(_missing())
    else:
        figures, empty = [], []
        for r in rows:
            svg = _curve_chart(r, charts)
            if svg is None:
                empty.append(str(r.get("stage")))
                continue
            split = _eval_split(r.get("curve") or [])
            figures.append(
                _figure(
                    svg,
                    f"{r.get('stage')}: loss and accuracy per epoch, on the training data (in "
                    f"training mode) and the {'validation' if split == 'val' else 'test'} split"
                    + (
                        "; dashed: the pruning schedule's sparsity (right axis)"
                        if any((p or {}).get("sparsity") is not None for p in r.get("curve") or [])
                        else ""
                    )
                    + ".",
                )
            )
        parts.append('<div class="charts">' + "".join(figures) + "</div>")
        if empty:
            parts.append(
                _missing(f"no per-epoch record for: {', '.join(empty)} (a supplied teacher is not trained here)")
            )
    parts.append("</section>")
    return "".join(parts)


def _layers_section(report: dict, charts: _Charts) -> str:
    rows = {r.get("stage"): r for r in report.get("stages") or []}
    parts = ['<section id="layers"><h2>Where the weights went</h2>']
    pruned = rows.get("pruned")
    if pruned is None:
        parts.append(_missing("no pruned stage in this run"))
    elif "layers" not in pruned:
        parts.append(_missing())
    else:
        svg, note = _layers_chart(pruned, charts)
        channels = any(layer.get("kind") == "channels" for layer in pruned.get("layers") or [])
        caption = note + (
            "Output channels (features) each prunable layer keeps after structured pruning, against "
            "the distilled student it was pruned from."
            if channels
            else "Non-zero weights each prunable layer (Conv/Linear) keeps after pruning."
        )
        parts.append(_figure(svg, caption, "no prunable layer recorded"))
    parts.append("</section>")
    return "".join(parts)


def _per_class_section(report: dict, charts: _Charts) -> str:
    parts = ['<section id="classes"><h2>Per-class accuracy</h2>']
    stages = report.get("stages") or []
    rows = [r for r in stages if r.get("stage") in PER_CLASS_STAGES and isinstance(r.get("per_class"), dict)]
    if not rows:
        parts.append(
            _missing()
            if not any("per_class" in r for r in stages)
            else _missing("no stage checkpoint recorded its confusion matrix")
        )
    else:
        classes = [str(c) for c in rows[0]["per_class"].get("classes") or []]
        rows = [r for r in rows if len(r["per_class"].get("classes") or []) == len(classes)]
        shown = list(range(len(classes)))
        note = ""
        if len(classes) > MAX_CLASSES_SHOWN:

            def spread(i):
                values = [r["per_class"]["accuracy"][i] for r in rows if r["per_class"]["accuracy"][i] is not None]
                return max(values) - min(values) if values else -1.0

            shown = sorted(sorted(shown, key=spread, reverse=True)[:MAX_CLASSES_SHOWN])
            note = f"The {MAX_CLASSES_SHOWN} of {len(classes)} classes whose accuracy differs most between the stages. "
        parts.append(
            _figure(
                _per_class_chart(rows, classes, shown, charts),
                note + "Share of each class's test images the model classifies right.",
            )
        )
        table = [
            [_e(classes[i])]
            + [
                ""
                if (r["per_class"].get("accuracy") or [None] * len(classes))[i] is None
                else f"{r['per_class']['accuracy'][i] * 100:.1f}"
                for r in rows
            ]
            for i in shown
        ]
        parts.append(_table(["class"] + [f"{_e(r['stage'])} %" for r in rows], table))
    parts.append("<h3>Confusions that changed most</h3>")
    changes = report.get("class_changes")
    if changes is None:
        parts.append(_missing())
    elif not changes:
        parts.append(_missing("no confusion changed between the stages compared"))
    else:
        names = {}
        for r in stages:
            if isinstance(r.get("per_class"), dict):
                names = names or list(r["per_class"].get("classes") or [])

        def name(change, key):
            given = change.get(f"{key}_name")
            index = change.get(key)
            if given is None and isinstance(index, int) and 0 <= index < len(names):
                given = names[index]
            return given if given is not None else index

        body = [
            [
                _e(c.get("from_stage")) + " → " + _e(c.get("to_stage")),
                _e(name(c, "true")),
                _e(name(c, "predicted")),
                _e(c.get("before")),
                _e(c.get("after")),
                "" if c.get("change") is None else f"{c['change']:+d}",
            ]
            for c in changes
        ]
        parts.append(_table(["models", "true class", "predicted as", "before", "after", "change"], body, left=3))
        parts.append(
            '<p class="note">Test images of the true class predicted as the other class, before and after; '
            "the largest changes between the student, the distilled and the pruned models.</p>"
        )
    parts.append("</section>")
    return "".join(parts)


def _seeds_section(report: dict, charts: _Charts) -> str | None:
    rows = [r for r in report.get("stages") or [] if is_seeded(r)]
    if not rows:
        return None
    seeds = sorted({e.get("seed") for r in rows for e in r.get("seeds") or []}, key=str)
    body = []
    for r in rows:
        accs = {e.get("seed"): e.get("accuracy") for e in r.get("seeds") or []}
        std = r.get("accuracy_std")
        body.append(
            [_e(r.get("stage")) + (" (trained once)" if r.get("trained_once") else "")]
            + ["" if accs.get(s) is None else f"{accs[s] * 100:.2f}" for s in seeds]
            + [
                "" if r.get("accuracy_mean") is None else f"{r['accuracy_mean'] * 100:.2f}",
                "" if std is None else f"{std * 100:.2f}",
            ]
        )
    parts = [
        '<section id="seeds"><h2>Seeds</h2>',
        _figure(
            _seeds_chart(rows, charts),
            "Test accuracy of each seed's run, and their mean ± sample std; a "
            "stage trained once is shared by every seed.",
        ),
        _table(["stage"] + [f"seed {_e(s)} %" for s in seeds] + ["mean %", "std (points)"], body),
    ]
    comps = [c for c in report.get("comparisons") or [] if ((c.get("seeds") or {}).get("n") or 0) > 1]
    if comps:
        parts.append(
            "<h3>Differences per seed</h3><ul>"
            + "".join(
                f"<li>{_e(comparison_name(c))}, {c['seeds']['n']} seeds: {_e(seed_comparison_text(c['seeds']))}</li>"
                for c in comps
            )
            + "</ul>"
        )
    parts.append("</section>")
    return "".join(parts)


def _warnings_section(report: dict) -> str:
    warnings = report.get("warnings") or []
    body = (
        ('<ul class="warnings">' + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul>")
        if warnings
        else '<p class="missing">none</p>'
    )
    return f'<section id="warnings"><h2>Warnings</h2>{body}</section>'


def _recipe_section(report: dict) -> str:
    recipe = report.get("recipe_resolved")
    if not isinstance(recipe, dict):
        body = _missing()
    else:
        body = "<pre>" + escape(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True, width=100)) + "</pre>"
    return f'<section id="recipe"><h2>Resolved recipe</h2>{body}</section>'


ENVIRONMENT_ROWS = (
    ("kdcompress", "kdcompress"),
    ("torch", "torch"),
    ("torchvision", "torchvision"),
    ("python", "Python"),
    ("platform", "platform"),
    ("cpu_count", "CPU cores"),
    ("train_device", "trained on"),
    ("latency_threads", "latency threads"),
    ("latency_measured_at", "latency measured at"),
)


def _environment_section(report: dict) -> str:
    env = report.get("environment")
    rows = [("date (report made)", report.get("generated_at") or "not recorded"), ("dataset", report.get("dataset"))]
    if isinstance(env, dict):
        rows += [(label, env.get(key, "not recorded")) for key, label in ENVIRONMENT_ROWS]
        rows += [(key, value) for key, value in env.items() if key not in dict(ENVIRONMENT_ROWS)]
    measured = bool(report.get("latency_batches"))
    rows += [
        ("latency threads asked", report.get("threads_asked")),
        (
            "latency timed with OMP_WAIT_POLICY",
            (report.get("omp_wait_policy") or "unset") if measured else "latency not measured",
        ),
    ]
    body = _table(None, [[_e(label), _e(value)] for label, value in rows], left=2)
    if not isinstance(env, dict):
        body = _missing("versions and device " + NOT_RECORDED) + body
    return f'<section id="environment"><h2>Environment</h2>{body}</section>'


SECTIONS = (
    ("stages", "Stages"),
    ("size", "Size"),
    ("latency", "Latency"),
    ("curves", "Curves"),
    ("layers", "Layers"),
    ("classes", "Classes"),
    ("seeds", "Seeds"),
    ("warnings", "Warnings"),
    ("recipe", "Recipe"),
    ("environment", "Environment"),
)


def _page(title: str, intro: str, sections: list[str]) -> str:
    present = [(key, label) for key, label in SECTIONS if any(f'<section id="{key}">' in s for s in sections)]
    nav = "<nav>" + " ".join(f'<a href="#{key}">{escape(label)}</a>' for key, label in present) + "</nav>"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        f"<h1>{escape(title)}</h1>\n{intro}\n{nav if len(present) > 2 else ''}\n"
        + "\n".join(sections)
        + "\n</main>\n</body>\n</html>\n"
    )


def render_html(report: dict) -> str:
    """The report as one self-contained HTML page: the tables, the charts as inline SVG, the warnings, the
    resolved recipe and the environment. Keys missing from an older report leave their section saying so."""
    charts = _Charts()
    name = report.get("run_name") or report.get("recipe") or "run"
    stages = report.get("stages") or []
    env = report.get("environment") if isinstance(report.get("environment"), dict) else {}
    made_by = f" by kdcompress {env['kdcompress']}" if env.get("kdcompress") else ""
    intro = (
        f'<p class="note">Dataset: {_e(report.get("dataset") or "unknown")}. Stages: '
        f"{_e(', '.join(str(r.get('stage')) for r in stages) or 'none')}. Made "
        f"{_e(report.get('generated_at') or 'at a time not recorded')}{_e(made_by)}.</p>"
    )
    if report.get("warnings"):
        intro += (
            f'<p class="note"><a href="#warnings">{len(report["warnings"])} warning'
            f"{'' if len(report['warnings']) == 1 else 's'}</a> below.</p>"
        )
    sections = [
        _stages_section(report),
        _size_section(report, charts),
        _latency_section(report, charts),
        _curves_section(report, charts),
        _layers_section(report, charts),
        _per_class_section(report, charts),
        _seeds_section(report, charts),
        _warnings_section(report),
        _recipe_section(report),
        _environment_section(report),
    ]
    return _page(f"kdc report: {name}", intro, [s for s in sections if s])


def render_comparison_html(comparison: dict) -> str:
    """A comparison of runs (:func:`kdcompress.report.compare.build_comparison`) as one self-contained HTML page: one
    table with every run's stages and artifacts, one accuracy-against-size chart with every run in its own colour,
    and each run's warnings."""
    charts = _Charts()
    runs = comparison.get("runs") or []
    names = [str(run.get("name")) for run in runs]
    rows = comparison_rows(comparison)
    body = []
    for r in rows:
        label = _e(r["label"]) if r["kind"] == "stage" else f"{_e(r['label'])} <small>(from {_e(r['stage'])})</small>"
        label += "*" if r["stale"] else ""
        if r["refused"]:
            body.append(
                [_e(r["run"]), label, _e(r["detail"]), (f'<span class="missing">refused: {_e(r["refused"])}</span>', 6)]
            )
            continue
        body.append(
            [
                _e(r["run"]),
                label,
                _e(r["detail"]),
                "" if r["accuracy"] is None else f"{r['accuracy'] * 100:.2f}",
                "" if r["accuracy_se"] is None else f"{r['accuracy_se'] * 100:.2f}",
                "" if r["bytes"] is None else _e(bytes_text(r["bytes"])),
                compact(r["nonzero_params"]),
                compact(r["macs"]),
                "" if r["latency_ms"] is None else ms_text(r["latency_ms"]),
            ]
        )
    table = _table(
        [
            "run",
            "stage / artifact",
            "model / format",
            "test acc %",
            "± SE",
            "bytes on disk",
            "non-zero",
            "MACs",
            f"latency ms<br>batch {LATENCY_BATCH}",
        ],
        body,
        left=3,
    )
    intro = (
        f'<p class="note">{len(runs)} run{"" if len(runs) == 1 else "s"}: {_e(", ".join(names))}. Made '
        f"{_e(comparison.get('generated_at') or 'at a time not recorded')}. Each run's own report.html has the "
        f"details; latency compares only between runs timed on the same machine.</p>"
    )
    sections = [
        f'<section id="stages"><h2>Stages and artifacts</h2>{table}</section>',
        '<section id="size"><h2>Accuracy against size</h2>'
        + _figure(
            _comparison_chart(comparison, charts),
            "Test accuracy against bytes on disk (log scale), one colour per run; ± one standard error. Each run's "
            f"points are shifted sideways by {round((DODGE - 1) * 100)} % from the next run's so that equal "
            "points stay visible.",
        )
        + "</section>",
    ]
    warnings = [(run.get("name"), w) for run in runs for w in (run.get("report") or {}).get("warnings") or []]
    sections.append(
        '<section id="warnings"><h2>Warnings</h2>'
        + (
            '<ul class="warnings">' + "".join(f"<li><b>{_e(n)}</b>: {_e(w)}</li>" for n, w in warnings) + "</ul>"
            if warnings
            else '<p class="missing">none</p>'
        )
        + "</section>"
    )
    return _page(f"kdc comparison: {', '.join(names)}", intro, sections)
