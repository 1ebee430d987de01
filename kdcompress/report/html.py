"""The report as one self-contained HTML page (report.html), with its charts as inline SVG.

:func:`render_html` turns a report dict (report.json, :func:`kdcompress.report.build_report`) into a page;
:func:`render_comparison_html` does the same for a comparison of several runs (:mod:`kdcompress.report.compare`).
The page references nothing outside itself: no scripts, no style sheets, no fonts, no images to fetch; the
charts come from :mod:`.charts`. Every key added by report schema 1 (curves, per-class accuracy, layers,
environment...) may be missing from an older report: its section then says "not recorded". Example::

    >>> import json
    >>> from kdcompress.report.html import render_html
    >>> page = render_html(json.load(open("runs/quickstart/report.json")))  # doctest: +SKIP
"""

from __future__ import annotations

import re
from html import escape

import yaml

from ..stats import NOISE_Z
from .budget import budget_html
from .charts import (
    DODGE,
    Charts,
    baseline_curves_chart,
    comparison_chart,
    curve_chart,
    eval_split,
    frontier_chart,
    latency_batch,
    latency_chart,
    layers_chart,
    per_class_chart,
    seeds_chart,
    sensitivity_chart,
    size_chart,
)
from .compare import LATENCY_BATCH, comparison_rows, latency_at
from .int8_notes import int8_notes
from .text import (
    SPARSE_MACS_NOTE,
    bytes_text,
    compact,
    comparison_name,
    comparison_text,
    input_text,
    is_seeded,
    latency_note,
    ms_text,
    points_text,
    ratio_text,
    seed_comparison_text,
    settings_text,
    sparsity_text,
)

__all__ = ["render_html", "render_comparison_html", "render_frontier_html"]

PER_CLASS_STAGES = ("teacher", "student", "distilled", "pruned")
MAX_CLASSES_SHOWN = 30  # more classes than this: the chart shows those whose accuracy differs most between stages
NOT_RECORDED = "not recorded in this report (it was made by an older kdc; `kdc report RUN_DIR` makes it again)"


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
    """The stages in two tables, so that each fits a 1280-pixel window whole: what each scores (accuracy), then
    what it costs (size, MACs, latency)."""
    rows = report.get("stages") or []
    batches = report.get("latency_batches") or []
    scores = [
        [
            _stage_cell(r),
            _e(r.get("model")),
            _e(r.get("epochs")),
            _accuracy_cell(r),
            points_text(r.get("accuracy_change_vs_teacher")),
        ]
        for r in rows
    ]
    costs = []
    for r in rows:
        cells = [
            _stage_cell(r),
            compact(r.get("params")),
            compact(r.get("nonzero_params")),
            _e(sparsity_text(r)) if r.get("sparsity") is not None or r.get("channel_sparsity") is not None else "",
            "" if r.get("checkpoint_bytes") is None else _e(bytes_text(r["checkpoint_bytes"])),
            ratio_text(r.get("bytes_ratio_vs_teacher")),
            compact(r.get("macs")),
            compact(r.get("sparse_macs")),
        ]
        costs.append(cells + ["" if latency_at(r, b) is None else ms_text(latency_at(r, b)) for b in batches])
    cost_header = ["stage", "params", "non-zero", "sparsity", "bytes on disk", "bytes ratio<br>vs teacher", "MACs"]
    cost_header += ["MACs if<br>sparse", *(f"latency ms<br>batch {b}" for b in batches)]
    return _table(["stage", "model", "epochs", "test acc %<br>± SE", "vs teacher<br>points"], scores, left=2) + _table(
        cost_header, costs, left=1
    )


def _stage_cell(row: dict) -> str:
    return _e(row.get("stage")) + ("*" if row.get("stale") else "")


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
        parts.extend(f'<p class="note">{escape(note)}</p>' for note in int8_notes(report))
    else:
        parts.append(_missing("none: `kdc export RUN_DIR` writes the files to ship and adds them here"))
    parts.append("</section>")
    return "".join(parts)


def _size_section(report: dict, charts: Charts) -> str:
    return (
        '<section id="size"><h2>Accuracy against size</h2>'
        + _figure(
            size_chart(report, charts),
            "Test accuracy against bytes on disk (log scale), one point per stage checkpoint and per exported "
            "file; the bars are ± one standard error of the accuracy.",
        )
        + "</section>"
    )


def _latency_section(report: dict, charts: Charts) -> str:
    batch = latency_batch(report)
    if batch is None:
        body = _missing("latency not measured (report.latency: false, or no batch size measured)")
    else:
        body = _figure(
            latency_chart(report, batch, charts),
            f"Test accuracy against the median latency of a CPU forward pass at batch {batch}; "
            + latency_note(report)
            + ".",
        )
    return f'<section id="latency"><h2>Accuracy against latency</h2>{body}</section>'


def _curves_section(report: dict, charts: Charts) -> str:
    rows = report.get("stages") or []
    parts = ['<section id="curves"><h2>Training curves</h2>']
    if not any("curve" in r for r in rows):
        parts.append(_missing())
    else:
        figures, empty = [], []
        both = baseline_curves_chart(rows, charts)
        if both is not None:
            figures.append(
                _figure(
                    both,
                    "The student alone and the distilled student, epoch by epoch, on the split each was evaluated "
                    "on; the dot is the last epoch, the one each checkpoint holds and the tables score (never the "
                    "best epoch on the test split).",
                )
            )
        for r in rows:
            svg = curve_chart(r, charts)
            if svg is None:
                empty.append(str(r.get("stage")))
                continue
            split = eval_split(r.get("curve") or [])
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


def _layers_section(report: dict, charts: Charts) -> str:
    rows = {r.get("stage"): r for r in report.get("stages") or []}
    parts = ['<section id="layers"><h2>Where the weights went</h2>']
    pruned = rows.get("pruned")
    if pruned is None:
        parts.append(_missing("no pruned stage in this run"))
    elif "layers" not in pruned:
        parts.append(_missing())
    else:
        svg, note = layers_chart(pruned, charts)
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


def _per_class_section(report: dict, charts: Charts) -> str:
    parts = ['<section id="classes"><h2>Per-class accuracy</h2>']
    stages = report.get("stages") or []
    parts += _per_class_accuracy(stages, charts)
    parts.append("<h3>Confusions that changed most</h3>")
    parts += _confusion_changes(report.get("class_changes"), stages)
    parts.append("</section>")
    return "".join(parts)


def _per_class_accuracy(stages: list[dict], charts: Charts) -> list[str]:
    """The per-class accuracy of each stage: a chart and a table (the classes that differ most, when many)."""
    parts = []
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
                per_class_chart(rows, classes, shown, charts),
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
    return parts


def _confusion_changes(changes: list[dict] | None, stages: list[dict]) -> list[str]:
    """The table of the confusions that changed most between the stages (report["class_changes"])."""
    parts = []
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
    return parts


def _seeds_section(report: dict, charts: Charts) -> str | None:
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
            seeds_chart(rows, charts),
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


def _sensitivity_section(block, charts: Charts) -> str | None:
    """``kdc sensitivity``'s curves: one chart per group (drop against ratio, MACs saved beside) and a table."""
    if not isinstance(block, dict):
        return None
    head = '<section id="sensitivity"><h2>Sensitivity: each group pruned alone</h2>'
    if block.get("problem"):
        return head + _missing(str(block["problem"])) + "</section>"
    base, unit = block.get("baseline") or {}, block.get("unit") or "channels"
    groups = [g for g in block.get("groups") or [] if isinstance(g, dict)]
    ratios = [float(r) for r in block.get("ratios") or []]
    note = (
        f"{_e(str(block.get('method')).capitalize())} pruning of the distilled student, one group at a time; in red, "
        f"the accuracy drop in points (bars: ± 1 SE of the pruned model's accuracy), dashed blue, the share of the "
        f"model's MACs saved (right axis); accuracy on "
        f"{_e(block.get('samples'))} {_e(block.get('split'))} images, never the test split "
        f"(unpruned: {(base.get('accuracy') or 0) * 100:.2f}% ± {(base.get('se') or 0) * 100:.2f}). "
        f"{_e(_sentence(block['note']) if block.get('note') else '')}"
    )
    if block.get("stale"):
        note += " The distilled checkpoint changed since: run `kdc sensitivity RUN_DIR` again."
    figures = [
        _figure(
            sensitivity_chart(g, base.get("macs"), unit, charts),
            f"{g.get('name')}"
            + (f", pruned with {', '.join(map(str, g['layers']))}" if len(g.get("layers") or []) > 1 else ""),
        )
        for g in groups
    ]
    rows = []
    for g in groups:
        saved = [(1 - m / base["macs"]) * 100 if base.get("macs") else None for m in g.get("macs") or []]
        cells = [
            f"{d:+.1f}" + ("" if i >= len(saved) or saved[i] is None else f" ({saved[i]:.0f}%)")
            for i, d in enumerate(g.get("drop") or [])
        ]
        rows.append([_e(g.get("name")), _e(g.get("size")), *(_e(c) for c in cells)])
    table = _table(["group", unit, *(f"{r:g}" for r in ratios)], rows)
    return (
        f'{head}<p class="note">{note}</p><div class="charts">{"".join(figures)}</div>'
        f'<p class="note">Accuracy drop in points at each share pruned (the share of the model\'s MACs saved).</p>'
        f"{table}</section>"
    )


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
    if input_text(report):
        rows.append(("input", input_text(report)))
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
    ("budget", "Budget"),
    ("size", "Size"),
    ("latency", "Latency"),
    ("curves", "Curves"),
    ("layers", "Layers"),
    ("classes", "Classes"),
    ("seeds", "Seeds"),
    ("sensitivity", "Sensitivity"),
    ("warnings", "Warnings"),
    ("recipe", "Recipe"),
    ("environment", "Environment"),
    ("points", "Points"),
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
    charts = Charts()
    name = report.get("run_name") or report.get("recipe") or "run"
    stages = report.get("stages") or []
    env = report.get("environment") if isinstance(report.get("environment"), dict) else {}
    made_by = f" by kdcompress {env['kdcompress']}" if env.get("kdcompress") else ""
    intro = (
        f'<p class="note">Dataset: {_e(report.get("dataset") or "unknown")}. Stages: '
        f"{_e(', '.join(str(r.get('stage')) for r in stages) or 'none')}. Made "
        f"{_e(report.get('generated_at') or 'at a time not recorded')}{_e(made_by)}.</p>"
    )
    if input_text(report):
        intro += f'<p class="note">{_e(input_text(report))}</p>'

    if report.get("warnings"):
        intro += (
            f'<p class="note"><a href="#warnings">{len(report["warnings"])} warning'
            f"{'' if len(report['warnings']) == 1 else 's'}</a> below.</p>"
        )
    sections = [
        _stages_section(report),
        budget_html(report),
        _size_section(report, charts),
        _latency_section(report, charts),
        _curves_section(report, charts),
        _layers_section(report, charts),
        _per_class_section(report, charts),
        _seeds_section(report, charts),
        _sensitivity_section(report.get("sensitivity"), charts),
        _warnings_section(report),
        _recipe_section(report),
        _environment_section(report),
    ]
    return _page(f"kdc report: {name}", intro, [s for s in sections if s])


def render_comparison_html(comparison: dict) -> str:
    """A comparison of runs (:func:`kdcompress.report.compare.build_comparison`) as one self-contained HTML page: one
    table with every run's stages and artifacts, one accuracy-against-size chart with every run in its own colour,
    and each run's warnings."""
    charts = Charts()
    runs = comparison.get("runs") or []
    names = [str(run.get("name")) for run in runs]
    table = _comparison_table(comparison)
    intro = (
        f'<p class="note">{len(runs)} run{"" if len(runs) == 1 else "s"}: {_e(", ".join(names))}. Made '
        f"{_e(comparison.get('generated_at') or 'at a time not recorded')}. Each run's own report.html has the "
        f"details; latency compares only between runs timed on the same machine.</p>"
    )
    sections = [
        f'<section id="stages"><h2>Stages and artifacts</h2>{table}</section>',
        '<section id="size"><h2>Accuracy against size</h2>'
        + _figure(
            comparison_chart(comparison, charts),
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


def _comparison_table(comparison: dict) -> str:
    """One table of every run's stages and artifacts (:func:`kdcompress.report.compare.comparison_rows`)."""
    body = []
    for r in comparison_rows(comparison):
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
    return _table(
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


def _frontier_marks(point: dict) -> str:
    """Which frontiers a point is on: "latency, bytes", "-" for none, "?" where a value is missing."""
    marks = point.get("on_frontier") or {}
    if not any(v is not None for v in marks.values()):
        return "?"
    return ", ".join(axis for axis, on in marks.items() if on) or "-"


def _frontier_table(frontier: dict) -> str:
    """Every point of a frontier with its numbers, the file they were read from and its run directory."""
    batch = frontier.get("latency_batch")
    body = []
    for p in frontier.get("points") or []:
        label = _e(p.get("label")) + (" <small>(reference)</small>" if p.get("role") == "reference" else "")
        if p.get("missing"):
            body.append([label, (f'<span class="missing">{_e(p["missing"])}</span>', 7)])
            continue
        marks = _frontier_marks(p)
        source = str(p.get("bytes_source") or "")
        body.append(
            [
                label,
                f"<b>{_e(marks)}</b>" if marks not in ("-", "?") else _e(marks),
                "" if p.get("accuracy") is None else _e(_accuracy_cell(p)),
                "" if p.get("latency_ms") is None else ms_text(p["latency_ms"]),
                "" if p.get("bytes") is None else _e(bytes_text(p["bytes"])),
                compact(p.get("macs")),
                _e(source.rsplit("/", 1)[-1]),
                f"<code>{_e(p.get('run_dir'))}</code>",
            ]
        )
    header = ["budget", "on the frontier", "test acc % ± SE", f"latency ms<br>batch {_e(batch)}", "bytes", "MACs"]
    return _table(header + ["file", "run directory"], body, left=2)


def render_frontier_html(frontier: dict) -> str:
    """A frontier (:func:`kdcompress.report.frontier.build_frontier`) as one self-contained HTML page: accuracy
    against latency and against bytes, the non-dominated points marked and joined, and a table of every point
    with its run directory (to export it in another format, or to report on it)."""
    charts = Charts()
    points = frontier.get("points") or []
    fmt, batch = frontier.get("format") or "?", frontier.get("latency_batch")
    intro = (
        f'<p class="note">{sum(p.get("role") == "point" for p in points)} pruned models of one sweep and the distilled '
        f"student they were pruned from, each measured from its exported {_e(fmt)} file. A model is on the frontier "
        "when no other is at least as accurate and at most as costly (and better on one of the two). Made "
        f"{_e(frontier.get('generated_at') or 'at a time not recorded')}.</p>"
    )
    latency_caption = (
        f"Test accuracy against the median latency at batch {batch}, as each run directory's report timed it "
        "(in its own rounds: differences of a few percent can be noise); ± one standard error."
    )
    sections = [
        '<section id="size"><h2>Accuracy against size</h2>'
        + _figure(
            frontier_chart(frontier, "bytes", charts),
            f"Test accuracy against the bytes of each exported {fmt} file (log scale); ± one standard error.",
        )
        + "</section>",
        '<section id="latency"><h2>Accuracy against latency</h2>'
        + _figure(
            frontier_chart(frontier, "latency", charts),
            latency_caption,
            "latency not measured (report.latency: false in the recipe); the table has the rest",
        )
        + "</section>",
        '<section id="points"><h2>Points</h2>'
        + _frontier_table(frontier)
        + '<p class="note">Each run directory is an ordinary kdc run: <code>kdc export RUN_DIR --format int8</code> '
        "exports it in another format, <code>kdc report RUN_DIR</code> reports on it.</p></section>",
    ]
    return _page("kdc frontier", intro, sections)
