"""Do the report's latency ratios hold? A small structured-pruned CNN run, reported several times afresh.

Trains (once, in WORKDIR) a small recipe: CNN teacher and student (channels 32/64, hidden 128: the CNN recipe's
student) on fashion-mnist-mini, one epoch each, then structured pruning of half of every layer's channels. Then
runs ``kdc report`` ``--reports`` times, deleting ``cache/latency.json`` before each so that every report times
every stage afresh, optionally with a CPU burner (``python -c "while True: pass"``) running throughout, and
prints each report's distilled/pruned and teacher/distilled latency ratios at each batch size with their spread:
the ratio of the two medians (what any report gives), and the report's own ``latency_ratio`` where it has one
(median of the per-round ratios; issue 18).
``--pythonpath`` picks the kdcompress that makes the reports (an older copy, to compare). ``--recipe`` trains
that recipe instead (for the issue's acceptance: the full CNN recipe, about 30 minutes on 2 cores). Example::

    python scripts/latency_ratio_acceptance.py /tmp/ratio --reports 3 --burner
    python scripts/latency_ratio_acceptance.py /tmp/cnn --recipe recipes/fashion-mnist-cnn.yaml --reports 3 --burner
    python scripts/latency_ratio_acceptance.py /tmp/ratio --reports 3 --burner --pythonpath /tmp/old-kdcompress
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

RECIPE = {
    "run": {"name": "cnn-ratio", "seed": 0, "device": "cpu"},
    "data": {"dataset": "fashion-mnist-mini", "batch_size": 128},
    "teacher": {"model": "cnn", "args": {"channels": [32, 64], "hidden": 128}, "epochs": 1},
    "student": {"model": "cnn", "args": {"channels": [32, 64], "hidden": 128}, "baseline": False},
    "distill": {"epochs": 1},
    "prune": {
        "method": "structured",
        "scope": "layer",
        "target_sparsity": 0.5,
        "sparsity_schedule": "agp",
        "steps": 4,
        "epochs": 2,
    },
    "report": {"latency": True, "latency_batches": [1, 64], "threads": 2},
}
PAIRS = (("distilled", "pruned"), ("teacher", "distilled"))


def _kdc(args: list[str], cwd: Path, pythonpath: str | None) -> None:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    subprocess.run([sys.executable, "-m", "kdcompress", *args], cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--reports", type=int, default=3)
    parser.add_argument("--burner", action="store_true", help="keep one core busy while reporting")
    parser.add_argument("--pythonpath", help="PYTHONPATH for kdc report (default: this environment's)")
    parser.add_argument("--recipe", type=Path, help="train this recipe instead of the small built-in one")
    args = parser.parse_args()
    work = args.workdir.resolve()
    recipe = yaml.safe_load(args.recipe.read_text()) if args.recipe else RECIPE
    run_dir = work / "runs" / recipe["run"]["name"]
    if not (run_dir / "pruned" / "model.pt").is_file():
        work.mkdir(parents=True, exist_ok=True)
        (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        started = time.perf_counter()
        _kdc(["run", "recipe.yaml", "--quiet"], work, None)
        print(f"trained {run_dir} in {time.perf_counter() - started:.0f} s")
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.burner else None
    ratios: dict[str, list[float]] = {}
    print(
        f"load before: {os.getloadavg()}; kdcompress from {args.pythonpath or 'this environment'}; "
        f"burner: {bool(burner)}"
    )
    try:
        for n in range(args.reports):
            (run_dir / "cache" / "latency.json").unlink(missing_ok=True)
            _kdc(["report", str(run_dir), "--format", "json"], work, args.pythonpath)
            report = json.loads((run_dir / "report.json").read_text())
            ms = {r["stage"]: r["latency_ms"] for r in report["stages"]}
            printed = {(c["against"], c["stage"]): c.get("latency_ratio") or {} for c in report["comparisons"]}
            cells = []
            for batch in map(str, report["latency_batches"]):
                cells.append(f"batch {batch}: " + ", ".join(f"{s} {ms[s][batch]:.3f} ms" for s in ms))
                for slow, fast in PAIRS:
                    ratio = ms[slow][batch] / ms[fast][batch]
                    ratios.setdefault(f"{slow}/{fast} batch {batch} (medians)", []).append(ratio)
                    cells.append(f"{slow}/{fast} {ratio:.2f}")
                    paired = printed.get((slow, fast), {}).get(batch)
                    if paired is not None:
                        ratios.setdefault(f"{slow}/{fast} batch {batch} (report's paired)", []).append(paired)
                        cells.append(f"paired {paired:.2f}")
            print(f"report {n + 1} (omp_wait_policy {report.get('omp_wait_policy')}): " + "; ".join(cells), flush=True)
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()
    print(f"load after: {os.getloadavg()}")
    summary = {}
    for name, values in ratios.items():
        median = statistics.median(values)
        spread = max(abs(v / median - 1) for v in values)
        summary[name] = {
            "ratios": [round(v, 3) for v in values],
            "median": round(median, 3),
            "max_off_median": round(spread, 3),
            "max_over_min": round(max(values) / min(values), 3),
        }
        print(
            f"{name}: {', '.join(f'{v:.2f}' for v in values)}; median {median:.2f}, at most {spread:.0%} off it, "
            f"max/min {max(values) / min(values):.2f}"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
