"""Files in a run directory are data (issue 17, rows 2, 5 and 6): an ONNX artifact never makes onnxruntime read a
file beside it, a small file never makes kdc allocate a gigabyte, and a path read from a run directory's file never
leads out of it. The random-input counterpart is test_artifact_fuzz.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rewrite_manifest

from kdcompress.checkpoint import save_checkpoint
from kdcompress.errors import ArtifactError, CheckpointError
from kdcompress.files import confined_path, manifest_path

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from kdcompress.export import load_artifact  # noqa: E402
from kdcompress.export.onnx_common import OrtModule, external_tensors  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# what a secret file beside the artifact holds: ten float32 values no trained model produces
SECRET_VALUES = np.array([31337.25 + i for i in range(10)], dtype=np.float32)
PEAK_LIMIT_BYTES = 10**9  # "under 1 GB" peak resident memory


@pytest.fixture
def run_copy(exported_run, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(exported_run, dest)
    return dest


# --------------------------------------------------------------------------- row 2: ONNX external data


def _external(name: str, dims: list[int], dtype=TensorProto.FLOAT, location: str = "secret.bin") -> TensorProto:
    """A tensor whose bytes are "in" ``location``, a file beside the model (relative: the dangerous kind)."""
    size = int(np.prod(dims)) * (8 if dtype == TensorProto.INT64 else 4)
    tensor = helper.make_tensor(name, dtype, dims, vals=b"\0" * size, raw=True)
    onnx.external_data_helper.set_external_data(tensor, location=location, offset=0, length=size)
    tensor.ClearField("raw_data")
    return tensor


def _sparse_secret(name: str = "leak") -> onnx.SparseTensorProto:
    """A sparse [10] tensor whose ten values are read from secret.bin."""
    indices = helper.make_tensor(f"{name}_indices", TensorProto.INT64, [10], list(range(10)))
    return helper.make_sparse_tensor(_external(name, [10]), indices, [10])


def malicious_onnx(placement: str, meta_from: bytes) -> bytes:
    """An ONNX classifier whose logits are the secret file's values: input -> Flatten -> MatMul(zeros) -> Add(B).

    ``placement`` says where B's external data hides; kdc's metadata is copied from a real artifact, so the file
    passes every check that does not look for external data.
    """
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"]),
        helper.make_node("MatMul", ["flat", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "B"], ["logits"]),
    ]
    initializers = [
        helper.make_tensor("W", TensorProto.FLOAT, [784, 10], np.zeros(7840, np.float32).tobytes(), raw=True)
    ]
    sparse_initializers, functions = [], []
    if placement == "sparse_initializer":
        sparse = _sparse_secret("B")
        sparse_initializers.append(sparse)
    elif placement == "sparse_initializer_indices":
        values = helper.make_tensor("B", TensorProto.FLOAT, [10], SECRET_VALUES.tolist())
        sparse_initializers.append(
            helper.make_sparse_tensor(values, _external("B_indices", [10], TensorProto.INT64), [10])
        )
    elif placement == "constant_sparse_value":
        nodes.insert(0, helper.make_node("Constant", [], ["B"], sparse_value=_sparse_secret()))
    elif placement == "constant_value":
        nodes.insert(0, helper.make_node("Constant", [], ["B"], value=_external("leak", [10])))
    elif placement == "if_subgraph":
        branch = lambda tag: helper.make_graph(  # noqa: E731
            [helper.make_node("Constant", [], [f"B_{tag}"], sparse_value=_sparse_secret(f"leak_{tag}"))],
            tag,
            [],
            [helper.make_tensor_value_info(f"B_{tag}", TensorProto.FLOAT, [10])],
        )
        initializers.append(helper.make_tensor("yes", TensorProto.BOOL, [], [True]))
        nodes.insert(0, helper.make_node("If", ["yes"], ["B"], then_branch=branch("then"), else_branch=branch("else")))
    elif placement == "function":
        body = [helper.make_node("Constant", [], ["out"], sparse_value=_sparse_secret())]
        functions.append(helper.make_function("kdc.test", "Secret", [], ["out"], body, [helper.make_opsetid("", 17)]))
        nodes.insert(0, helper.make_node("Secret", [], ["B"], domain="kdc.test"))
    else:
        raise AssertionError(placement)
    graph = helper.make_graph(
        nodes,
        "leak",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=initializers,
        sparse_initializer=sparse_initializers,
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("kdc.test", 1)] if functions else [])
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8, functions=functions)
    model.metadata_props.extend(onnx.load_model_from_string(meta_from).metadata_props)
    return model.SerializeToString()


PLACEMENTS = [
    "sparse_initializer",
    "constant_sparse_value",
    "if_subgraph",
    "function",
    "constant_value",
    "sparse_initializer_indices",
]


@pytest.fixture
def secret_in_cwd(tmp_path, monkeypatch):
    """A secret file (ten recognisable float32 values) in the working directory, where onnxruntime looked."""
    folder = tmp_path / "cwd"
    folder.mkdir()
    (folder / "secret.bin").write_bytes(SECRET_VALUES.tobytes())
    monkeypatch.chdir(folder)
    return folder / "secret.bin"


def _shows_secret(text: str) -> bool:
    return any(f"{v:.2f}" in text or f"{v:.1f}" in text or f"{v:g}" in text for v in SECRET_VALUES.tolist())


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_an_onnx_artifact_with_external_data_anywhere_is_refused_and_the_secret_is_never_read(
    placement, run_copy, secret_in_cwd, kdc
):
    path = run_copy / "export" / "pruned.onnx"
    path.write_bytes(malicious_onnx(placement, path.read_bytes()))
    rewrite_manifest(path)
    with pytest.raises(ArtifactError, match="external weight file: tensor '(leak|B|leak_then|leak_else|B_indices)'"):
        load_artifact(path)
    result = kdc("report", str(run_copy))
    kdc.assert_clean_exit(result, 0)
    report = json.loads((run_copy / "report.json").read_text())
    row = next(a for a in report["artifacts"] if a["path"] == "export/pruned.onnx")
    assert row["refused"] and "external weight file" in row["refused"]
    assert "pruned.onnx" in kdc.flat(result) and "refused" in result.output
    for text in (result.output, (run_copy / "report.json").read_text(), (run_copy / "report.md").read_text()):
        assert not _shows_secret(text)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_onnxruntime_sessions_cannot_resolve_external_data_against_the_working_directory(
    placement, exported_run, secret_in_cwd
):
    """Defence in depth: even bytes that skipped kdc's check make onnxruntime read nothing beside them."""
    blob = malicious_onnx(placement, (exported_run / "export" / "pruned.onnx").read_bytes())
    with pytest.raises(ArtifactError, match="onnxruntime cannot load this artifact"):
        model = OrtModule(blob, {"format": "onnx"})
        logits = model(torch.zeros(1, 1, 28, 28))  # what the old session returned: the secret's values
        pytest.fail(f"the session loaded, and its logits are {logits.tolist()}")


def test_external_tensors_names_each_place_it_found():
    graph_with_leak = malicious_onnx(
        "if_subgraph", helper.make_model(helper.make_graph([], "g", [], [])).SerializeToString()
    )
    found = [(where, t.name) for where, t in external_tensors(onnx.load_model_from_string(graph_with_leak))]
    assert sorted(found) == [
        ("graph.node[0].attribute[0].g.node[0].attribute[0].sparse_tensor.values", "leak_else"),
        ("graph.node[0].attribute[1].g.node[0].attribute[0].sparse_tensor.values", "leak_then"),
    ]
    clean = onnx.load_model_from_string(helper.make_model(helper.make_graph([], "g", [], [])).SerializeToString())
    assert list(external_tensors(clean)) == []


def test_every_kdc_export_holds_no_external_data(exported_run):
    for name in ("pruned.onnx", "pruned-int8.onnx"):
        proto = onnx.load_model_from_string((exported_run / "export" / name).read_bytes())
        assert list(external_tensors(proto)) == []


# --------------------------------------------------------------------------- row 5: memory bounded on small files

# The child reports VmHWM, the peak resident memory of its own address space: getrusage's ru_maxrss survives
# fork and exec, so a child of the test process (which has trained a run) would report the test process's peak.
CHILD = textwrap.dedent("""
    import json, sys
    from kdcompress.errors import KdcError
    kind, path = sys.argv[1], sys.argv[2]
    try:
        if kind == "artifact":
            from kdcompress.export import load_artifact
            load_artifact(path)
        else:
            from kdcompress.loading import load_model
            load_model(path)
        outcome = "loaded"
    except KdcError as exc:
        outcome = "refused: " + str(exc)
    with open("/proc/self/status") as fh:
        peak_kb = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    print(json.dumps({"outcome": outcome, "peak_bytes": peak_kb * 1024}))
""")


def load_in_child(kind: str, path: Path) -> dict:
    """Load ``path`` (an artifact or a checkpoint) in a fresh Python; its outcome and its peak resident memory."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("peak memory is read from /proc (Linux)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(path)], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _repack(path: Path, change) -> None:
    """Unpack a KDCA artifact, let ``change(tensors, meta)`` edit it, pack it again (valid CRC) with its manifest."""
    from kdcompress.export.container import pack, unpack

    tensors, meta = unpack(path.read_bytes())
    tensors = dict(tensors)
    change(tensors, meta)
    path.write_bytes(pack(tensors, meta, "lzma"))
    rewrite_manifest(path)


def test_a_bitmask_bomb_is_refused_before_it_is_expanded(run_copy):
    """A few-KB sparse artifact whose bitmask declares 134M weights: refused from its layout, under 1 GB peak."""
    path = run_copy / "export" / "pruned-sparse-fp16.kdca"
    count = 2**27

    def bomb(tensors, meta):
        name = next(n for n, entry in meta["layout"].items() if entry[0] == "s")
        meta["layout"][name] = ["s", "float32", [count]]
        tensors[f"{name}|m"] = torch.zeros(count // 8, dtype=torch.uint8)
        tensors[f"{name}|v"] = torch.zeros(0, dtype=torch.float16)

    _repack(path, bomb)
    assert path.stat().st_size < 8_000
    result = load_in_child("artifact", path)
    assert result["outcome"].startswith("refused:") and "layout declares" in result["outcome"], result
    assert result["peak_bytes"] < PEAK_LIMIT_BYTES, result


def test_a_huge_architecture_named_by_a_small_checkpoint_is_refused_before_it_is_built(tmp_path):
    """1.5 KB naming an MLP of 159M weights: refused from its size on the meta device, under 1 GB peak."""
    from kdcompress.models import model_spec

    path = tmp_path / "teacher" / "model.pt"
    save_checkpoint(
        path,
        {
            "stage": "teacher",
            "arch": model_spec("mlp", {"hidden": [200_000]}, 10, (1, 28, 28)),
            "state_dict": {},
            "metrics": {"test_accuracy": 0.9},
            "dataset": "fashion-mnist-mini",
        },
    )
    assert path.stat().st_size < 3_000
    result = load_in_child("checkpoint", path)
    assert result["outcome"].startswith("refused:") and "architecture it names" in result["outcome"], result
    assert result["peak_bytes"] < PEAK_LIMIT_BYTES, result


def test_a_huge_architecture_named_by_a_small_artifact_is_refused_before_it_is_built(run_copy):
    path = run_copy / "export" / "pruned-shared-4bit.kdca"

    def bigger(tensors, meta):
        meta["arch"]["args"] = {"hidden": [200_000]}

    _repack(path, bigger)
    result = load_in_child("artifact", path)
    assert result["outcome"].startswith("refused:") and "architecture it names" in result["outcome"], result
    assert result["peak_bytes"] < PEAK_LIMIT_BYTES, result


@pytest.mark.parametrize("field", ["kdca raw size", "safetensors header length"])
def test_a_huge_length_field_is_refused_without_allocating_it(run_copy, field):
    import struct
    import zlib

    path = run_copy / "export" / "pruned-sparse-fp16.kdca"
    blob = bytearray(path.read_bytes())
    if field == "kdca raw size":
        struct.pack_into("<I", blob, 6, 2**31)  # the largest size the header may declare
    else:  # the safetensors header inside the payload: raw deflate (codec 2) behind a KDCA header, valid CRC
        raw = bytearray(b"\0" * 8) + b'{"__metadata__":{"kdc":"{}"}}' + b"\0" * 16
        struct.pack_into("<Q", raw, 0, 2**63)
        packer = zlib.compressobj(9, zlib.DEFLATED, -15)
        payload = packer.compress(bytes(raw)) + packer.flush()
        blob = bytearray(struct.pack("<4sBBII", b"KDCA", 1, 2, len(raw), zlib.crc32(raw)) + payload)
    path.write_bytes(bytes(blob))
    rewrite_manifest(path)
    result = load_in_child("artifact", path)
    assert result["outcome"].startswith("refused:"), result
    assert result["peak_bytes"] < PEAK_LIMIT_BYTES, result


def constant_bomb_onnx(meta_from: bytes) -> bytes:
    """A 2 KB classifier whose graph holds a ConstantOfShape of 200M floats (800 MB), summed into the logits."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [1], [200_000_000])
    nodes = [
        helper.make_node(
            "ConstantOfShape", ["shape"], ["big"], value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
        ),
        helper.make_node(
            "ConstantOfShape", ["w_shape"], ["W"], value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
        ),
        helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
        helper.make_node("Flatten", ["input"], ["flat"]),
        helper.make_node("MatMul", ["flat", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "total"], ["logits"]),
    ]
    initializers = [shape, helper.make_tensor("w_shape", TensorProto.INT64, [2], [784, 10])]
    graph = helper.make_graph(
        nodes,
        "bomb",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model.metadata_props.extend(onnx.load_model_from_string(meta_from).metadata_props)
    return model.SerializeToString()


def test_loading_a_small_onnx_graph_with_a_huge_constant_stays_under_1_gb(run_copy):
    """onnxruntime's constant folding would make the 800 MB tensor while the session is made; it is off."""
    path = run_copy / "export" / "pruned.onnx"
    path.write_bytes(constant_bomb_onnx(path.read_bytes()))
    rewrite_manifest(path)
    assert path.stat().st_size < 3_000
    result = load_in_child("artifact", path)
    assert result["peak_bytes"] < PEAK_LIMIT_BYTES, result


# --------------------------------------------------------------------------- row 6: paths stay in the run directory


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_an_artifacts_row_that_leads_out_of_the_run_is_refused_by_the_report(how, exported_run, tmp_path, kdc):
    """Another run's valid file, named by this run's artifacts.json, is never shown as this run's."""
    mine, other = tmp_path / "runs" / "mine", tmp_path / "runs" / "other"
    shutil.copytree(exported_run, mine)
    shutil.copytree(exported_run, other)
    target = other / "export" / "pruned-sparse-fp16.kdca"
    if how == "absolute":
        planted = str(target)
    elif how == "dotdot":
        planted = "../other/export/pruned-sparse-fp16.kdca"
    else:
        (mine / "export" / "elsewhere.kdca").symlink_to(target)
        (mine / "export" / "elsewhere.kdca.manifest.json").symlink_to(manifest_path(target))
        planted = "export/elsewhere.kdca"
    table = json.loads((mine / "export" / "artifacts.json").read_text())
    row = next(r for r in table["artifacts"] if r["format"] == "sparse")
    row["path"] = planted
    (mine / "export" / "artifacts.json").write_text(json.dumps(table))
    result = kdc("report", str(mine))
    kdc.assert_clean_exit(result, 0)
    report = json.loads((mine / "report.json").read_text())
    refused = next(a for a in report["artifacts"] if a["path"] == planted)
    assert refused["refused"] and "inside the run directory" in refused["refused"], refused
    assert refused.get("bytes") is None  # nothing of the other run's file was read into this run's report


@pytest.mark.parametrize(
    "rel, ok",
    [
        ("export/a.kdca", True),
        ("a", True),
        ("./export/a", True),
        ("/etc/passwd", False),
        ("../x", False),
        ("export/../../x", False),
        ("", False),
        (None, False),
        (["a"], False),
        ("a\0b", False),
    ],
)
def test_confined_path_keeps_paths_inside_the_run_directory(tmp_path, rel, ok):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if ok:
        assert confined_path(run_dir, rel, "artifacts.json").is_relative_to(run_dir.resolve())
    else:
        with pytest.raises(CheckpointError, match="artifacts.json names .* inside the run directory"):
            confined_path(run_dir, rel, "artifacts.json")


def test_confined_path_follows_links_and_refuses_those_that_leave(tmp_path):
    run_dir, outside = tmp_path / "run", tmp_path / "outside"
    (run_dir / "sub").mkdir(parents=True)
    outside.mkdir()
    (run_dir / "out").symlink_to(outside)
    (run_dir / "in").symlink_to(run_dir / "sub")
    (run_dir / "loop").symlink_to(run_dir / "loop")
    assert confined_path(run_dir, "in/x", "f") == (run_dir / "sub" / "x").resolve()
    for rel in ("out/x", "loop"):
        with pytest.raises(CheckpointError):
            confined_path(run_dir, rel, "f")
    linked = tmp_path / "linked-run"  # a run directory reached through a link is still itself
    linked.symlink_to(run_dir)
    assert confined_path(linked, "in/x", "f") == (run_dir / "sub" / "x").resolve()
