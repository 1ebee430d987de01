"""The report's charts, drawn with matplotlib and written as inline SVG for report.html.

One ``matplotlib.figure.Figure`` per chart, saved by its SVG backend (no pyplot state, no GUI backend), text
kept as text, every id prefixed by :class:`Charts` so that several charts on one page never clash. Importing
this module imports matplotlib: the report imports it (through :mod:`.html`) only when it writes a page.
"""

from __future__ import annotations

import io
import math
import re
from contextlib import contextmanager
from html import escape
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from .compare import LATENCY_BATCH, latency_at
from .text import bytes_text, number_text

__all__ = [
    "DODGE",
    "MAX_LAYERS_SHOWN",
    "STAGE_COLOURS",
    "Charts",
    "comparison_chart",
    "curve_chart",
    "baseline_curves_chart",
    "eval_split",
    "frontier_chart",
    "latency_batch",
    "latency_chart",
    "layers_chart",
    "per_class_chart",
    "seeds_chart",
    "sensitivity_chart",
    "size_chart",
]

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
MAX_LAYERS_SHOWN = 60
DODGE = 1.05  # the comparison chart shifts each run's points sideways by this factor (5 %) from the next run's


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


class Charts:
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
    others dropped: they are matplotlib's group names, but for kdc's own, ``gid="kdc-..."``, which name what a
    group draws), one short local font list."""
    text = text[text.index("<svg") :]
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)
    tags = re.compile(r"<[^>]*>")  # the edits touch tags only: a label's text is written as it is
    used = {ref for tag in tags.findall(text) for ref in re.findall(r'(?:url\(#|href="#)([^")]+)', tag)}

    def edit(match: re.Match) -> str:
        tag = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", match.group(0))
        tag = re.sub(
            r'\sid="([^"]+)"',
            lambda m: f' id="{prefix}{m.group(1)}"' if m.group(1) in used or m.group(1).startswith("kdc-") else "",
            tag,
        )
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


def _bytes_tick(value: float) -> str:
    return bytes_text(int(round(value)))


def _ms_tick(value: float) -> str:
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
    out: the points' colours tell the runs apart; so is one with no free side, rather than drawn over another.
    The margins and axis limits must be set before.
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
            choices.append((not (inside and free), not free, not inside, (dx, dy, ha, box)))
        # the first free side inside; else a free side; else none: a label over another helps no one (the colour
        # and the table say which point it is)
        _, taken, _, (dx, dy, ha, box) = min(choices, key=lambda c: c[:3])
        if taken:
            continue
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


def size_chart(report: dict, charts: Charts) -> str | None:
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
        _log_x(ax, [p["bytes"] for p in points], _bytes_tick)
        ax.set_xlabel("bytes on disk (log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("accuracy against size: stages (circles), exported files (squares)")
        _place_labels(fig, ax, [(p["bytes"], _percent(p["accuracy"]), p["label"], p["colour"]) for p in points])
        return charts.svg(fig, "accuracy against bytes on disk")


def latency_batch(report: dict) -> int | None:
    """The batch size the latency chart shows: 64 when measured, else the largest one measured."""
    rows = list(report.get("stages") or []) + list(report.get("artifacts") or [])
    measured = {int(b) for r in rows for b in (r.get("latency_ms") or {})}
    if not measured:
        return None
    return LATENCY_BATCH if LATENCY_BATCH in measured else max(measured)


def latency_chart(report: dict, batch: int, charts: Charts) -> str | None:
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
        _log_x(ax, [ms for _, ms, _ in points], _ms_tick)
        ax.set_xlabel(f"latency at batch {batch}, median ms (log scale; bars: interquartile range)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"accuracy against latency, batch {batch}")
        _place_labels(fig, ax, [(ms, _percent(p["accuracy"]), p["label"], p["colour"]) for p, ms, _ in points])
        return charts.svg(fig, f"accuracy against latency at batch {batch}")


def eval_split(curve: list[dict]) -> str:
    """'val' when the stage evaluated on a held-out validation split each epoch, else 'test'."""
    return "val" if any(p.get("val_accuracy") is not None for p in curve) else "test"


def curve_chart(row: dict, charts: Charts) -> str | None:
    curve = [p for p in row.get("curve") or [] if isinstance(p, dict) and p.get("epoch") is not None]
    if not curve:
        return None
    stage = row.get("stage")
    split = eval_split(curve)
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


def baseline_curves_chart(rows: list[dict], charts: Charts) -> str | None:
    """The student alone and the distilled student on one axes: evaluation accuracy per epoch, the last
    epoch (what each checkpoint holds) marked; None unless both stages have a curve on the same split."""
    curves = {}
    for row in rows:
        if row.get("stage") in ("student", "distilled"):
            curve = [p for p in row.get("curve") or [] if isinstance(p, dict) and p.get("epoch") is not None]
            if curve:
                curves[row["stage"]] = curve
    if len(curves) < 2 or len({eval_split(c) for c in curves.values()}) != 1:
        return None
    split = eval_split(curves["student"])
    with _style():
        fig = Figure(figsize=(4.8, 2.5))
        ax = fig.subplots()
        for stage, color in (("student", "#4c72b0"), ("distilled", "#dd8452")):
            curve = curves[stage]
            values = [
                float("nan") if p.get(f"{split}_accuracy") is None else 100 * float(p[f"{split}_accuracy"])
                for p in curve
            ]
            epochs = [p["epoch"] for p in curve]
            ax.plot(epochs, values, color=color, label=f"{stage} (last epoch {values[-1]:.2f}%)")
            ax.plot(epochs[-1:], values[-1:], marker="o", color=color)
        ax.set_title(f"student alone and distilled: {'validation' if split == 'val' else 'test'} accuracy (%)")
        ax.set_xlabel("epoch")
        _frame(fig, left=0.55, bottom=0.45 + LEGEND_ROW, top=0.28)
        _legend_below(fig, columns=2)
        return charts.svg(fig, "accuracy per epoch of the student alone and the distilled student")


def layers_chart(row: dict, charts: Charts) -> tuple[str | None, str]:
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


def per_class_chart(rows: list[dict], classes: list[str], shown: list[int], charts: Charts) -> str:
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


def seeds_chart(rows: list[dict], charts: Charts) -> str:
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


def comparison_chart(comparison: dict, charts: Charts) -> str | None:
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
        _log_x(ax, [x for x, _, _, _ in labels], _bytes_tick)
        ax.set_xlabel("bytes on disk (log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("accuracy against size, every run: stages (circles), exported files (squares)")
        _legend_below(fig, columns=min(len(runs), 4))
        _place_labels(fig, ax, labels)
        return charts.svg(fig, "accuracy against bytes on disk, every run")


def sensitivity_chart(group: dict, baseline_macs: int | None, unit: str, charts: Charts) -> str | None:
    """One group of ``kdc sensitivity``: the accuracy drop (points, with SE bars) against the share of its
    ``unit`` pruned, and the share of the model's MACs that saves (dashed, right axis) when ``baseline_macs``
    is known. None when the group has no measured point."""
    ratios = [float(r) for r in group.get("ratios") or []]
    drops, ses = group.get("drop") or [], group.get("se") or []
    if not ratios or len(drops) != len(ratios):
        return None
    name = _label(_short(group.get("name") or "?", 40))
    with _style():
        fig = Figure(figsize=(3.9, 2.5))  # three side by side on a wide screen
        ax = fig.add_subplot()
        ax.errorbar(
            [0.0, *(r * 100 for r in ratios)],
            [0.0, *drops],
            yerr=[0.0, *(s * 100 for s in ses)] if len(ses) == len(ratios) else None,
            fmt="o-",
            color="#c44e52",
            capsize=2.5,
            elinewidth=1,
            label="accuracy drop",
        )
        ax.axhline(0.0, color="#999999", linewidth=0.6)
        ax.set_xlim(0, 100)
        ax.set_xlabel(f"{unit} pruned (%)")
        ax.set_ylabel("accuracy drop (points)")
        ax.set_title(f"{name} ({number_text(group.get('size'))} {unit})")
        macs = group.get("macs") or []
        if baseline_macs and len(macs) == len(ratios):
            ax.spines["right"].set_visible(True)
            twin = ax.twinx()
            twin.grid(False)
            twin.spines["top"].set_visible(False)
            saved = [0.0, *((1 - m / baseline_macs) * 100 for m in macs)]
            twin.plot([0.0, *(r * 100 for r in ratios)], saved, linestyle="--", color="#4c72b0", marker=".")
            twin.set_ylabel("MACs saved (%)", color="#4c72b0")
            twin.set_ylim(0, max(5.0, max(saved) * 1.1))
        _frame(fig, left=0.55, right=0.55, bottom=0.45, top=0.28)
        return charts.svg(fig, f"accuracy drop against the share of {group.get('name')} pruned")


FRONTIER_AXES = {  # axis -> (the cost key of a frontier point, its x label, its ticks)
    "latency": ("latency_ms", "latency at batch {batch}, median ms (log scale)", _ms_tick),
    "bytes": ("bytes", "bytes of the exported file (log scale)", _bytes_tick),
}


def _frontier_marks(ax, points: list[dict], on: list[dict], cost: str) -> None:
    """The frontier chart's points: error bars, the non-dominated joined, the dominated hollow, the reference."""
    for p in points:
        if p.get("accuracy_se") is not None:
            ax.errorbar(
                [p[cost]],
                [_percent(p["accuracy"])],
                yerr=[p["accuracy_se"] * 100],
                fmt="none",
                ecolor="#b0b0b0",
                elinewidth=1,
                capsize=2.5,
            )
    on_ids = {id(p) for p in on}
    reference = {"markersize": 6, "markerfacecolor": "none", "markeredgewidth": 1.4}
    layers = [
        (on, "-o", STAGE_COLOURS["pruned"], "kdc-frontier", "non-dominated (joined)", {}),
        (
            [p for p in points if id(p) not in on_ids],
            "o",
            "#8c8c8c",
            "kdc-dominated",
            "dominated",
            {"markerfacecolor": "white"},
        ),
        (
            [p for p in points if p.get("role") == "reference"],
            "D",
            STAGE_COLOURS["distilled"],
            "kdc-reference",
            "reference: distilled student",
            reference,
        ),
    ]
    for group, style, colour, gid, label, extra in layers:
        if group:  # gid: the group's id in the SVG (kept by Charts.svg), for the reader and the tests
            ax.plot(
                [p[cost] for p in group],
                [_percent(p["accuracy"]) for p in group],
                style,
                color=colour,
                gid=gid,
                label=label,
                zorder=3,
                **extra,
            )


def frontier_chart(frontier: dict, axis: str, charts: Charts) -> str | None:
    """Accuracy against one cost (``axis``: latency or bytes) of every point of a frontier
    (:func:`kdcompress.report.frontier.build_frontier`): the non-dominated points filled and joined
    (``gid`` kdc-frontier), the dominated ones hollow (kdc-dominated), the reference drawn as a diamond
    (kdc-reference); each labelled with its budget; bars are ± one standard error."""
    cost, xlabel, tick = FRONTIER_AXES[axis]
    points = [
        p
        for p in frontier.get("points") or []
        if isinstance(p.get(cost), (int, float)) and p[cost] > 0 and isinstance(p.get("accuracy"), (int, float))
    ]
    if not points:
        return None
    on = sorted((p for p in points if (p.get("on_frontier") or {}).get(axis)), key=lambda p: p[cost])
    on_ids = {id(p) for p in on}
    noun = "latency" if axis == "latency" else "size"
    with _style():
        fig = Figure(figsize=(6.4, 3.4 + LEGEND_ROW))
        ax = fig.add_subplot()
        _frame(fig, bottom=0.5 + LEGEND_ROW)
        _frontier_marks(ax, points, on, cost)
        _log_x(ax, [p[cost] for p in points], tick)
        ax.set_xlabel(xlabel.format(batch=frontier.get("latency_batch")))
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"accuracy against {noun}: the frontier")
        _legend_below(fig, columns=3)
        labels = [
            (
                p[cost],
                _percent(p["accuracy"]),
                p.get("label") or "?",
                STAGE_COLOURS["pruned"] if id(p) in on_ids else "#555555",
            )
            for p in on + [p for p in points if id(p) not in on_ids]
        ]
        _place_labels(fig, ax, labels)
        return charts.svg(fig, f"test accuracy against {noun}: the frontier")
