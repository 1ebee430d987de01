"""Max-pooling on CPU at inference: ``nn.MaxPool2d`` against kdc's ``MaxPool2x2``, and what it does to latency.

ATen's CPU max-pool kernel is not vectorised in the default (NCHW) layout, so kdc's built-in CNNs pool through
:class:`kdcompress.models.MaxPool2x2` (two elementwise maxima) when no gradient is taken. This script times, in
interleaved rounds at a fixed thread count under the report's timing environment (OMP_WAIT_POLICY=PASSIVE,
fixed allocator thresholds):

1. a 2x2 pool of a batch at the activation shapes of the shipped CNNs: ``nn.MaxPool2d`` in NCHW, the same
   through a channels-last copy (the layout ATen's kernel vectorises, copies included), and ``MaxPool2x2``;
2. whole forward passes of the CNN recipe's student before and after structured pruning (its channels halved),
   with each pool, and the pruned/dense latency ratio each gives.

Timing is :func:`kdcompress.measure.interleaved_latencies` (the report's: every case one block per round, in
turns) and ratios are :func:`kdcompress.measure.paired_ratio` of the same rounds.

Example::

    python scripts/bench_pool.py --threads 2 --batch 64 --json pool.json
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from torch import nn

from kdcompress.measure import interleaved_latencies, paired_ratio
from kdcompress.models import LeNet5, MaxPool2x2, SmallCNN
from kdcompress.timing import restart_in_timing_env

# (channels, side) of the pool inputs in the shipped CNN recipes' models and LeNet-5
POOL_SHAPES = [(6, 28), (8, 28), (16, 28), (32, 28), (64, 28), (16, 14), (32, 14), (64, 14), (128, 14), (256, 7)]


class ViaChannelsLast(nn.MaxPool2d):
    """``nn.MaxPool2d(2)`` on a channels-last copy of its input, the output copied back to NCHW."""

    def __init__(self):
        super().__init__(2)

    def forward(self, x):
        return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()


def _plain(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every MaxPool2x2 replaced by a plain nn.MaxPool2d (the old path)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, MaxPool2x2):
            parent = model.get_submodule(name.rpartition(".")[0])
            plain = nn.MaxPool2d(module.kernel_size, module.stride, module.padding, module.dilation)
            setattr(parent, name.rpartition(".")[2], plain)
    return model


def _pools(args) -> list[dict]:
    print(f"2x2 max-pool, batch {args.batch}, {args.threads} threads, median ms over {args.rounds} rounds")
    rows = []
    cases = {"nchw": nn.MaxPool2d(2), "channels_last": ViaChannelsLast(), "maxpool2x2": MaxPool2x2()}
    for channels, side in POOL_SHAPES:
        x = torch.randn(args.batch, channels, side, side)
        with torch.no_grad():
            assert all(torch.equal(cases["nchw"](x), pool(x)) for pool in cases.values())
        timing = interleaved_latencies(
            {name: (pool, (channels, side, side)) for name, pool in cases.items()},
            batch=args.batch, threads=args.threads, rounds=args.rounds, min_run_time=args.seconds,
        )  # fmt: skip
        row = {"channels": channels, "side": side} | {f"{k}_ms": v["median_ms"] for k, v in timing.items()}
        row["speedup"] = paired_ratio(timing["nchw"]["rounds_ms"], timing["maxpool2x2"]["rounds_ms"])
        rows.append(row)
        print(
            f"  {channels:4d} x {side:2d} x {side:2d}: nn.MaxPool2d {row['nchw_ms']:7.3f}   via channels-last "
            f"{row['channels_last_ms']:7.3f}   MaxPool2x2 {row['maxpool2x2_ms']:7.3f}   {row['speedup']:.2f}x"
        )
    return rows


def _forwards(args) -> tuple[dict, dict]:
    # the CNN recipe's student (32/64, hidden 128) and what structured pruning at 0.5 leaves of it (16/32, 64)
    nets = {
        "cnn 32/64 h128": SmallCNN(channels=(32, 64), hidden=128).eval(),
        "cnn 16/32 h64": SmallCNN(channels=(16, 32), hidden=64).eval(),
        "lenet5": LeNet5().eval(),
    }
    x = torch.randn(args.batch, 1, 28, 28)
    cases = {}
    for name, net in nets.items():
        old = _plain(net)
        with torch.no_grad():
            assert torch.equal(old(x), net(x))
        cases[f"{name} | nn.MaxPool2d"] = (old, (1, 28, 28))
        cases[f"{name} | MaxPool2x2"] = (net, (1, 28, 28))
    timing = interleaved_latencies(
        cases, batch=args.batch, threads=args.threads, rounds=args.rounds, min_run_time=args.seconds
    )
    print(f"forward pass, batch {args.batch}: median ms")
    for name, t in timing.items():
        print(f"  {name:40s} {t['median_ms']:8.3f}")
    ratios = {}
    for pool in ("nn.MaxPool2d", "MaxPool2x2"):
        dense, pruned = timing[f"cnn 32/64 h128 | {pool}"], timing[f"cnn 16/32 h64 | {pool}"]
        ratios[pool] = paired_ratio(dense["rounds_ms"], pruned["rounds_ms"])
        print(f"  dense/pruned (32/64 against 16/32) with {pool}: {ratios[pool]:.2f}x (paired median)")
    return {name: t["median_ms"] for name, t in timing.items()}, ratios


def main() -> None:
    restart_in_timing_env()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="timed run time per case, over all rounds")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out: dict = {"batch": args.batch, "threads": args.threads, "rounds": args.rounds, "torch": torch.__version__}
    out["pool"] = _pools(args)
    out["forward_ms"], out["dense_over_pruned"] = _forwards(args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
