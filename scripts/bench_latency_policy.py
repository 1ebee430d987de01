"""Which conditions the report's latency needs: OpenMP's wait policy, timing in turns, a busy core.

Each measurement runs in a fresh process (OpenMP reads ``OMP_WAIT_POLICY`` once, when torch loads), with the
policy unset (libgomp's default: waiting threads spin a while, then sleep; what training now runs with) or
``PASSIVE`` (waiting threads sleep at once: what a measuring child process could be started with), or
``spinN``: the default policy with ``GOMP_SPINCOUNT=N`` (libgomp spins N times before it sleeps; its default
is 300,000). In each,
three models are timed at 2 threads, as the report does: an MLP 784-100-10 at batch 1, a small CNN
(channels 32/64, hidden 128: the CNN recipe's student) and the same CNN with half its channels (what
structured pruning at 0.5 leaves) at batch 64, two ways:

- ``sequential``: :func:`kdcompress.measure.latency` once per model and batch, one after the other (the
  report before issue 18);
- ``rounds``: :func:`kdcompress.measure.interleaved_latencies`, the models in turns for 15 rounds.

Each (policy, method) is measured ``--repeats`` times with the machine as it is, then again with a CPU burner
(``python -c "while True: pass"``) on one core. Example::

    python scripts/bench_latency_policy.py --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODELS = {  # key: (model, args, batch)
    "mlp_b1": ("mlp", {"hidden": [100]}, 1),
    "cnn_b64": ("cnn", {"channels": [32, 64], "hidden": 128}, 64),
    "cnn_half_b64": ("cnn", {"channels": [16, 32], "hidden": 64}, 64),
}


def worker(threads: int, min_run_time: float) -> dict:
    """Time the three models both ways in this process; the figures in ms."""
    started = time.perf_counter()
    import torch

    from kdcompress.measure import interleaved_latencies, latency
    from kdcompress.models import build_model

    torch.manual_seed(0)
    built = {
        key: build_model({"model": name, "args": args, "num_classes": 10, "input_shape": [1, 28, 28]}).eval()
        for key, (name, args, _) in MODELS.items()
    }
    ready = time.perf_counter()
    sequential = {
        key: latency(built[key], (1, 28, 28), batch=batch, threads=threads, min_run_time=min_run_time)
        for key, (_, _, batch) in MODELS.items()
    }
    rounds = {}
    for batch in sorted({b for _, _, b in MODELS.values()}):
        keys = [k for k, (_, _, b) in MODELS.items() if b == batch]
        rounds.update(
            interleaved_latencies(
                {k: (built[k], (1, 28, 28)) for k in keys}, batch=batch, threads=threads, min_run_time=min_run_time
            )
        )
    return {
        "startup_s": ready - started,
        "sequential": {k: v["median_ms"] for k, v in sequential.items()},
        "rounds": {k: v["median_ms"] for k, v in rounds.items()},
        "rounds_iqr": {k: v["iqr_ms"] for k, v in rounds.items()},
    }


def run_worker(policy: str, threads: int, min_run_time: float) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("GOMP_SPINCOUNT", None)
    if policy.startswith("spin"):  # the default policy, waiting threads spinning this many times (libgomp)
        env["GOMP_SPINCOUNT"] = policy[len("spin") :]
    elif policy != "unset":
        env["OMP_WAIT_POLICY"] = policy
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--worker", "--threads", str(threads), "--min-run-time", str(min_run_time)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--policies", default="unset,PASSIVE", help="comma-separated: unset, PASSIVE, ACTIVE, spinN")
    parser.add_argument("--conditions", default="quiet,burner")
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.threads, args.min_run_time)))
        return
    policies = args.policies.split(",")
    results = []
    print(f"load before: {os.getloadavg()}", flush=True)
    for condition in args.conditions.split(","):
        burner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if condition == "burner" else None
        try:
            time.sleep(1.0 if burner else 0.0)
            for repeat in range(args.repeats):
                # alternate which policy goes first, so neither always meets the machine in the same state
                for policy in policies if repeat % 2 == 0 else policies[::-1]:
                    r = run_worker(policy, args.threads, args.min_run_time)
                    r.update(condition=condition, policy=policy, repeat=repeat)
                    results.append(r)
                    for method in ("sequential", "rounds"):
                        t = r[method]
                        print(
                            f"{condition:6} {policy:10} {method:10} mlp b1 {t['mlp_b1']:7.3f} ms  cnn b64 "
                            f"{t['cnn_b64']:7.2f} ms  half b64 {t['cnn_half_b64']:7.2f} ms  ratio "
                            f"{t['cnn_b64'] / t['cnn_half_b64']:5.2f}  (process {r['process_s']:.1f} s, "
                            f"startup {r['startup_s']:.1f} s)",
                            flush=True,
                        )
        finally:
            if burner is not None:
                burner.kill()
                burner.wait()
    print(f"load after: {os.getloadavg()}")
    print("\nmedian over repeats [min-max]:")
    for condition in args.conditions.split(","):
        for policy in policies:
            for method in ("sequential", "rounds"):
                rs = [r[method] for r in results if r["condition"] == condition and r["policy"] == policy]
                cols = []
                for key in ("mlp_b1", "cnn_b64", "cnn_half_b64"):
                    v = [t[key] for t in rs]
                    cols.append(f"{key} {statistics.median(v):.3f} [{min(v):.3f}-{max(v):.3f}]")
                ratio = [t["cnn_b64"] / t["cnn_half_b64"] for t in rs]
                cols.append(f"ratio {statistics.median(ratio):.2f} [{min(ratio):.2f}-{max(ratio):.2f}]")
                print(f"{condition:6} {policy:10} {method:10} " + "  ".join(cols))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
