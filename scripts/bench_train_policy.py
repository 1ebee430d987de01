"""Which OpenMP wait policy training needs: `kdc train-student` epochs, quiet and with one core busy.

Each measurement is a whole `kdc train-student` process (OpenMP reads its wait policy once, when torch loads)
on the full Fashion-MNIST MLP student (784-100-10, batch 128, 2 threads), in a fresh run directory, with:

- ``unset``: libgomp's default (waiting threads spin about 300,000 times, then sleep);
- ``PASSIVE``: waiting threads sleep at once (what kdc forced on every command before issue 18);
- ``spinN``: the default policy with ``GOMP_SPINCOUNT=N``.

Each is run ``--repeats`` times on the machine as it is ("quiet"), then with a CPU burner
(``python -c "while True: pass"``) on one core ("burner"), the policies taking turns. The figure is the median
``train_seconds`` (the training pass alone) of the epochs after the first, read from the stage's metrics.jsonl.
Example (about 10 minutes here)::

    python scripts/bench_train_policy.py --repeats 2 --policies unset,PASSIVE,spin1000,spin10000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

RECIPE = {
    "run": {"name": "policy", "seed": 0, "device": "cpu", "threads": 2},
    "data": {"dataset": "fashion-mnist", "batch_size": 128},
    "teacher": {"model": "mlp", "args": {"hidden": [100]}, "epochs": 1},
    "student": {"model": "mlp", "args": {"hidden": [100]}, "baseline": True},
    "distill": {"epochs": 4, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
    "report": {"latency": False},
}


def one_run(policy: str, work: Path) -> float:
    """Median training-pass seconds of the epochs after the first, in a fresh `kdc train-student` process."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy.startswith("spin"):
        env["GOMP_SPINCOUNT"] = policy[len("spin") :]
    elif policy != "unset":
        env["OMP_WAIT_POLICY"] = policy
    folder = Path(tempfile.mkdtemp(dir=work))
    (folder / "recipe.yaml").write_text(yaml.safe_dump(RECIPE), encoding="utf-8")
    subprocess.run(
        [sys.executable, "-m", "kdcompress", "train-student", "recipe.yaml", "--quiet"],
        cwd=folder,
        env=env,
        check=True,
        capture_output=True,
        timeout=1800,
    )
    records = [
        json.loads(line)
        for line in (folder / "runs" / "policy" / "student" / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    return statistics.median(r["train_seconds"] for r in records[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--policies", default="unset,PASSIVE,spin1000,spin10000")
    parser.add_argument("--conditions", default="quiet,burner")
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args()
    policies = args.policies.split(",")
    results: dict[str, dict[str, list[float]]] = {c: {p: [] for p in policies} for c in args.conditions.split(",")}
    with tempfile.TemporaryDirectory(prefix="kdc-policy-") as tmp:
        work = Path(tmp)
        one_run("unset", work)  # unpacks the data into the data root once, outside the figures
        for condition, figures in results.items():
            burner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if condition == "burner" else None
            try:
                for _ in range(args.repeats):
                    for policy in policies:
                        figures[policy].append(one_run(policy, work))
                        print(f"{condition:6} {policy:10} {figures[policy][-1]:.3f} s", flush=True)
            finally:
                if burner is not None:
                    burner.kill()
    print("\nmedian training-pass seconds per epoch (MLP 784-100-10, full Fashion-MNIST, 2 threads)")
    print(f"{'policy':10} " + " ".join(f"{c:>22}" for c in results))
    for policy in policies:
        cells = []
        for condition in results:
            xs = results[condition][policy]
            cells.append(f"{statistics.median(xs):.3f} [{min(xs):.3f}-{max(xs):.3f}]")
        print(f"{policy:10} " + " ".join(f"{c:>22}" for c in cells))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
