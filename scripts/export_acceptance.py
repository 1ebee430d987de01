"""Check issue 10's acceptance figures on finished runs and print them with what each is compared to.

Run the recipes and exports first (scripts/export_acceptance.sh does all of it), then::

    python scripts/export_acceptance.py --mlp runs/fashion-mnist-mlp --cnn runs/fashion-mnist-cnn

Every figure is read from the run's report.json (written by `kdc export` / `kdc report`) or measured here:
the fp32 state_dict bytes of the CNN student (torch.save of its state_dict) and the share of test images
on which the onnx file predicts what the checkpoint does in torch eager. Exits 1 if a goal is missed.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import torch


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def _stage(report: dict, name: str) -> dict:
    return next(r for r in report["stages"] if r["stage"] == name)


def _artifact(report: dict, fmt: str, stage: str = "pruned", pick=None) -> dict | None:
    rows = [
        a
        for a in report.get("artifacts", [])
        if a.get("format") == fmt and a.get("stage") == stage and not a.get("refused")
    ]
    if pick:
        rows = [a for a in rows if pick(a)]
    return min(rows, key=lambda a: a["bytes"]) if rows else None


def _agreement(run_dir: Path, artifact: dict, stage: str) -> float:
    """Share of test images on which the artifact and the stage checkpoint (torch eager) predict the same class."""
    from kdcompress.data import load_data
    from kdcompress.export import load_artifact
    from kdcompress.loading import load_model
    from kdcompress.recipe import load_recipe

    recipe = load_recipe(run_dir / "recipe.yaml")
    data = load_data(recipe.data, seed=recipe.run.seed)
    eager, _ = load_model(run_dir / stage / "model.pt", allow_import=True)
    shipped = load_artifact(run_dir / artifact["path"], allow_import=True)
    same = total = 0
    with torch.no_grad():
        for x, _, _ in data.test.batches(1000):
            same += int((eager(x).argmax(1) == shipped(x).argmax(1)).sum())
            total += len(x)
    return same / total


def _state_dict_bytes(run_dir: Path, stage: str) -> int:
    from kdcompress.loading import load_model

    model, _ = load_model(run_dir / stage / "model.pt", allow_import=True)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mlp", type=Path, help="run directory of the fashion-mnist-mlp recipe, exported")
    parser.add_argument("--cnn", type=Path, help="run directory of the fashion-mnist-cnn recipe, exported")
    parser.add_argument("--stage", default="pruned", help="the exported stage (default pruned)")
    args = parser.parse_args()
    results: list[tuple[str, str, bool]] = []

    def check(name: str, text: str, ok: bool) -> None:
        results.append((name, text, ok))

    if args.mlp:
        rep = _report(args.mlp)
        teacher, distilled, source = _stage(rep, "teacher"), _stage(rep, "distilled"), _stage(rep, args.stage)
        dense = distilled["checkpoint_bytes"]
        sparse = _artifact(rep, "sparse", args.stage, lambda a: (a.get("options") or {}).get("dtype") == "fp16")
        if sparse:
            ratio, change = dense / sparse["bytes"], sparse["accuracy"] - source["accuracy"]
            check(
                "mlp sparse fp16",
                f"{sparse['bytes']:,} B, {ratio:.1f}x smaller than the dense student "
                f"({dense:,} B; goal >= 8x); accuracy {sparse['accuracy']:.4f}, {change * 100:+.2f} pt vs {args.stage} "
                f"{source['accuracy']:.4f} (goal within 0.1)",
                ratio >= 8 and abs(change) <= 0.001 + 1e-12,
            )
        else:
            check("mlp sparse fp16", "no sparse fp16 artifact", False)
        shared = _artifact(rep, "shared", args.stage, lambda a: (a.get("options") or {}).get("bits", 9) <= 4)
        if shared:
            ratio, vs_teacher = dense / shared["bytes"], teacher["checkpoint_bytes"] / shared["bytes"]
            change = shared["accuracy"] - distilled["accuracy"]
            check(
                "mlp shared",
                f"{shared['options']['bits']} bits: {shared['bytes']:,} B, {ratio:.1f}x smaller than "
                f"the dense student (goal >= 25x), {vs_teacher:,.0f}x smaller than the teacher "
                f"({teacher['checkpoint_bytes']:,} B; goal >= 1000x); accuracy {shared['accuracy']:.4f}, "
                f"{change * 100:+.2f} pt vs distilled {distilled['accuracy']:.4f} (goal within 1)",
                ratio >= 25 and vs_teacher >= 1000 and abs(change) <= 0.01 + 1e-12,
            )
        else:
            check("mlp shared", "no shared artifact of 4 bits or fewer", False)
    if args.cnn:
        rep = _report(args.cnn)
        source = _stage(rep, args.stage)
        int8 = _artifact(rep, "int8", args.stage)
        if int8:
            fp32 = _state_dict_bytes(args.cnn, args.stage)
            ratio, change = fp32 / int8["bytes"], int8["accuracy"] - source["accuracy"]
            lat = (source.get("latency_ms") or {}).get("64"), (int8.get("latency_ms") or {}).get("64")
            latency = f"; batch-64 latency fp32 eager {lat[0]:.2f} ms, int8 {lat[1]:.2f} ms" if all(lat) else ""
            check(
                "cnn int8",
                f"{int8['bytes']:,} B, {ratio:.2f}x smaller than the fp32 state_dict ({fp32:,} B; goal "
                f">= 3.5x); accuracy {int8['accuracy']:.4f}, {change * 100:+.2f} pt vs {args.stage} "
                f"(goal within 0.5){latency}",
                ratio >= 3.5 and abs(change) <= 0.005 + 1e-12,
            )
        else:
            check("cnn int8", "no int8 artifact", False)
    for run in [r for r in (args.mlp, args.cnn) if r]:
        rep = _report(run)
        onnx = _artifact(rep, "onnx", args.stage)
        if not onnx:
            continue
        agree = _agreement(run, onnx, args.stage)
        source = _stage(rep, args.stage)
        lat = [((source.get("latency_ms") or {}).get(b), (onnx.get("latency_ms") or {}).get(b)) for b in ("1", "64")]
        speed = "; ".join(
            f"batch {b}: eager {e:.3f} ms, onnxruntime {o:.3f} ms ({e / o:.1f}x)"
            for b, (e, o) in zip(("1", "64"), lat)
            if e and o
        )
        check(
            f"{run.name} onnx",
            f"same prediction as eager on {agree:.2%} of the test set (goal >= 99.9 %); {speed}",
            agree >= 0.999,
        )
    width = max(len(name) for name, _, _ in results) if results else 0
    for name, text, ok in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name:<{width}}  {text}")
    return 0 if results and all(ok for _, _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
