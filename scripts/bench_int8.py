"""Which int8 route kdc ships: accuracy, bytes, latency, load time and load safety of each candidate.

Candidates, on one trained stage checkpoint (a CNN, so that convs are covered):

* ``ort``: onnxruntime ``quantize_static`` on kdc's ONNX export (QDQ, every op it can quantise, 7-bit
  weights per channel, uint8 activations, min/max calibration), run by onnxruntime; what
  ``kdcompress/export/int8.py`` does. With ``--variants``, the settings it was chosen among are timed
  beside it (Conv/Linear only, 8-bit weights, int8 activations, percentile calibration, per-tensor).
* ``pt2e``: torchao's PT2E with ``X86InductorQuantizer`` (export, prepare, calibrate, convert), then
  ``torch.compile`` with freezing; saved with ``torch.export.save``.
* ``quantize_``: torchao ``Int8DynamicActivationInt8WeightConfig``: Linear layers only, listed to show
  how little of a CNN it covers.

Bytes are compared with the fp32 ``state_dict`` saved by ``torch.save``. Latency is the median of
``kdcompress.measure.latency`` (torch.utils.benchmark) at a fixed thread count, the candidates timed in
turns over several rounds. Load time is measured in a fresh process: from the file's bytes to the first
batch's output, imports excluded. Example (after ``kdc train-student`` of the fashion-mnist-cnn recipe)::

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python scripts/bench_int8.py runs/fashion-mnist-cnn --stage student
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kdcompress.checkpoint import load_checkpoint
from kdcompress.data import load_data
from kdcompress.measure import latency
from kdcompress.models import build_from_checkpoint
from kdcompress.recipe import recipe_from_dict
from kdcompress.train import evaluate


def _accuracy(model, test, batch_size=500) -> float:
    with torch.no_grad():
        return evaluate(model, test, batch_size, torch.device("cpu"))["accuracy"]


def _fresh_load_seconds(code: str, path: Path) -> float:
    """Seconds a fresh interpreter takes from reading ``path`` to the first output (imports excluded)."""
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


ORT_LOAD = """
import sys, time, torch
from kdcompress.export import int8
x = torch.zeros(64, *SHAPE)
t = time.perf_counter()
model, _ = int8.decode(open(sys.argv[1], 'rb').read())
model(x)
print(time.perf_counter() - t)
"""

PT2E_LOAD = """
import sys, time, warnings, logging
warnings.simplefilter('ignore'); logging.disable(logging.WARNING)
import torch, torchao.quantization.pt2e  # registers the quantized ops the saved graph calls
import torch._inductor.config as cfg
cfg.freezing = True
x = torch.zeros(64, *SHAPE)
t = time.perf_counter()
program = torch.export.load(sys.argv[1])
model = torch.compile(program.module(), dynamic=False)
with torch.no_grad():
    model(x)
print(time.perf_counter() - t)
"""


def _ort_candidates(model, source, calibration, variants: bool) -> dict:
    from kdcompress.export import int8
    from kdcompress.export.onnx_common import OrtModule, example_batch, export_onnx, set_meta

    proto = export_onnx(model, example_batch(source, calibration))
    out = {}
    fp32 = proto.__class__()
    fp32.CopyFrom(proto)
    set_meta(fp32, "onnx", source, {})
    out["onnx fp32 (ort)"] = {"blob": fp32.SerializeToString(), "module": None}
    # each variant spelt out in full, so a change of int8.quantize's defaults cannot relabel a row
    shipped = {"ops": None, "reduce_range": True, "per_channel": True, "activation": "uint8", "method": "minmax"}
    settings = {"ort int8 (shipped)": {}}  # int8.quantize's defaults: exactly what the int8 format writes
    if variants:
        settings.update(
            {
                "ort: conv+linear only, 8-bit w": dict(shipped, ops=int8.WEIGHT_OPS, reduce_range=False),
                "ort: conv+linear only": dict(shipped, ops=int8.WEIGHT_OPS),
                "ort: 8-bit weights": dict(shipped, reduce_range=False),
                "ort: int8 activations": dict(shipped, activation="int8"),
                "ort: percentile calibration": dict(shipped, method="percentile"),
                "ort: per-tensor weights": dict(shipped, per_channel=False),
            }
        )
    for name, kwargs in settings.items():
        copy = proto.__class__()
        copy.CopyFrom(proto)
        t = time.perf_counter()
        q = int8.quantize(copy, calibration, **kwargs)
        seconds = time.perf_counter() - t
        set_meta(q, "int8", source, {})
        out[name] = {"blob": q.SerializeToString(), "quantise_s": seconds}
    for row in out.values():
        row["module"] = OrtModule(row["blob"], {})
        row["loads_code"] = "no (protobuf parse)"
    return out


class _Callable(torch.nn.Module):
    """A compiled exported graph as a module whose train()/eval() do nothing (the graph refuses them)."""

    def __init__(self, fn):
        super().__init__()
        self._fn = [fn]  # in a list: not registered as a submodule, so eval() does not reach it

    def forward(self, x):
        return self._fn[0](x)


def _pt2e_candidate(model, example, calibration, shape) -> dict:
    import torch._inductor.config as cfg
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    t = time.perf_counter()
    dynamic = ({0: torch.export.Dim("batch")},)  # else the graph only takes the example's batch size
    graph = torch.export.export(model, (example,), dynamic_shapes=dynamic).module()
    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for batch in calibration:
            prepared(batch)
    converted = convert_pt2e(prepared)
    seconds = time.perf_counter() - t
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(converted, (example,), dynamic_shapes=dynamic), buffer)
    cfg.freezing = True
    compiled = torch.compile(converted, dynamic=False)
    with torch.no_grad():
        compiled(torch.zeros(64, *shape))  # compile outside the timed region
    # torch.export.load reads a .pt2 archive's weights and constants in this module; read what it does
    import torch.export.pt2_archive._package as archive

    unpickles = "weights_only=False" in inspect.getsource(archive)
    return {
        "blob": buffer.getvalue(),
        "module": _Callable(compiled),
        "quantise_s": seconds,
        "loads_code": "YES: torch.export.load reads weights with torch.load(weights_only=False)" if unpickles else "no",
    }


def _quantize_candidate(model) -> dict:
    import copy

    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    q = copy.deepcopy(model)
    quantize_(q, Int8DynamicActivationInt8WeightConfig())
    buffer = io.BytesIO()
    torch.save(q.state_dict(), buffer)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    return {
        "blob": buffer.getvalue(),
        "module": q,
        "loads_code": "no (weights_only=True + assign)",
        "note": f"Linear only: its {convs} conv(s) stay fp32",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--stage", default="student")
    parser.add_argument("--calib-batches", type=int, default=8, help="training batches of 128 to calibrate on")
    parser.add_argument("--batch", type=int, default=64, help="latency batch size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=0.5, help="timed run time per model and round")
    parser.add_argument("--candidates", default="ort,pt2e,quantize_")
    parser.add_argument("--variants", action="store_true", help="also time onnxruntime quantiser variants")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    candidates = set(args.candidates.split(","))

    ckpt = load_checkpoint(args.run_dir / args.stage / "model.pt")
    model = build_from_checkpoint(ckpt, where=f"{args.stage} checkpoint").eval()
    shape = tuple(ckpt["arch"]["input_shape"])
    recipe = recipe_from_dict(ckpt["recipe"], source=str(args.run_dir))
    data = load_data(recipe.data, seed=recipe.run.seed)
    generator = torch.Generator().manual_seed(0)
    calibration = []
    for x, _, _ in data.train.batches(128, shuffle=True, generator=generator):
        calibration.append(x)
        if len(calibration) == args.calib_batches:
            break
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    fp32_bytes = len(buffer.getvalue())

    rows = {
        "fp32 eager (state_dict)": {"blob": buffer.getvalue(), "module": model, "loads_code": "no (weights_only=True)"}
    }
    if "ort" in candidates:
        rows.update(_ort_candidates(model, ckpt, calibration, args.variants))
    if "pt2e" in candidates:
        rows["torchao pt2e x86-inductor"] = _pt2e_candidate(model, calibration[0], calibration, shape)
    if "quantize_" in candidates:
        rows["torchao quantize_ int8 dyn"] = _quantize_candidate(model)

    for name, row in rows.items():
        row["accuracy"] = _accuracy(row["module"], data.test)
        row["bytes"] = len(row["blob"])
    times = {name: [] for name in rows}
    for _ in range(args.rounds):  # in turns, so that machine load falls on every candidate alike
        for name, row in rows.items():
            times[name].append(
                latency(row["module"], shape, batch=args.batch, threads=args.threads, min_run_time=args.seconds)[
                    "median_ms"
                ]
            )
    with tempfile.TemporaryDirectory() as tmp:
        for name, row in rows.items():
            row["latency_ms"] = statistics.median(times[name])
            code = None
            if name.startswith("ort int8") or name.startswith("onnx fp32"):
                code = (
                    ORT_LOAD.replace("int8.decode", "onnx.decode").replace("import int8", "import onnx")
                    if name.startswith("onnx")
                    else ORT_LOAD
                )
            elif name.startswith("torchao pt2e"):
                code = PT2E_LOAD
            if code:
                path = Path(tmp) / "artifact"
                path.write_bytes(row["blob"])
                row["load_s"] = _fresh_load_seconds(code.replace("SHAPE", repr(shape)), path)

    base = rows["fp32 eager (state_dict)"]
    print(
        f"{args.run_dir / args.stage}: {data.name} test set ({len(data.test)}), calibration {len(calibration)} x 128 "
        f"training samples, latency batch {args.batch}, {args.threads} thread(s), median of {args.rounds} rounds"
    )
    head = f"{'candidate':30} {'accuracy':>8} {'d.point':>7} {'bytes':>10} {'x smaller':>9} {'ms/b64':>8} {'vs eager':>8} {'load s':>7}  loading runs code?"
    print(head)
    print("-" * len(head))
    table = []
    for name, row in rows.items():
        entry = {
            "candidate": name,
            "accuracy": row["accuracy"],
            "delta_points": 100 * (row["accuracy"] - base["accuracy"]),
            "bytes": row["bytes"],
            "smaller_x": fp32_bytes / row["bytes"],
            "latency_ms": row["latency_ms"],
            "speedup_vs_eager": base["latency_ms"] / row["latency_ms"],
            "load_s": row.get("load_s"),
            "loads_code": row["loads_code"],
            "quantise_s": row.get("quantise_s"),
            "note": row.get("note"),
        }
        table.append(entry)
        load = f"{entry['load_s']:.2f}" if entry["load_s"] is not None else "-"
        print(
            f"{name:30} {entry['accuracy']:8.4f} {entry['delta_points']:+7.2f} {entry['bytes']:10,} "
            f"{entry['smaller_x']:9.2f} {entry['latency_ms']:8.2f} {entry['speedup_vs_eager']:8.2f} {load:>7}  "
            f"{entry['loads_code']}{'; ' + entry['note'] if entry['note'] else ''}"
        )
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
