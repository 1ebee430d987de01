"""Latency of two stage checkpoints of one run, timed in turns so that machine drift falls on both alike.

The report times each stage once, one after the other; on a shared machine the load changes between
them. This script alternates the two models for several rounds at a fixed thread count and prints the
ratio of each round and the median ratio. It runs under the report's timing environment
(:func:`kdcompress.timing.child_env`: OMP_WAIT_POLICY=PASSIVE, fixed allocator thresholds), re-starting itself
with it when started without. Example (after `kdc run fashion-mnist-cnn.yaml`)::

    python scripts/bench_pruned.py runs/fashion-mnist-cnn --batch 64 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from kdcompress.checkpoint import load_checkpoint
from kdcompress.measure import latency
from kdcompress.models import build_from_checkpoint
from kdcompress.timing import restart_in_timing_env


def _model(run_dir: Path, stage: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    ckpt = load_checkpoint(run_dir / stage / "model.pt")
    return build_from_checkpoint(ckpt, where=f"{stage} checkpoint").eval(), tuple(ckpt["arch"]["input_shape"])


def main() -> None:
    restart_in_timing_env()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--base", default="distilled", help="the stage to compare against (default: distilled)")
    parser.add_argument("--stage", default="pruned", help="the stage to time against it (default: pruned)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.5, help="timed run time per model and round")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, shape = _model(args.run_dir, args.base)
    other, _ = _model(args.run_dir, args.stage)
    rounds = []
    for r in range(args.rounds):
        times = {
            name: latency(model, shape, batch=args.batch, threads=args.threads, min_run_time=args.seconds)["median_ms"]
            for name, model in ((args.base, base), (args.stage, other))
        }
        rounds.append(times)
        print(
            f"round {r + 1}: {args.base} {times[args.base]:.2f} ms, {args.stage} {times[args.stage]:.2f} ms, "
            f"ratio {times[args.base] / times[args.stage]:.2f}"
        )
    ratios = [t[args.base] / t[args.stage] for t in rounds]
    summary = {
        "batch": args.batch,
        "threads": args.threads,
        "rounds": args.rounds,
        f"{args.base}_ms_median": statistics.median(t[args.base] for t in rounds),
        f"{args.stage}_ms_median": statistics.median(t[args.stage] for t in rounds),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }
    print(
        f"median ratio {summary['ratio_median']:.2f} (range {min(ratios):.2f} to {max(ratios):.2f}) over "
        f"{args.rounds} interleaved rounds, batch {args.batch}, {args.threads} threads"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
