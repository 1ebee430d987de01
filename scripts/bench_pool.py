"""Max-pooling on CPU at inference: ``nn.MaxPool2d`` against kdc's ``MaxPool2x2``, and what it does to latency.

ATen's CPU max-pool kernel is not vectorised in the default (NCHW) layout, so kdc's built-in CNNs pool through
:class:`kdcompress.models.MaxPool2x2` (two elementwise maxima) when no gradient is taken. This script times, in
interleaved rounds at a fixed thread count under the report's timing environment (OMP_WAIT_POLICY=PASSIVE,
fixed allocator thresholds):

1. a 2x2 pool of a batch at the activation shapes of the shipped CNNs: ``nn.MaxPool2d`` in NCHW, the same
   through a channels-last copy (the layout ATen's kernel vectorises, copies included), and ``MaxPool2x2``;
2. whole forward passes of the CNN recipe's student before and after structured pruning (its channels halved),
   with each pool, and the pruned/dense latency ratio each gives.

Example::

    python scripts/bench_pool.py --threads 2 --batch 64 --json pool.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys

import torch
import torch.utils.benchmark
from torch import nn

from kdcompress.models import LeNet5, MaxPool2x2, SmallCNN
from kdcompress.timing import MALLOC_SETTINGS, child_env

# (channels, side) of the pool inputs in the shipped CNN recipes' models and LeNet-5
POOL_SHAPES = [(6, 28), (8, 28), (16, 28), (32, 28), (64, 28), (16, 14), (32, 14), (64, 14), (128, 14), (256, 7)]


def _plain(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every MaxPool2x2 replaced by a plain nn.MaxPool2d (the old path)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, MaxPool2x2):
            parent = model.get_submodule(name.rpartition(".")[0])
            plain = nn.MaxPool2d(module.kernel_size, module.stride, module.padding, module.dilation)
            setattr(parent, name.rpartition(".")[2], plain)
    return model


def _time(fn, threads: int, seconds: float) -> float:
    timer = torch.utils.benchmark.Timer("fn()", globals={"fn": fn}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=seconds).median * 1e3


def _interleaved(cases: dict, rounds: int, threads: int, seconds: float) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(rounds):
        names = list(cases) if r % 2 == 0 else list(reversed(cases))
        for name in names:
            times[name].append(_time(cases[name], threads, seconds))
    return times


def _paired(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def main() -> None:
    env = child_env()
    if any(os.environ.get(key) != env[key] for key in ("OMP_WAIT_POLICY", *MALLOC_SETTINGS)):
        os.execve(sys.executable, [sys.executable, *sys.argv], env)  # OpenMP and glibc read these at start
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.2, help="timed run time per case and round")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out: dict = {"batch": args.batch, "threads": args.threads, "rounds": args.rounds, "torch": torch.__version__}

    print(f"2x2 max-pool, batch {args.batch}, {args.threads} threads, median ms over {args.rounds} rounds")
    pools = []
    plain, fast = nn.MaxPool2d(2), MaxPool2x2()
    last = torch.channels_last

    def via_channels_last(x):
        return plain(x.contiguous(memory_format=last)).contiguous()

    with torch.no_grad():
        for channels, side in POOL_SHAPES:
            x = torch.randn(args.batch, channels, side, side)
            assert torch.equal(plain(x), fast(x)) and torch.equal(plain(x), via_channels_last(x))
            cases = {
                "nchw": lambda: plain(x),
                "channels_last": lambda: via_channels_last(x),
                "maxpool2x2": lambda: fast(x),
            }
            t = _interleaved(cases, args.rounds, args.threads, args.seconds)
            row = {"channels": channels, "side": side} | {f"{k}_ms": statistics.median(v) for k, v in t.items()}
            row["speedup"] = _paired(t["nchw"], t["maxpool2x2"])
            pools.append(row)
            print(
                f"  {channels:4d} x {side:2d} x {side:2d}: nn.MaxPool2d {row['nchw_ms']:7.3f}   via channels-last "
                f"{row['channels_last_ms']:7.3f}   MaxPool2x2 {row['maxpool2x2_ms']:7.3f}   {row['speedup']:.2f}x"
            )
    out["pool"] = pools

    # the CNN recipe's student (32/64, hidden 128) and what structured pruning at 0.5 leaves of it (16/32, 64)
    nets = {
        "cnn 32/64 h128": SmallCNN(channels=(32, 64), hidden=128).eval(),
        "cnn 16/32 h64": SmallCNN(channels=(16, 32), hidden=64).eval(),
        "lenet5": LeNet5().eval(),
    }
    x = torch.randn(args.batch, 1, 28, 28)
    cases = {}
    with torch.no_grad():
        for name, net in nets.items():
            old = _plain(net)
            assert torch.equal(old(x), net(x))
            cases[f"{name} | nn.MaxPool2d"] = lambda m=old: m(x)
            cases[f"{name} | MaxPool2x2"] = lambda m=net: m(x)
        t = _interleaved(cases, args.rounds, args.threads, args.seconds)
    print(f"forward pass, batch {args.batch}: median ms")
    for name, times in t.items():
        print(f"  {name:40s} {statistics.median(times):8.3f}")
    out["forward_ms"] = {name: statistics.median(times) for name, times in t.items()}
    ratios = {}
    for pool in ("nn.MaxPool2d", "MaxPool2x2"):
        ratios[pool] = _paired(t[f"cnn 32/64 h128 | {pool}"], t[f"cnn 16/32 h64 | {pool}"])
        print(f"  dense/pruned (32/64 against 16/32) with {pool}: {ratios[pool]:.2f}x (paired median)")
    out["dense_over_pruned"] = ratios
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
