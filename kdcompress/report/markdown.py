"""The report as Markdown (report.md), every number in full."""

from __future__ import annotations

from ..stats import NOISE_Z
from .budget import budget_lines
from .int8_notes import int8_notes
from .text import (
    SPARSE_MACS_NOTE,
    STALE_NOTE,
    comparison_name,
    comparison_text,
    input_text,
    is_seeded,
    latency_note,
    ratio_text,
    seed_comparison_text,
    seeds_note,
    settings_text,
    sparsity_text,
    stage_name,
)

__all__ = ["report_markdown"]


def _md_row(r: dict, batches) -> list[str]:
    se, timing = r.get("accuracy_se"), r.get("latency") or {}
    target = r.get("target_sparsity")
    cells = [
        stage_name(r),
        r["model"],
        "" if r.get("epochs") is None else str(r["epochs"]),
        "" if r.get("train_seconds") is None else f"{r['train_seconds']:.1f}",
        "" if r.get("train_accuracy") is None else f"{r['train_accuracy']:.2%}",
        f"{r['accuracy']:.2%}",
        "unknown" if se is None else f"{se * 100:.2f} pt (n={r['test_samples']:,})",
        "" if r.get("accuracy_change_vs_teacher") is None else f"{r['accuracy_change_vs_teacher'] * 100:+.2f} pt",
        f"{r['params']:,}",
        f"{r['nonzero_params']:,}",
        sparsity_text(r),
        "" if target is None else f"{target:.1%}",
        ratio_text(r.get("nonzero_ratio_vs_teacher")),
        f"{r['checkpoint_bytes']:,}",
        ratio_text(r.get("bytes_ratio_vs_teacher")),
        f"{r['macs']:,}",
        "" if r.get("sparse_macs") is None else f"{r['sparse_macs']:,}",
    ]
    for b in batches:
        lat = timing.get(str(b))
        cells += [
            "" if not lat else f"{lat['median_ms']:.4f}",
            "" if not lat else f"{lat['iqr_ms']:.4f} ({lat['p25_ms']:.4f} to {lat['p75_ms']:.4f})",
        ]
    return cells


MD_COLUMNS = [
    "stage",
    "model",
    "epochs",
    "train seconds",
    "train acc (last epoch)",
    "test acc",
    "± SE",
    "vs teacher",
    "params",
    "non-zero",
    "sparsity",
    "target",
    "non-zero ratio vs teacher",
    "bytes on disk",
    "bytes ratio vs teacher",
    "MACs",
    "MACs if sparse (non-zero weights only)",
]


def _md_columns(batches) -> list[str]:
    return MD_COLUMNS + [c for b in batches for c in (f"latency batch {b} median (ms)", f"latency batch {b} IQR (ms)")]


ARTIFACT_MD_COLUMNS = [
    "file",
    "stage",
    "format",
    "bytes",
    "smaller vs teacher",
    "smaller vs stage",
    "test acc",
    "± SE",
    "vs stage checkpoint",
]
ARTIFACTS_MD_NOTE = (
    "Files written by `kdc export` to export/. Test accuracy is measured from each file loaded back with "
    "kdcompress.export.load_artifact, never copied from the checkpoint; smaller is checkpoint bytes / file bytes; "
    "latency is timed like the stages'."
)


def _md_artifact_row(a: dict, batches) -> list[str]:
    if a.get("refused"):
        return [str(a["path"]), str(a.get("stage") or ""), str(a.get("format") or ""), "refused: " + a["refused"]] + [
            ""
        ] * (len(ARTIFACT_MD_COLUMNS) - 4 + len(batches))
    se = a.get("accuracy_se")
    timing = a.get("latency_ms") or {}
    change = a.get("accuracy_change_vs_stage")
    return [
        str(a["path"]) + ("*" if a.get("stale") else ""),
        a["stage"],
        a["format"] + _options_md(a.get("options") or {}),
        f"{a['bytes']:,}",
        ratio_text(a.get("compression_vs_teacher")),
        ratio_text(a.get("compression_vs_stage")),
        "" if a.get("accuracy") is None else f"{a['accuracy']:.2%}",
        "" if se is None else f"{se * 100:.2f} pt",
        "" if change is None else f"{change * 100:+.2f} pt",
    ] + ["" if timing.get(str(b)) is None else f"{timing[str(b)]:.4f}" for b in batches]


def _options_md(options: dict) -> str:
    return f" ({', '.join(f'{k} {v}' for k, v in options.items())})" if options else ""


def report_markdown(report: dict) -> str:
    """The report as Markdown, every number in full."""
    batches = report.get("latency_batches") or []
    lines = _stage_lines(report)
    if any(is_seeded(r) for r in report["stages"]):
        lines += _seed_lines(report)
    lines += ["", "## Stages", ""]
    lines += [f"- **{r['stage']}**: {r['description']}: {settings_text(r['settings'])}" for r in report["stages"]]
    lines += ["", "## Budget", "", *[f"- {line}" for line in budget_lines(report)]] if report.get("budget") else []
    if report.get("artifacts"):
        lines += ["", "## Artifacts", "", ARTIFACTS_MD_NOTE, ""]
        columns = ARTIFACT_MD_COLUMNS + [f"latency batch {b} median (ms)" for b in batches]
        lines += [
            "| " + " | ".join(columns) + " |",
            "|" + "|".join(" --- " if c == "file" else " ---: " for c in columns) + "|",
        ]
        lines += ["| " + " | ".join(_md_artifact_row(a, batches)) + " |" for a in report["artifacts"]]
        lines += [f"\n{note}" for note in int8_notes(report)]
    if report.get("comparisons"):
        lines += [
            "",
            "## Differences",
            "",
            "Latency: the median of the per-round ratios (each round timed the two side by side).",
            "",
        ]
        lines += [f"- {comparison_name(c)}: {comparison_text(c)}" for c in report["comparisons"]]
    lines += _sensitivity_lines(report.get("sensitivity"))
    if report.get("warnings"):
        lines += ["", "## Warnings", ""]
        lines += [f"- {w}" for w in report["warnings"]]
    lines.append("")
    return "\n".join(lines)


def _stage_lines(report: dict) -> list[str]:
    """The title, what every column means, and the table of the stages (with the stale note when one is)."""
    left = ("stage", "model")
    batches = report.get("latency_batches") or []
    columns = _md_columns(batches)
    note = latency_note(report)
    lines = [
        f"# kdc report: {report['recipe']}",
        "",
        f"Dataset: {report['dataset']}. Accuracy is the final model's test accuracy; ± SE is its binomial standard "
        f"error sqrt(p(1-p)/n) over the n test images, and a difference counts as within noise when it is at most "
        f"{report.get('noise_z', NOISE_Z):g} standard errors of the difference (sqrt(se1² + se2²)). Train acc is the "
        f"last epoch's, measured in training mode. Sparsity is the share of prunable weights (Conv/Linear) that are "
        f'exactly zero; for a structurally pruned stage ("ch") it is the share of prunable channels removed, '
        f"whose weights are gone from the model. Non-zero ratio vs teacher is teacher non-zero parameters / stage non-zero parameters (it was "
        f"called compression): it counts weights, not bytes. Bytes on disk are the dense checkpoint's: zeros in a "
        f"dense tensor do not shrink it, and bytes ratio vs teacher is teacher bytes / stage bytes. MACs are dense "
        f"multiply-accumulates per sample of every matmul, convolution and attention (torch's flop counter, FLOPs / "
        f"2). {SPARSE_MACS_NOTE[0].upper() + SPARSE_MACS_NOTE[1:]}. {note[0].upper() + note[1:]}; timed with "
        f"torch.utils.benchmark (blocked_autorange), it varies between machines and with their load.",
        "",
        *([input_text(report), ""] if input_text(report) else []),
        "| " + " | ".join(columns) + " |",
        "|" + "|".join(" --- " if c in left else " ---: " for c in columns) + "|",
    ]
    lines += ["| " + " | ".join(_md_row(r, batches)) + " |" for r in report["stages"]]
    if any(r.get("stale") for r in report["stages"]):
        lines += ["", STALE_NOTE + "."]
    return lines


def _seed_lines(report: dict) -> list[str]:
    """The "Seeds" section: each stage's accuracy per seed, mean and std, and the differences over the seeds."""
    lines = ["", "## Seeds", "", seeds_note(report["stages"]) + ".", ""]
    seeds = sorted({e["seed"] for r in report["stages"] for e in r.get("seeds") or []})
    columns = ["stage", *(f"seed {s}" for s in seeds), "mean", "std"]
    lines += [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join(" --- " if c == "stage" else " ---: " for c in columns) + "|",
    ]
    for r in report["stages"]:
        accs = {e["seed"]: e["accuracy"] for e in r.get("seeds") or []}
        std = r.get("accuracy_std")
        cells = [
            stage_name(r),
            *("" if s not in accs else f"{accs[s]:.2%}" for s in seeds),
            "" if r.get("accuracy_mean") is None else f"{r['accuracy_mean']:.2%}",
            "" if std is None else f"{std * 100:.2f} pt",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    comps = [c for c in report.get("comparisons") or [] if (c.get("seeds") or {}).get("n", 0) > 1]
    if comps:
        lines.append("")
        lines += [f"- {comparison_name(c)}, {c['seeds']['n']} seeds: {seed_comparison_text(c['seeds'])}" for c in comps]
    return lines


def _sensitivity_lines(block) -> list[str]:
    """``kdc sensitivity``'s drops as a table: one row per group, one column per ratio (points)."""
    if not isinstance(block, dict):
        return []
    lines = ["", "## Sensitivity", ""]
    if block.get("problem"):
        return lines + [str(block["problem"])]
    base = block.get("baseline") or {}
    ratios = [f"{float(r):g}" for r in block.get("ratios") or []]
    lines += [
        f"Accuracy drop in points with each group pruned alone ({block.get('method')}), on {block.get('samples')} "
        f"{block.get('split')} images (unpruned: {(base.get('accuracy') or 0) * 100:.2f}%). {_capital(block.get('note') or '')}"
        + (" Stale: the distilled checkpoint changed since." if block.get("stale") else ""),
        "",
        "| group | " + (block.get("unit") or "channels") + " | " + " | ".join(ratios) + " |",
        "| --- |" + " ---: |" * (len(ratios) + 1),
    ]
    for g in block.get("groups") or []:
        drops = " | ".join(f"{float(d):+.1f}" for d in g.get("drop") or [])
        lines.append(f"| {g.get('name')} | {g.get('size')} | {drops} |")
    return lines


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:] + ("." if text and not text.endswith(".") else "")
