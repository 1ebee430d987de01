"""How well the per-layer latency table predicts onnxruntime latency: predicted against measured, and what it costs.

The CNN student of the fashion-mnist recipes (SmallCNN, channels 32/64, hidden 128) and pruned copies of it
(uniform shares 0.3, 0.5 and 0.7 of every group, 0.3 again with ``round_to`` 8, and one uneven set) are predicted by
:func:`kdcompress.latency_budget.latency_cost` from a table built from empty in a fresh cache folder, then
exported to ONNX and timed for real by :func:`kdcompress.latency_budget.verify_latency` (interleaved rounds in
kdc's timing process). Printed: the table's build time, the time of the same predictions from the cached table
(a second table object reading the file), and per model the predicted and measured milliseconds per batch and
the error of each (``scaled``: the rest of the network scaled with the layers, kdc's default; ``constant``: held
constant; ``cached``: scaled, from the second table object and its own timing of the whole model). Example::

    python scripts/latency_table_check.py --batch 64 --threads 2 --rounds 7
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import torch

from kdcompress.latency_budget import LatencyTable, latency_cost, verify_latency
from kdcompress.models import SmallCNN
from kdcompress.prune.structured import StructuredPruner

SHAPE = (1, 28, 28)


ROUNDED = "0.3 round 8"  # the variant pruned with round_to=8


def variants(model) -> dict[str, dict[str, float]]:
    """Shares per variant: unpruned, three uniform ones, one of them rounded to multiples of 8, one uneven."""
    roots = [g["root"] for g in StructuredPruner(copy.deepcopy(model), SHAPE, scope="layer").groups_info()]
    found = {"unpruned": {}}
    found |= {f"uniform {share}": {root: share for root in roots} for share in (0.3, 0.5, 0.7)}
    found[ROUNDED] = found["uniform 0.3"]
    found["uneven"] = dict(zip(sorted(roots), (0.6, 0.2, 0.75)))  # classifier.1, features.0, features.4
    return found


def predict(model, shares, args, cache_dir) -> tuple[dict[str, tuple[float, float]], float, int]:
    """Predicted ms of each variant (rest scaled, rest constant) from a table in ``cache_dir``, the seconds it took
    and the units timed."""
    start = time.perf_counter()
    table = LatencyTable("onnxruntime", batch=args.batch, threads=args.threads, cache_dir=cache_dir)
    options = {"batch": args.batch, "runtime": "onnxruntime", "threads": args.threads, "table": table}
    cost = latency_cost(model, SHAPE, **options)
    layers = {name: cost.layers(s) for name, s in shares.items() if name != ROUNDED}
    layers[ROUNDED] = latency_cost(model, SHAPE, round_to=8, **options).layers(shares[ROUNDED])
    # rest="scaled" (the default) and rest="constant", from the same table and the same whole-model timing
    predicted = {
        name: (cost.whole_ms * ms / cost.layers_ms, max(0.0, ms + cost.rest_ms)) for name, ms in layers.items()
    }
    print(
        f"  whole unpruned model {cost.whole_ms:.2f} ms = its layer units {cost.layers_ms:.2f} + rest {cost.rest_ms:.2f}"
    )
    return predicted, time.perf_counter() - start, table.timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = SmallCNN(SHAPE, channels=(32, 64), hidden=128).eval()
    shares = variants(model)
    print(f"load average before: {os.getloadavg()}  ({os.cpu_count()} cores)")
    with tempfile.TemporaryDirectory(prefix="kdc-latency-table-") as cache_dir:
        print("building the table from empty:")
        predicted, built, timed = predict(model, shares, args, cache_dir)
        print(f"  {timed} layer units timed in {built:.1f} s (export, session, timing; whole model included)")
        print("the same predictions from the cached table:")
        again, hit, timed_again = predict(model, shares, args, cache_dir)
        print(f"  {timed_again} units timed, {hit:.1f} s (the whole model is still timed once for the rest)")
    models = {}
    for name, s in shares.items():
        models[name] = copy.deepcopy(model)
        if s:
            round_to = 8 if name == ROUNDED else None
            StructuredPruner(models[name], SHAPE, scope="layer", round_to=round_to).prune_ratios(s)
    measured = verify_latency(
        models, SHAPE, batch=args.batch, runtime="onnxruntime", threads=args.threads, rounds=args.rounds
    )
    print(f"\nonnxruntime, batch {args.batch}, {args.threads} threads, median of {args.rounds} interleaved rounds")
    print(
        f"{'model':<12} {'scaled':>8} {'constant':>9} {'cached':>8} {'measured':>9} {'IQR':>6} {'error':>7} {'error c.':>8}"
    )
    for name in shares:
        m = measured[name]["median_ms"]
        (scaled, constant), cached = predicted[name], again[name][0]
        print(
            f"{name:<12} {scaled:>6.2f}ms {constant:>7.2f}ms {cached:>6.2f}ms {m:>7.2f}ms "
            f"{measured[name]['iqr_ms']:>6.2f} {scaled / m - 1:>+7.0%} {constant / m - 1:>+8.0%}"
        )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
