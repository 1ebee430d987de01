"""The ``int8`` export format: post-training static quantisation of every Conv and Linear (Gemm/MatMul).

Route: onnxruntime's quantiser on kdc's ONNX export. The fp32 model is exported as for the ``onnx``
format, then ``onnxruntime.quantization.quantize_static`` rewrites it in QDQ form: int8 weights with one
scale per output channel, uint8 activations with scales from the calibration batches (min/max), run by
onnxruntime's int8 kernels. The file is an ONNX model with kdc's metadata, so loading it is a protobuf
parse: nothing is unpickled and no code is imported.

Why this route: measured by ``scripts/bench_int8.py runs/fashion-mnist-cnn --variants`` on that
recipe's student (trained 2 epochs, 89.03 %), full test set, batch 64, one thread, on a shared 2-core
AVX2 machine without VNNI (latencies there drift by 30 % between runs; the ratios hold better)::

    candidate                   accuracy  bytes      smaller  ms/b64  load   loading runs code?
    fp32 eager (state_dict)     89.03 %   1,693,235  1.00x    33.5    -      no (weights_only=True)
    onnx fp32, onnxruntime      89.03 %   1,690,836  1.00x     9.7    0.14s  no (protobuf)
    onnxruntime int8 (this)     88.94 %     434,407  3.90x     8.6    0.12s  no (protobuf)
    torchao pt2e x86-inductor   89.09 %   2,590,571  0.65x     8.4    5-21s  yes: torch.export.load
                                                                            unpickles its weights
    torchao quantize_ (Linear)  88.96 %     487,591  3.47x    63.2    -      no; the convs stay fp32

PT2E is as accurate and as fast once compiled, but ``torch.export.save`` writes a file larger than the
fp32 weights, loading it means ``torch.compile`` (a C++ compiler, 21 s cold, 5 s with a warm cache) and
``torch.export.load`` (torch 2.14) reads an archive's weights with ``torch.load(weights_only=False)``,
so a crafted file runs code. ``quantize_`` leaves convolutions in fp32 and is slower than eager fp32 on CPU.
Among onnxruntime's settings: quantising only Conv/Gemm left fp32 Relu/MaxPool between them (1.6-1.8x
slower, Quantize/Dequantize pairs around every op) and, with 8-bit weights, lost 0.32 point (uint8 x
int8 products saturate on AVX2 without VNNI); 7-bit weights on every op lost 0.09 point.

Needs the onnx extra: ``pip install 'kdcompress[onnx]'``.

Example::

    >>> blob, info = encode(model, source, {}, calibration)  # doctest: +SKIP
    >>> loaded, preprocess = decode(blob)  # doctest: +SKIP
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import KdcError, ModelError, describe
from .onnx_common import OrtModule, check_batch, compare, example_batch, export_onnx, parse, quiet, require, set_meta

SUFFIX = ".onnx"  # a plain ONNX model: any onnxruntime loads it

__all__ = ["encode", "decode", "quantize", "preprocess", "quantisable_nodes", "node_labels", "fp32_nodes", "FORMAT"]

FORMAT = "int8"
# The ops a Linear/Conv model exports to that hold weights: Conv, and Gemm/MatMul for Linear. The shipped
# setting quantises every op onnxruntime can (ops=None), so that Relu and MaxPool stay in int8 between
# them instead of converting back and forth: measured 1.6-1.8x faster (see the module docstring).
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


def encode(
    model: nn.Module,
    source: dict,
    options: dict,
    calibration: list[torch.Tensor],
    nodes_to_exclude=(),
    fp32=None,
) -> tuple[bytes, dict]:
    """The model quantised to int8 (weights per channel, activations calibrated on ``calibration``), as ONNX bytes.

    Raises ModelError when no Conv or Linear weight ends up quantised (nothing would be smaller).

    ``calibration``: preprocessed float training batches; at least one is required. ``options`` takes no
    keys this function reads (``calibration_batches`` and ``int8_tolerance`` act before it). The info
    reports the settings and how often the int8 model's top-1 agrees with the fp32 model's on up to 512
    calibration samples. ``nodes_to_exclude``: names of nodes of the pre-processed fp32 graph that stay in
    fp32 (:func:`quantisable_nodes` lists them; :mod:`kdcompress.export.int8_tolerance` chooses them), listed
    in the info as ``fp32_nodes``. ``fp32``: the model's fp32 export (``export_onnx``) when the caller already
    made it, so that the node names are the ones it chose from.
    """
    require(FORMAT, "onnx", "onnxscript", "onnxruntime")
    if not calibration:
        raise KdcError("the int8 format needs calibration batches (preprocessed training inputs); none were given")
    model = model.eval()
    proto = fp32 if fp32 is not None else export_onnx(model, example_batch(source, calibration), FORMAT)
    quantised = quantize(proto, calibration, nodes_to_exclude=nodes_to_exclude)
    weights = _int8_weights(quantised, proto)
    if not weights:
        raise ModelError(
            "onnxruntime quantised none of the model's weights (it has no Conv or Linear layer it can quantise); "
            "int8 would not make it smaller: export it as onnx instead"
        )
    info = {
        "weights": "int8, per output channel",
        "activations": "uint8, per tensor",
        "calibration": "min/max",
        "calibration_samples": int(sum(len(b) for b in calibration)),
        "ops": "all that onnxruntime quantises (Conv, Gemm/MatMul, Relu, MaxPool, ...)",
        "weight_bits": 7,
        "quantised_weights": weights,
        "runtime": "onnxruntime",
    }
    if nodes_to_exclude:
        labels = node_labels(proto)
        info["fp32_nodes"] = [labels.get(name, name) for name in nodes_to_exclude]
    set_meta(quantised, FORMAT, source, info)
    blob = quantised.SerializeToString()
    check = compare(model, OrtModule(blob, {"format": FORMAT}), check_batch(source, calibration))
    info["agreement_with_fp32"] = round(check["agreement"], 4)
    return blob, info


def decode(
    blob: bytes, allow_import: bool = False, threads: int = 1, expected: str | None = None
) -> tuple[nn.Module, dict]:
    """``(onnxruntime module, preprocess dict)`` from int8 bytes kdc wrote; ArtifactError if they are not that.

    ``allow_import`` and ``expected`` change nothing: no code named in the file is imported or run.
    ``threads`` fixes onnxruntime's intra-op threads.
    """
    _, meta = parse(blob, FORMAT)
    return OrtModule(blob, meta, threads=threads), dict(meta.get("preprocess") or {})


def quantize(
    proto,
    calibration: list[torch.Tensor],
    activation: str = "uint8",
    method: str = "minmax",
    per_channel: bool = True,
    reduce_range: bool = True,
    ops=None,
    nodes_to_exclude=(),
    preprocessed: bool = False,
):
    """An fp32 ``onnx.ModelProto`` quantised in QDQ form with onnxruntime, calibrated on ``calibration``.

    ``activation`` "uint8" or "int8", ``method`` "minmax", "entropy" or "percentile": the defaults are the
    measured choice; the others are kept for ``scripts/bench_int8.py``. ``ops``: the ONNX op types to
    quantise (None: every op onnxruntime can, Conv and Gemm/MatMul included). ``reduce_range`` keeps
    weights to 7 bits: x86 CPUs without VNNI multiply uint8 by int8 with 16-bit intermediate sums that can
    saturate (onnxruntime's documentation); measured 0.11 point more accurate here.

    ``nodes_to_exclude``: node names (of the graph after :func:`preprocess`, which keeps the exporter's names)
    that onnxruntime leaves in fp32: such a node keeps its fp32 weights and computes in fp32, and its output
    gets no Quantize/Dequantize pair, so the ops after it that only it feeds stay fp32 too; its input is still
    the previous op's dequantised output when that op is quantised. ``preprocessed``: ``proto`` already went
    through :func:`preprocess` (a search that quantises one graph many times does that once).
    """
    onnx, ort_quant = require(FORMAT, "onnx", "onnxruntime.quantization")
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType

    class Reader(CalibrationDataReader):
        def __init__(self, batches, name):
            self._batches = iter(batches)
            self._name = name

        def get_next(self):
            batch = next(self._batches, None)
            return None if batch is None else {self._name: batch.detach().to("cpu", torch.float32).numpy()}

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    with tempfile.TemporaryDirectory(prefix="kdc-int8-") as tmp:
        fp32, pre, out = (Path(tmp) / name for name in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save_model(proto, str(pre if preprocessed else fp32))
        try:
            with quiet():
                if not preprocessed:
                    _pre_process(ort_quant, fp32, pre)
                ort_quant.quantize_static(
                    str(pre),
                    str(out),
                    Reader(calibration, proto.graph.input[0].name),
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(ops) if ops is not None else None,
                    per_channel=per_channel,
                    reduce_range=reduce_range,
                    activation_type=types[activation],
                    weight_type=QuantType.QInt8,
                    calibrate_method=methods[method],
                    nodes_to_exclude=list(nodes_to_exclude),
                )
        except Exception as exc:
            raise ModelError(
                f"onnxruntime could not quantise the model to int8 ({type(exc).__name__}: {describe(exc, 300)})"
            ) from None
        return onnx.load_model(str(out))


def _pre_process(ort_quant, source: Path, target: Path) -> None:
    """Shape inference and graph fusions, as onnxruntime's docs advise before quantising."""
    ort_quant.quant_pre_process(str(source), str(target), skip_symbolic_shape=False)


def preprocess(proto):
    """``proto`` after onnxruntime's pre-processing for quantisation (shape inference, fusions): the graph
    :func:`quantize` quantises, whose node names ``nodes_to_exclude`` refers to."""
    onnx, ort_quant = require(FORMAT, "onnx", "onnxruntime.quantization")
    with tempfile.TemporaryDirectory(prefix="kdc-int8-") as tmp:
        fp32, pre = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx"
        onnx.save_model(proto, str(fp32))
        try:
            with quiet():
                _pre_process(ort_quant, fp32, pre)
        except Exception as exc:
            raise ModelError(
                f"onnxruntime could not prepare the model for int8 ({type(exc).__name__}: {describe(exc, 300)})"
            ) from None
        return onnx.load_model(str(pre))


def quantisable_nodes(proto) -> list[str]:
    """Names of the nodes of an fp32 graph that :func:`quantize` (``ops=None``) quantises, in graph order.

    Those are the nodes whose op type onnxruntime has a quantiser for: Conv and Gemm/MatMul (they hold the
    weights), and Relu, MaxPool, Reshape, Flatten, Add, ... between them. Give it the pre-processed graph
    (:func:`preprocess`): that is the one whose names ``nodes_to_exclude`` matches.
    """
    require(FORMAT, "onnxruntime.quantization")
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    ops = set(QDQRegistry) | set(QLinearOpsRegistry)  # what quantize_static takes when op_types_to_quantize is None
    return [n.name for n in proto.graph.node if n.op_type in ops and n.name]


def node_labels(proto) -> dict[str, str]:
    """``{node name: label}`` for people: a node with a weight is named by it (``features.0 Conv``, from the
    initializer ``features.0.weight``), any other by its op type and exporter name (``Relu node_relu_1``)."""
    initialisers = {t.name for t in proto.graph.initializer}
    labels = {}
    for node in proto.graph.node:
        weight = next((i for i in node.input[1:] if i in initialisers), None)
        if weight is not None and node.op_type in WEIGHT_OPS:
            labels[node.name] = f"{weight.removesuffix('.weight')} {node.op_type}"
        else:
            labels[node.name] = f"{node.op_type} {node.name}"
    return labels


def fp32_nodes(quantised, names) -> list[str]:
    """Those of ``names`` that compute in fp32 in the QDQ graph ``quantised``, in the order given.

    A node counts as quantised when onnxruntime removed it (a Relu folded into the quantised output before
    it), when one of its inputs after the first (a weight or bias) comes from a DequantizeLinear, or when one
    of its outputs feeds a QuantizeLinear; otherwise it runs on fp32 weights and its output stays fp32.
    """
    made_by = {out: node for node in quantised.graph.node for out in node.output}
    quantised_outputs = {i for node in quantised.graph.node if node.op_type == "QuantizeLinear" for i in node.input}
    nodes = {node.name: node for node in quantised.graph.node}
    kept = []
    for name in names:
        node = nodes.get(name)
        if node is None:
            continue
        dequantised = any(
            made_by.get(i) is not None and made_by[i].op_type == "DequantizeLinear" for i in node.input[1:]
        )
        if not dequantised and not any(out in quantised_outputs for out in node.output):
            kept.append(name)
    return kept


def _int8_weights(quantised, fp32) -> int:
    """How many of the fp32 model's Conv/Gemm/MatMul weights are stored as 8-bit integers in ``quantised``."""
    import onnx

    weights = {n.input[1] for n in fp32.graph.node if n.op_type in WEIGHT_OPS and len(n.input) > 1}
    weights &= {t.name for t in fp32.graph.initializer}
    small = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    # quantize_static names a quantised initializer after the fp32 one, with a suffix
    stored = [t.name for t in quantised.graph.initializer if t.data_type in small]
    return sum(any(name.startswith(w) for name in stored) for w in weights)
