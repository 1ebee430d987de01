"""Issue 21's figures from finished budget runs: the budget reached, accuracy against the distilled student,
int8 against its fp32 ONNX, and the pruned ONNX against the distilled student's ONNX timed in turns.

For each RUN_DIR (a `kdc run` of a recipe with ``prune.budget``, exported to onnx, with report.json written):

* the budget record of the pruned stage (kind, target, reached, allocation per group, how measured);
* test accuracy of the distilled and the pruned stages, the difference in points with its SE, and MACs
  distilled / pruned;
* int8 against its fp32 ONNX on the test set (both files loaded back by `kdc export`), and the nodes the
  tolerance search kept in fp32;
* ``--time``: the distilled student's ONNX and the pruned ONNX timed in turns in kdc's timing process
  (:func:`kdcompress.latency_budget.verify_latency` with the two artifact files: onnxruntime, ``--rounds``
  rounds, median over rounds), at ``prune.budget.batch`` (64 unless the recipe says otherwise) with
  ``report.threads`` threads; the distilled ONNX is exported first when it is missing
  (``kdc export RUN_DIR --stage distilled --format onnx``).

Run::

    python scripts/budget_acceptance.py runs/fashion-mnist-budget runs/fashion-mnist-budget-uniform --time

Prints one block per run and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from kdcompress.checkpoint import read_manifest
from kdcompress.latency_budget import verify_latency
from kdcompress.run.export import read_artifacts
from kdcompress.timing import ModelFile


def _stage(report: dict, name: str) -> dict:
    return next((s for s in report["stages"] if s["stage"] == name), {})


def _artifact(rows: list[dict], stage: str, fmt: str) -> dict | None:
    return next((r for r in rows if r.get("stage") == stage and r.get("format") == fmt), None)


def _difference(a: dict, b: dict) -> tuple[float, float]:
    """b - a in points, with the SE of the difference of two independent test accuracies."""
    se = math.hypot(a.get("accuracy_se") or 0.0, b.get("accuracy_se") or 0.0)
    return 100 * (b["accuracy"] - a["accuracy"]), 100 * se


def _timed(run_dir: Path, rows: list[dict], batch: int, threads: int, rounds: int) -> dict:
    """The distilled and pruned ONNX files timed in turns: {name: {median_ms, iqr_ms, ...}}."""
    if _artifact(rows, "distilled", "onnx") is None:
        subprocess.run(
            [sys.executable, "-m", "kdcompress", "export", str(run_dir), "--stage", "distilled", "--format", "onnx"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        rows = read_artifacts(run_dir)
    files = {}
    for stage in ("distilled", "pruned"):
        path = run_dir / _artifact(rows, stage, "onnx")["path"]
        files[stage] = ModelFile("artifact", str(path), read_manifest(path)["sha256"], None, f"{stage} ONNX")
    input_shape = json.loads((run_dir / "report.json").read_text())["input"]["input_shape"]
    return verify_latency(files, input_shape, batch=batch, runtime="onnxruntime", threads=threads, rounds=rounds)


def summarise(run_dir: Path, time_it: bool, rounds: int) -> dict:
    report = json.loads((run_dir / "report.json").read_text())
    recipe = report.get("recipe_resolved") or {}
    rows = read_artifacts(run_dir)
    distilled, pruned = _stage(report, "distilled"), _stage(report, "pruned")
    diff, se = _difference(distilled, pruned)
    out = {
        "run_dir": str(run_dir),
        "budget": report.get("budget"),
        "distilled_accuracy": distilled.get("accuracy"),
        "pruned_accuracy": pruned.get("accuracy"),
        "pruned_minus_distilled_points": diff,
        "difference_se_points": se,
        "macs_distilled_over_pruned": distilled["macs"] / pruned["macs"] if pruned.get("macs") else None,
        "pruned_seconds": pruned.get("train_seconds"),
    }
    onnx, int8 = _artifact(rows, "pruned", "onnx"), _artifact(rows, "pruned", "int8")
    if onnx and int8:
        out["int8_minus_onnx_points"] = 100 * (int8["accuracy"] - onnx["accuracy"])
        out["int8_search"] = int8.get("int8_search")
    if time_it:
        prune = recipe.get("prune", {})
        batch = int((prune.get("budget") or {}).get("batch") or 64)
        threads = int(recipe.get("report", {}).get("threads") or 2)
        timed = _timed(run_dir, rows, batch, threads, rounds)
        d, p = timed["distilled"]["median_ms"], timed["pruned"]["median_ms"]
        out["onnx_timing"] = {
            "batch": batch,
            "threads": threads,
            "rounds": rounds,
            "distilled_ms": d,
            "pruned_ms": p,
            "distilled_over_pruned": d / p,
            "method": timed["pruned"].get("method"),
        }
    return out


def _print(s: dict) -> None:
    b = s.get("budget") or {}
    print(f"== {s['run_dir']}")
    if b:
        print(
            f"budget {b['kind']} {b['value']}: target {b['target']:,.2f}, reached {b['reached']:,.2f} "
            f"({b['ratio_to_target']:.1%} of the target, {b['ratio_to_reference']:.1%} of the distilled student); "
            f"allocation {b['method']}: {b['allocation']}"
        )
    print(
        f"test accuracy: distilled {100 * s['distilled_accuracy']:.2f} %, pruned {100 * s['pruned_accuracy']:.2f} % "
        f"({s['pruned_minus_distilled_points']:+.2f} points, SE {s['difference_se_points']:.2f}); "
        f"MACs distilled/pruned {s['macs_distilled_over_pruned']:.2f}x"
    )
    if "int8_minus_onnx_points" in s:
        kept = [k.get("label") for k in (s.get("int8_search") or {}).get("kept_fp32", [])]
        print(f"int8 - fp32 ONNX on the test set: {s['int8_minus_onnx_points']:+.2f} points; kept in fp32: {kept}")
    t = s.get("onnx_timing")
    if t:
        print(
            f"ONNX at batch {t['batch']}, {t['threads']} threads, median of {t['rounds']} rounds in turns: distilled "
            f"{t['distilled_ms']:.2f} ms, pruned {t['pruned_ms']:.2f} ms: {t['distilled_over_pruned']:.2f}x faster"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--time", action="store_true", help="time the distilled and pruned ONNX files in turns")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    results = [summarise(d, args.time, args.rounds) for d in args.run_dirs]
    for s in results:
        _print(s)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
