"""The ``onnx`` export format: the model as an fp32 ONNX graph with a dynamic batch dimension, run by onnxruntime.

``encode`` exports with ``torch.onnx.export(..., dynamo=True)`` (BatchNorm folded into the convolutions),
stores kdc's metadata (architecture spec, preprocessing) as JSON in the model's ``metadata_props``, loads
the result into onnxruntime and checks it against the eager model on up to 512 calibration samples
(argmax equal wherever float rounding cannot explain a flip, max |diff| within 1e-3 of the logit scale,
batch 1 runs too); a mismatch is an error, not a file. ``decode`` parses the bytes as protobuf and hands
them to an onnxruntime CPU session: nothing is unpickled and no model code is imported, so a user's own
architecture (``package.module:factory``) needs no ``allow_import``.

A structured-pruned model exports as a smaller graph (its channels are gone). An unstructured-sparse one
does not: ONNX stores dense tensors, so its zeros take as many bytes as any other weight; the ``sparse``
and ``shared`` formats are the ones that shrink it.

Needs the onnx extra: ``pip install 'kdcompress[onnx]'``.

Example::

    >>> blob, info = encode(model, source, {}, calibration)  # doctest: +SKIP
    >>> loaded, preprocess = decode(blob)  # doctest: +SKIP
    >>> loaded(batch).argmax(1)  # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelError
from .onnx_common import OrtModule, check_batch, compare, example_batch, export_onnx, parse, require, set_meta

SUFFIX = ".onnx"  # a plain ONNX model: any onnxruntime loads it

__all__ = ["encode", "decode", "FORMAT", "RTOL"]

FORMAT = "onnx"
RTOL = 1e-3  # largest |logit difference| accepted, relative to the largest |logit| (at least 1)


def encode(model: nn.Module, source: dict, options: dict, calibration: list[torch.Tensor]) -> tuple[bytes, dict]:
    """The model as ONNX bytes, checked in onnxruntime against eager, and the report info.

    ``options`` takes no keys for this format (fp32 always). ``calibration`` batches serve as the example
    input and as the check set; without them a seeded random batch of ``arch.input_shape`` is used.
    Raises ModelError when the export fails or onnxruntime's outputs differ from the model's.
    """
    require(FORMAT, "onnx", "onnxscript", "onnxruntime")
    model = model.eval()
    proto = export_onnx(model, example_batch(source, calibration), FORMAT)
    info = {"dtype": "fp32", "opset": _opset(proto), "dynamic_batch": True, "runtime": "onnxruntime"}
    inputs = check_batch(source, calibration)
    set_meta(proto, FORMAT, source, info)
    blob = proto.SerializeToString()
    loaded = OrtModule(blob, {"format": FORMAT})
    check = compare(model, loaded, inputs)
    limit = RTOL * max(1.0, check["scale"])
    if check["clear_mismatches"] or check["max_abs_diff"] > limit:
        raise ModelError(
            f"the ONNX export does not reproduce the model: on {check['samples']} inputs the largest logit "
            f"difference is {check['max_abs_diff']:.3g} (allowed {limit:.3g}) and {check['clear_mismatches']} "
            f"predictions differ; the model likely uses an operation the exporter translates differently. "
            f"Export another format, or report it with the model's definition"
        )
    single = loaded(inputs[:1])
    if single.shape[0] != 1:
        raise ModelError(f"the ONNX export does not take a batch of 1 (it returned shape {tuple(single.shape)})")
    info["check"] = {k: check[k] for k in ("samples", "max_abs_diff", "agreement")}
    return blob, info


def decode(
    blob: bytes, allow_import: bool = False, threads: int = 1, expected: str | None = None
) -> tuple[nn.Module, dict]:
    """``(onnxruntime module, preprocess dict)`` from ONNX bytes kdc wrote; ArtifactError if they are not that.

    ``allow_import`` and ``expected`` are accepted for the common interface and change nothing: onnxruntime
    runs the graph, so no code named in the file is ever imported or run. ``threads`` fixes onnxruntime's
    intra-op threads.
    """
    _, meta = parse(blob, FORMAT)
    return OrtModule(blob, meta, threads=threads), dict(meta.get("preprocess") or {})


def _opset(proto) -> int:
    return int(next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0))
