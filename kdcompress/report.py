"""The comparison report: a pure function of a run directory.

For every stage checkpoint found in ``<run dir>`` (teacher, student,
distilled, pruned) it measures the saved model and writes ``report.json``
and ``report.md`` next to them. Example::

    >>> from kdcompress.report import build_report
    >>> report = build_report("runs/quickstart")  # doctest: +SKIP
    >>> [row["stage"] for row in report["stages"]]  # doctest: +SKIP
    ['teacher', 'student', 'distilled', 'pruned']
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from .checkpoint import atomic_write_text, load_checkpoint
from .errors import KdcError
from .measure import count_macs, count_nonzero, count_params, latency_ms
from .models import build_model
from .prune import prunable_weights, weight_sparsity

__all__ = ["build_report", "write_report", "report_table", "report_markdown"]

STAGE_ORDER = ("teacher", "student", "distilled", "pruned")
DESCRIPTIONS = {
    "teacher": "teacher, cross-entropy",
    "student": "student alone, cross-entropy (baseline)",
    "distilled": "student distilled from the teacher",
    "pruned": "distilled student, pruned and retrained",
}


def build_report(run_dir: str | Path, latency: bool | None = None) -> dict:
    """Measure every stage checkpoint in ``run_dir``; return the report as a dict.

    ``latency=None`` follows the run's recipe (``report.latency``).
    """
    run_dir = Path(run_dir)
    found = [s for s in STAGE_ORDER if (run_dir / s / "model.pt").is_file()]
    if not found:
        raise KdcError(
            f"no stage checkpoints in {run_dir} (looked for {', '.join(f'{s}/model.pt' for s in STAGE_ORDER)}); "
            f"run `kdc run RECIPE` first, or pass the run directory (runs/<recipe name>)"
        )
    rows = []
    recipe_name = dataset = None
    teacher_row = None
    for stage in found:
        ckpt = load_checkpoint(run_dir / stage / "model.pt")
        recipe = ckpt.get("recipe", {})
        recipe_name = recipe_name or recipe.get("run", {}).get("name")
        dataset = dataset or ckpt.get("dataset")
        prune = recipe.get("prune", {})
        do_latency = recipe.get("report", {}).get("latency", True) if latency is None else latency
        model = build_model(ckpt["arch"], where=f"{stage} checkpoint")
        model.load_state_dict(ckpt["state_dict"])
        model.eval()
        shape = tuple(ckpt["arch"]["input_shape"])
        weights = prunable_weights(model, prune.get("include", ["*"]), prune.get("exclude", []))
        row = {
            "stage": stage,
            "description": DESCRIPTIONS[stage],
            "model": ckpt["arch"]["model"],
            "accuracy": float(ckpt["metrics"]["test_accuracy"]),
            "params": count_params(model),
            "nonzero_params": count_nonzero(model),
            "sparsity": weight_sparsity({k: v.detach() for k, v in weights.items()}),
            "target_sparsity": ckpt["metrics"].get("target_sparsity"),
            "checkpoint_bytes": (run_dir / stage / "model.pt").stat().st_size,
            "macs": count_macs(model, shape),
            "latency_ms": latency_ms(model, shape, batch=recipe.get("report", {}).get("latency_batch", 1))
            if do_latency
            else None,
            "train_seconds": ckpt["metrics"].get("seconds"),
        }
        if stage == "teacher":
            teacher_row = row
        rows.append(row)
    for row in rows:
        if teacher_row is not None:
            row["compression_vs_teacher"] = teacher_row["nonzero_params"] / max(1, row["nonzero_params"])
            row["accuracy_change_vs_teacher"] = row["accuracy"] - teacher_row["accuracy"]
        else:
            row["compression_vs_teacher"] = None
            row["accuracy_change_vs_teacher"] = None
    return {"recipe": recipe_name, "dataset": dataset, "run_dir": str(run_dir), "stages": rows}


def _fmt(row: dict) -> dict[str, str]:
    target = row.get("target_sparsity")
    comp = row.get("compression_vs_teacher")
    change = row.get("accuracy_change_vs_teacher")
    lat = row.get("latency_ms")
    return {
        "stage": row["stage"],
        "model": row["model"],
        "accuracy": f"{row['accuracy']:.2%}",
        "vs teacher": "" if change is None else f"{change * 100:+.2f} pt",
        "params": f"{row['params']:,}",
        "non-zero": f"{row['nonzero_params']:,}",
        "sparsity": f"{row['sparsity']:.1%}",
        "target": "" if target is None else f"{target:.1%}",
        "compression": "" if comp is None else f"{comp:.1f}x",
        "bytes on disk": f"{row['checkpoint_bytes']:,}",
        "MACs": f"{row['macs']:,}",
        "latency": "" if lat is None else f"{lat:.3f} ms",
    }


def report_table(report: dict) -> Table:
    """The report as a rich table for the terminal."""
    table = Table(title=f"kdc report: {report['recipe']} on {report['dataset']}")
    rows = [_fmt(r) for r in report["stages"]]
    for col in rows[0]:
        table.add_column(col, justify="left" if col in ("stage", "model") else "right", no_wrap=True)
    for r in rows:
        table.add_row(*r.values())
    return table


def report_markdown(report: dict) -> str:
    rows = [_fmt(r) for r in report["stages"]]
    cols = list(rows[0])
    lines = [
        f"# kdc report: {report['recipe']}",
        "",
        f"Dataset: {report['dataset']}. Accuracy is the final model's test accuracy. Sparsity is the share of "
        f"prunable weights (Conv/Linear) that are exactly zero; compression is teacher non-zeros / stage "
        f"non-zeros. Bytes on disk are the dense checkpoint's: zeros in a dense tensor do not shrink it. MACs are "
        f"dense multiply-accumulates per sample; latency is the median CPU forward time.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join(" --- " if c in ("stage", "model") else " ---: " for c in cols) + "|",
    ]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    lines += ["", *(f"- **{r['stage']}**: {r['description']}" for r in report["stages"]), ""]
    return "\n".join(lines)


def write_report(run_dir: str | Path, latency: bool | None = None) -> dict:
    """Build the report and write ``report.json`` and ``report.md`` into ``run_dir`` (atomically)."""
    report = build_report(run_dir, latency=latency)
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(run_dir / "report.md", report_markdown(report))
    return report
