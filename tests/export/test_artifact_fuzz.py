"""Property (issue 17): whatever bytes an artifact or a checkpoint holds, kdc loads it or refuses it with its own
error (a KdcError: exit 2 from the CLI), never another exception.

The inputs are random byte strings, and truncations and mutations of real files: each format's artifact and a
stage checkpoint from a tiny trained run exported by `kdc export` (the session's ``exported_run``). The
manifest beside a mutated file is rewritten to match it, as an attacker who edits both would, so the parsers
behind the manifest check are what is tested. Mutations reach each layer: the file's bytes (flips anywhere or in
the header, its length fields), the decompressed payload of a KDCA container (the safetensors header and its
length), and the decoded structures (layout entries, architecture, an ONNX graph's tensors, a checkpoint's
entries). Peak memory on crafted files is measured in test_artifact_trust.py.
"""

from __future__ import annotations

import copy
import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch
from conftest import rewrite_manifest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kdcompress.checkpoint import load_checkpoint, save_checkpoint
from kdcompress.errors import KdcError
from kdcompress.export import load_artifact
from kdcompress.export.container import pack, unpack
from kdcompress.loading import load_model

pytest.importorskip("onnxruntime")
import onnx  # noqa: E402

ARTIFACTS = {
    "sparse": "pruned-sparse-fp16.kdca",
    "shared": "pruned-shared-4bit.kdca",
    "int8": "pruned-int8.onnx",
    "onnx": "pruned.onnx",
}
KDCA = ("sparse", "shared")
HEADER_BYTES = 14  # KDCA header: magic, version, codec, raw size, CRC
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Sandbox(tuple):
    """``(run directory, {format or "checkpoint": original bytes})``, shown short in hypothesis' reports."""

    def __repr__(self) -> str:
        return f"Sandbox({self[0]})"


@pytest.fixture(scope="module")
def sandbox(exported_run, tmp_path_factory):
    """A copy of the exported run that the examples overwrite, and the original bytes of its files."""
    run = tmp_path_factory.mktemp("fuzz") / "run"
    shutil.copytree(exported_run, run)
    originals = {fmt: (run / "export" / name).read_bytes() for fmt, name in ARTIFACTS.items()}
    originals["checkpoint"] = (run / "pruned" / "model.pt").read_bytes()
    return Sandbox((run, originals))


def load_or_refuse(run: Path, fmt: str, blob: bytes) -> str:
    """Write ``blob`` as the run's ``fmt`` artifact (manifest matching) and load it: "loaded" or "refused".

    Any exception but a KdcError fails the property. A loaded model is also run on one input, since a file
    that loads is one a user will call.
    """
    outcome = _load_or_refuse(run, fmt, blob)
    event(outcome)  # --hypothesis-show-statistics tells how many examples got past the parsers
    return outcome


def _load_or_refuse(run: Path, fmt: str, blob: bytes) -> str:
    path = run / "export" / ARTIFACTS[fmt]
    path.write_bytes(blob)
    rewrite_manifest(path)
    try:
        model = load_artifact(path)
    except KdcError:
        return "refused"
    shape = model.preprocess.input_shape
    try:
        with torch.no_grad():
            model(torch.zeros(1, *shape))
    except KdcError:
        return "refused"
    except Exception as exc:  # onnxruntime refusing to run a graph is the runtime's business, not a loading crash
        if fmt in KDCA:
            raise
        assert "onnxruntime" in type(exc).__module__ or "ONNXRuntimeError" in str(exc), exc
    return "loaded"


def flip(blob: bytes, edits: list[tuple[int, int]], limit: int | None = None) -> bytes:
    """``blob`` with each ``(position, mask)`` XOR-ed in (positions taken modulo ``limit`` or the length)."""
    out = bytearray(blob)
    span = min(limit or len(out), len(out))
    for position, mask in edits:
        out[position % span] ^= mask
    return bytes(out)


edits = st.lists(st.tuples(st.integers(0, 2**31), st.integers(1, 255)), min_size=1, max_size=8)


# --------------------------------------------------------------------------- bytes: random, truncated, flipped


@pytest.mark.parametrize("fmt", list(ARTIFACTS))
@FUZZ
@given(data=st.one_of(st.binary(max_size=2048), st.binary(max_size=512).map(lambda b: b"KDCA\x01" + b)))
def test_random_bytes_are_loaded_or_refused(sandbox, fmt, data):
    load_or_refuse(sandbox[0], fmt, data)


@pytest.mark.parametrize("fmt", list(ARTIFACTS))
@FUZZ
@given(fraction=st.floats(0, 1, exclude_max=True))
def test_truncated_artifacts_are_refused(sandbox, fmt, fraction):
    run, originals = sandbox
    blob = originals[fmt]
    assert load_or_refuse(run, fmt, blob[: int(len(blob) * fraction)]) == "refused"


@pytest.mark.parametrize("fmt", list(ARTIFACTS))
@FUZZ
@given(changes=edits, header_only=st.booleans())
def test_flipped_bytes_are_loaded_or_refused(sandbox, fmt, changes, header_only):
    run, originals = sandbox
    limit = (HEADER_BYTES if fmt in KDCA else 64) if header_only else None
    load_or_refuse(run, fmt, flip(originals[fmt], changes, limit))


@pytest.mark.parametrize("fmt", KDCA)
@FUZZ
@given(field=st.sampled_from(["version", "codec", "raw size", "crc"]), value=st.integers(0, 2**32 - 1))
def test_edited_kdca_header_fields_are_loaded_or_refused(sandbox, fmt, field, value):
    run, originals = sandbox
    blob = bytearray(originals[fmt])
    offset, kind = {"version": (4, "<B"), "codec": (5, "<B"), "raw size": (6, "<I"), "crc": (10, "<I")}[field]
    struct.pack_into(kind, blob, offset, value % (256 if kind == "<B" else 2**32))
    load_or_refuse(run, fmt, bytes(blob))


def _repack_raw(raw: bytes) -> bytes:
    """``raw`` (a safetensors file) behind a valid KDCA header, deflated: the bytes reach safetensors' parser."""
    packer = zlib.compressobj(6, zlib.DEFLATED, -15)
    return struct.pack("<4sBBII", b"KDCA", 1, 2, len(raw), zlib.crc32(raw)) + packer.compress(raw) + packer.flush()


def _raw_of(blob: bytes) -> bytes:
    import lzma

    raw_size = struct.unpack_from("<I", blob, 6)[0]
    filters = [{"id": lzma.FILTER_LZMA2, "dict_size": min(max(raw_size, 4096), 1 << 26)}]
    return lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=filters).decompress(blob[HEADER_BYTES:])


@pytest.mark.parametrize("fmt", KDCA)
@FUZZ
@given(changes=edits, in_header=st.booleans(), length=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_mutated_safetensors_payloads_are_loaded_or_refused(sandbox, fmt, changes, in_header, length):
    """Flips in the decompressed payload (its JSON header, or anywhere) and edits of its header length field."""
    run, originals = sandbox
    raw = bytearray(_raw_of(originals[fmt]))
    header_end = 8 + struct.unpack_from("<Q", raw)[0]
    raw = bytearray(flip(bytes(raw), changes, header_end if in_header else None))
    if length is not None:
        struct.pack_into("<Q", raw, 0, length)
    load_or_refuse(run, fmt, _repack_raw(bytes(raw)))


# --------------------------------------------------------------------------- structures: layout, arch, graph, checkpoint

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
dims = st.lists(st.one_of(st.integers(0, 40), st.integers(0, 2**62)), max_size=4)
layout_entries = st.one_of(
    json_values,
    st.tuples(
        st.sampled_from(["d", "s", "k", "x"]),
        st.sampled_from(["float32", "float16", "float64", "int64", "bool", "complex"]),
        dims,
    ).map(list),
)


@pytest.mark.parametrize("fmt", KDCA)
@FUZZ
@given(data=st.data())
def test_mutated_kdca_layouts_and_metadata_are_loaded_or_refused(sandbox, fmt, data):
    """The container stays valid; its meta (layout entries, arch, options, preprocess) or tensors are changed."""
    run, originals = sandbox
    tensors, meta = unpack(originals[fmt])
    tensors, meta = dict(tensors), copy.deepcopy(meta)
    target = data.draw(st.sampled_from(["layout", "arch", "meta", "tensor"]), label="target")
    if target == "layout":
        name = data.draw(st.sampled_from(sorted(meta["layout"]) + ["new"]), label="entry")
        meta["layout"][name] = data.draw(layout_entries, label="layout entry")
    elif target == "arch":
        key = data.draw(st.sampled_from(["model", "args", "num_classes", "input_shape", "extra"]), label="arch key")
        meta["arch"][key] = data.draw(st.one_of(json_values, st.just({"hidden": [7]}), st.just("cnn")), label="value")
    elif target == "meta":
        key = data.draw(
            st.sampled_from(["format", "options", "preprocess", "structure", "layout", "arch"]), label="key"
        )
        meta[key] = data.draw(json_values, label="value")
    else:
        name = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
        shape = data.draw(st.lists(st.integers(0, 9), max_size=3), label="shape")
        dtype = data.draw(st.sampled_from([torch.uint8, torch.float16, torch.float32, torch.int64]), label="dtype")
        if data.draw(st.booleans(), label="drop"):
            del tensors[name]
        else:
            tensors[name] = torch.ones(shape, dtype=dtype)
    try:
        blob = pack(tensors, meta, "zlib")
    except (ValueError, TypeError):  # meta that is not plain JSON cannot be written at all
        return
    load_or_refuse(run, fmt, blob)


@pytest.mark.parametrize("fmt", ["int8", "onnx"])
@FUZZ
@given(data=st.data())
def test_mutated_onnx_graphs_are_loaded_or_refused(sandbox, fmt, data):
    """A valid protobuf whose initializers' dims, types or data, or kdc's metadata entry, are changed."""
    run, originals = sandbox
    proto = onnx.load_model_from_string(originals[fmt])
    target = data.draw(st.sampled_from(["dims", "data_type", "raw_data", "metadata", "node"]), label="target")
    if target in ("dims", "data_type", "raw_data"):
        tensor = proto.graph.initializer[data.draw(st.integers(0, len(proto.graph.initializer) - 1), label="index")]
        if target == "dims":
            tensor.dims[:] = data.draw(st.lists(st.integers(-3, 2**40), max_size=4), label="dims")
        elif target == "data_type":
            tensor.data_type = data.draw(st.integers(0, 30), label="data type")
        else:
            tensor.raw_data = tensor.raw_data[: data.draw(st.integers(0, len(tensor.raw_data)), label="cut")]
    elif target == "metadata":
        entry = next(p for p in proto.metadata_props if p.key == "kdcompress")
        meta = json.loads(entry.value)
        key = data.draw(st.sampled_from(sorted(meta) + ["new"]), label="key")
        meta[key] = data.draw(json_values, label="value")
        entry.value = json.dumps(meta)
    else:
        node = proto.graph.node[data.draw(st.integers(0, len(proto.graph.node) - 1), label="node")]
        node.op_type = data.draw(st.sampled_from(["Relu", "Identity", "Nonexistent", "Conv", "If", ""]), label="op")
    load_or_refuse(run, fmt, proto.SerializeToString())


def load_checkpoint_or_refuse(run: Path, blob: bytes) -> str:
    path = run / "pruned" / "model.pt"
    path.write_bytes(blob)
    rewrite_manifest(path)
    try:
        model, preprocess = load_model(path)
    except KdcError:
        event("refused")
        return "refused"
    with torch.no_grad():
        model(torch.zeros(1, *preprocess.input_shape))
    event("loaded")
    return "loaded"


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=1024),
        st.tuples(st.floats(0, 1, exclude_max=True), st.none()),
        st.tuples(st.none(), edits),
    )
)
def test_random_truncated_and_flipped_checkpoints_are_loaded_or_refused(sandbox, data):
    run, originals = sandbox
    if isinstance(data, bytes):
        blob = data
    elif data[0] is not None:
        blob = originals["checkpoint"][: int(len(originals["checkpoint"]) * data[0])]
    else:
        blob = flip(originals["checkpoint"], data[1])
    load_checkpoint_or_refuse(run, blob)


@FUZZ
@given(data=st.data())
def test_checkpoints_with_mutated_entries_are_loaded_or_refused(sandbox, data, tmp_path_factory):
    """A checkpoint kdc could have written (plain data, valid manifest) whose entries hold something else."""
    run, originals = sandbox
    source = run / "pruned" / "model.pt"
    source.write_bytes(originals["checkpoint"])
    rewrite_manifest(source)
    ckpt = load_checkpoint(source)
    payload = {k: v for k, v in ckpt.items() if k not in ("format", "format_version", "kdc_version")}
    section = data.draw(st.sampled_from(["arch", "top", "state_dict", "preprocess"]), label="section")
    if section == "arch":
        key = data.draw(st.sampled_from(["model", "args", "num_classes", "input_shape"]), label="arch key")
        payload["arch"] = {**payload["arch"], key: data.draw(json_values, label="value")}
    elif section == "top":
        key = data.draw(
            st.sampled_from(["arch", "state_dict", "structure", "preprocess", "dataset", "metrics"]), label="key"
        )
        payload[key] = data.draw(json_values, label="value")
    elif section == "state_dict":
        name = data.draw(st.sampled_from(sorted(payload["state_dict"])), label="tensor")
        shape = data.draw(st.lists(st.integers(0, 9), max_size=3), label="shape")
        payload["state_dict"] = {**payload["state_dict"], name: torch.ones(shape)}
    else:
        key = data.draw(st.sampled_from(sorted(payload.get("preprocess") or {}) + ["new"]), label="key")
        payload["preprocess"] = {**(payload.get("preprocess") or {}), key: data.draw(json_values, label="value")}
    save_checkpoint(source, payload)
    load_checkpoint_or_refuse(run, source.read_bytes())


# --------------------------------------------------------------------------- kdc report on the mutated run


@pytest.mark.slow
@settings(FUZZ, max_examples=40)
@given(
    target=st.sampled_from(list(ARTIFACTS) + ["checkpoint"]),
    how=st.sampled_from(["truncate", "flip"]),
    fraction=st.floats(0, 1, exclude_max=True),
    changes=edits,
)
def test_kdc_report_on_a_run_with_a_mutated_file_exits_0_or_2(sandbox, kdc, target, how, fraction, changes):
    """The report shows a damaged artifact as refused (exit 0) or stops on a damaged checkpoint (exit 2)."""
    run, originals = sandbox
    for fmt, name in ARTIFACTS.items():  # every other file as it was
        (run / "export" / name).write_bytes(originals[fmt])
        rewrite_manifest(run / "export" / name)
    (run / "pruned" / "model.pt").write_bytes(originals["checkpoint"])
    rewrite_manifest(run / "pruned" / "model.pt")
    blob = originals[target]
    blob = blob[: int(len(blob) * fraction)] if how == "truncate" else flip(blob, changes)
    path = run / "pruned" / "model.pt" if target == "checkpoint" else run / "export" / ARTIFACTS[target]
    path.write_bytes(blob)
    rewrite_manifest(path)
    result = kdc("report", str(run))
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output and "internal error" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
