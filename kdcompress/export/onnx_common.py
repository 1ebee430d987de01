"""What the ``onnx`` and ``int8`` formats share: a quiet ONNX export, kdc's metadata, a safe parse and an
onnxruntime session wrapped as an ``nn.Module``.

Both formats are ONNX files. kdc's own facts (format, architecture spec, preprocessing) travel as one
JSON string in the model's ``metadata_props`` under the key ``kdcompress``; nothing in the file is
pickled, and loading one imports no model code at all: onnxruntime runs the graph, so the architecture
spec (even a user's ``package.module:factory``) is only information.

onnx, onnxscript and onnxruntime are an optional extra (``pip install 'kdcompress[onnx]'``) and are
imported only inside the functions here, so ``import kdcompress`` never needs them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import warnings

import torch
from torch import nn

from ..errors import ArtifactError, KdcError, ModelError, describe

__all__ = [
    "META_KEY",
    "INSTALL_HINT",
    "require",
    "export_onnx",
    "example_batch",
    "check_batch",
    "set_meta",
    "parse",
    "external_tensors",
    "OrtModule",
    "compare",
]

META_KEY = "kdcompress"
META_VERSION = 1
INSTALL_HINT = "pip install 'kdcompress[onnx]'"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# how many samples of the calibration batches the exported graph is checked on
CHECK_SAMPLES = 512


def require(fmt: str, *modules: str):
    """Import ``modules`` (e.g. "onnx", "onnxruntime"), or raise a KdcError that says how to install them."""
    import importlib

    loaded = []
    for name in modules:
        try:
            loaded.append(importlib.import_module(name))
        except ImportError as exc:
            raise KdcError(
                f"the '{fmt}' export format needs onnx, onnxscript and onnxruntime, and {name} cannot be imported "
                f"({describe(exc)}); install them with: {INSTALL_HINT}"
            ) from None
    return loaded[0] if len(loaded) == 1 else tuple(loaded)


@contextlib.contextmanager
def quiet():
    """Swallow what the exporter and quantiser print (stdout, stderr, warnings, log records): the CLI stays clean.

    The captured text is kept in the yielded StringIO, so a failure can quote it.
    """
    buffer = io.StringIO()
    loggers = [
        logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript", "root")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            warnings.simplefilter("ignore")
            yield buffer
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def example_batch(source: dict, calibration: list[torch.Tensor]) -> torch.Tensor:
    """A small float batch to trace the model with: calibration rows if any, else zeros of the arch's input shape.

    At least two rows, so that torch.export does not specialise the batch size to 1.
    """
    if calibration:
        x = calibration[0][:8].detach().to("cpu", torch.float32)
    else:
        shape = (source.get("arch") or {}).get("input_shape")
        if not shape:
            raise ModelError(
                "cannot export: no calibration batch and no arch.input_shape to make an example input from"
            )
        x = torch.zeros(2, *(int(d) for d in shape))
    while x.shape[0] < 2:
        x = torch.cat([x, x])
    return x.contiguous()


def check_batch(source: dict, calibration: list[torch.Tensor]) -> torch.Tensor:
    """The inputs an export is checked on: up to CHECK_SAMPLES calibration rows, else seeded random inputs."""
    if calibration:
        rows, total = [], 0
        for batch in calibration:
            rows.append(batch.detach().to("cpu", torch.float32))
            total += batch.shape[0]
            if total >= CHECK_SAMPLES:
                break
        return torch.cat(rows)[:CHECK_SAMPLES].contiguous()
    generator = torch.Generator().manual_seed(0)
    shape = [int(d) for d in source["arch"]["input_shape"]]
    return torch.randn(64, *shape, generator=generator)


def export_onnx(model: nn.Module, example: torch.Tensor, fmt: str = "onnx"):
    """The model as an ``onnx.ModelProto`` (fp32, batch dimension dynamic and named "batch"), exported quietly.

    Uses ``torch.onnx.export(..., dynamo=True)``, which folds BatchNorm into the convolutions; the input is
    named "input" and the output "logits".
    """
    require(fmt, "onnx", "onnxscript")
    batch = torch.export.Dim("batch")
    try:
        with quiet() as said, torch.no_grad():
            program = torch.onnx.export(
                model.eval(),
                (example,),
                dynamo=True,
                verbose=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                external_data=False,
            )
            proto = program.model_proto
        _strip_debug_info(proto)
    except Exception as exc:
        tail = " ".join(said.getvalue().split()[-40:]) if "said" in locals() else ""
        raise ModelError(
            f"torch.onnx.export could not export the {type(model).__name__} model ({type(exc).__name__}: "
            f"{describe(exc, 300)}){'; exporter said: ' + tail if tail else ''}. A model whose forward depends on "
            f"the batch size or uses Python control flow on tensor values cannot be exported with a dynamic batch"
        ) from None
    return proto


def _strip_debug_info(proto) -> None:
    """Drop the exporter's per-node debug metadata (stack traces, module paths, source file names).

    It is about a kilobyte per node: a third of a small int8 file, and it would ship the paths of the
    exporting machine's files to whoever gets the artifact.
    """
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        graph.doc_string = ""
        for entry in (*graph.node, *graph.initializer, *graph.value_info, *graph.input, *graph.output):
            if hasattr(entry, "metadata_props"):
                del entry.metadata_props[:]
            entry.doc_string = ""
        for node in graph.node:  # control-flow nodes (If, Loop) hold subgraphs
            for attr in node.attribute:
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    for function in proto.functions:
        for node in function.node:
            del node.metadata_props[:]
            node.doc_string = ""


def set_meta(proto, fmt: str, source: dict, info: dict) -> None:
    """Store kdc's facts in ``proto.metadata_props`` as one JSON string (replacing any earlier entry)."""
    meta = {
        "format": fmt,
        "format_version": META_VERSION,
        "arch": source.get("arch"),
        "preprocess": source.get("preprocess"),
        "stage": source.get("stage"),
        "info": info,
    }
    text = json.dumps(meta, sort_keys=True)
    kept = [p for p in proto.metadata_props if p.key != META_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, text


def parse(blob: bytes, fmt: str):
    """``(ModelProto, meta dict)`` from an artifact's bytes, or ArtifactError; runs nothing, imports no model code.

    Checks, in order: the bytes parse as an ONNX model (protobuf only: a pickle, random or truncated bytes
    fail here), kdc's metadata entry is present, plain JSON and names ``fmt``, no tensor points at external
    data (a file beside it, which the bytes would not cover), and onnx's checker accepts the graph.
    """
    onnx = require(fmt, "onnx")

    what = f"this {fmt} artifact"
    if not isinstance(blob, (bytes, bytearray)) or not blob:
        raise ArtifactError(f"{what} is empty; export it again (kdc export ... --format {fmt})")
    try:
        proto = onnx.load_model_from_string(bytes(blob))
    except Exception as exc:
        raise ArtifactError(
            f"{what} is not an ONNX model kdc wrote (it does not parse: {describe(exc)}); the file is damaged or "
            f"another file took its place: export it again"
        ) from None
    entries = {p.key: p.value for p in proto.metadata_props}
    if META_KEY not in entries:
        raise ArtifactError(
            f"{what} has no '{META_KEY}' metadata: it is not an ONNX file kdc wrote, or it is truncated; "
            f"export it again"
        )
    try:
        meta = json.loads(entries[META_KEY])
    except (ValueError, RecursionError) as exc:
        raise ArtifactError(
            f"{what}: its '{META_KEY}' metadata is not JSON ({describe(exc)}); export it again"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ArtifactError(f"{what} holds format {got!r}, not {fmt!r}; load it as what it is, or export it again")
    if meta.get("format_version") != META_VERSION:
        raise ArtifactError(
            f"{what} has format version {meta.get('format_version')!r}; this kdc reads version {META_VERSION}: "
            f"export it again with this kdc"
        )
    if not isinstance(meta.get("preprocess"), (dict, type(None))):
        raise ArtifactError(f"{what}: its 'preprocess' metadata is not a mapping; export it again")
    for where, tensor in external_tensors(proto):
        raise ArtifactError(
            f"{what} refers to an external weight file: tensor {tensor.name[:100]!r} ({where}) points at "
            f"{_location(tensor)!r}. kdc never writes external data (it would be read from disk outside the "
            f"checked artifact), so the file was refused; export it again"
        )
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ArtifactError(f"{what} is not a valid ONNX graph ({describe(exc)}); export it again") from None
    return proto, meta


def external_tensors(message):
    """``(where, tensor)`` for every ``TensorProto`` in an ONNX message that points at external data.

    Walks every message-typed field, not a list of known places, so dense and sparse initializers (values and
    indices), node attributes (``t``, ``tensors``, ``sparse_tensor``, ``sparse_tensors``), subgraphs of
    If/Loop/Scan (``g``, ``graphs``) at any depth, functions and training info are all covered, and so is any
    field a later ONNX version adds. A tensor counts when its ``data_location`` says EXTERNAL or it carries
    any ``external_data`` entry (kdc writes neither). ``where`` is the field path (``graph.node[3].attribute[0]
    .sparse_tensor.values``). The walk never touches the tensors' bytes.
    """
    import onnx

    stack = [(message, "")]
    while stack:
        current, path = stack.pop()
        if isinstance(current, onnx.TensorProto) and (
            current.data_location == onnx.TensorProto.EXTERNAL or len(current.external_data)
        ):
            yield path or current.DESCRIPTOR.name, current
        for name, repeated in _message_fields(current.DESCRIPTOR):
            prefix = f"{path}.{name}" if path else name
            if repeated:
                stack.extend((item, f"{prefix}[{i}]") for i, item in reversed(list(enumerate(getattr(current, name)))))
            elif current.HasField(name):
                stack.append((getattr(current, name), prefix))


_FIELDS: dict = {}


def _message_fields(descriptor) -> list[tuple[str, bool]]:
    """``(name, repeated)`` of a protobuf message type's message-typed fields (cached per type)."""
    if descriptor not in _FIELDS:
        _FIELDS[descriptor] = [
            (f.name, f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED)
            for f in descriptor.fields
            if f.message_type is not None
        ]
    return _FIELDS[descriptor]


def _location(tensor) -> str:
    """The ``location`` an external tensor names (at most 100 characters), or "" when it names none."""
    return next((entry.value[:100] for entry in tensor.external_data if entry.key == "location"), "")


class OrtModule(nn.Module):
    """An onnxruntime CPU session as an ``nn.Module``: float tensor (N, ...) in, float32 logits tensor out.

    ``threads`` fixes onnxruntime's intra-op thread count (spinning off, as OpenMP's is in kdc's timing process),
    so latencies are comparable with torch's at the same thread count; :meth:`set_threads` changes it.
    ``meta`` holds kdc's metadata from the file. The module has no parameters: the weights live in the
    session.
    """

    def __init__(self, blob: bytes, meta: dict, threads: int = 1):
        super().__init__()
        self.meta = meta
        self._blob = bytes(blob)
        self.threads = int(threads)
        self._session = _session(self._blob, self.threads)
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        self.eval()

    def set_threads(self, threads: int) -> "OrtModule":
        """Rebuild the session with ``threads`` intra-op threads (onnxruntime fixes them per session)."""
        if int(threads) != self.threads:
            self.threads = int(threads)
            self._session = _session(self._blob, self.threads)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self._session.run([self._output], {self._input: array})[0])

    def extra_repr(self) -> str:
        return f"format={self.meta.get('format')!r}, bytes={len(self._blob)}, threads={self.threads}"


def _session(blob: bytes, threads: int):
    ort = require("onnx", "onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: its warnings would reach the user's terminal
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Constant folding runs the graph's constant parts while the session is made: a 207-byte ConstantOfShape
    # graph took 1.6 GB there, and shape inference cannot see every such shape to refuse it first. kdc's
    # exports are folded when written (measured on cnn onnx and int8: the same outputs, bit for bit, and the
    # same speed without it), so folding here only ever served a crafted file.
    disabled = ["ConstantFolding"]
    # Defence in depth behind parse()'s refusal of external data: onnxruntime given bytes resolves an external
    # sparse tensor's location against the process's cwd (and follows "../"). With this folder set it resolves
    # every external location inside the folder and refuses ones that escape it (onnxruntime 1.32, see
    # test_artifact_trust.py), and the folder is a fresh empty one that only this process can write to.
    # External data is read while the session is made, so the folder can go right after.
    with tempfile.TemporaryDirectory(prefix="kdc-ort-") as empty:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", empty)
        try:
            return ort.InferenceSession(
                blob, sess_options=options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled
            )
        except Exception as exc:
            raise ArtifactError(f"onnxruntime cannot load this artifact ({describe(exc)}); export it again") from None


def compare(model: nn.Module, loaded: nn.Module, inputs: torch.Tensor) -> dict:
    """How closely ``loaded`` reproduces ``model`` on ``inputs`` (plain JSON numbers).

    ``max_abs_diff`` of the logits, ``scale`` (the largest |logit|), ``agreement`` (share of equal argmax)
    and ``clear_mismatches``: samples whose argmax differs although the model's top two logits are further
    apart than twice the largest difference, i.e. a disagreement float rounding cannot explain.
    """
    with torch.no_grad():
        want = model(inputs).float()
        got = loaded(inputs).float()
    if want.shape != got.shape or want.dim() != 2:
        raise ModelError(
            f"the exported model returns shape {tuple(got.shape)} where the model returns {tuple(want.shape)}; "
            f"kdc exports classifiers that return (batch, classes) logits"
        )
    diff = float((want - got).abs().max())
    same = want.argmax(1) == got.argmax(1)
    if want.shape[1] > 1:
        top2 = want.topk(2, dim=1).values
        clear = int((~same & ((top2[:, 0] - top2[:, 1]) > 2 * diff)).sum())
    else:
        clear = 0
    return {
        "samples": int(len(inputs)),
        "max_abs_diff": diff,
        "scale": float(want.abs().max()),
        "agreement": float(same.float().mean()),
        "clear_mismatches": clear,
    }
