"""The sparse and shared export codecs: exact round trips, small files, and refusal of anything not written by kdc.

* sparse fp32 is bit-identical (signed zeros included), sparse fp16 is close;
* shared: every decoded Linear/Conv weight is an entry of its layer's fp16
  codebook and every zero stays zero, for bits 2 to 8; indices pack at
  ``bits`` bits each and unpack to themselves;
* a structured-pruned CNN (smaller shapes, BatchNorm counters) round trips;
* a model from the user's own import path is rebuilt only with allow_import;
* a crafted pickle, a torch.save file, random bytes, truncated or bit-flipped
  blobs and a decompression bomb are refused with ArtifactError, and the
  pickle's payload never runs;
* each format decodes in a fresh process to the same outputs.
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kdcompress
from kdcompress.data import preprocess_info
from kdcompress.errors import ArtifactError, CheckpointError
from kdcompress.export import container, shared, sparse
from kdcompress.models import SmallCNN, build_model, model_spec
from kdcompress.prune import MagnitudePruner, prunable_weights
from kdcompress.prune.structured import StructuredPruner

CODECS = {"sparse": sparse, "shared": shared}


def _pruned(spec: dict, sparsity: float, seed: int = 0) -> tuple[nn.Module, dict]:
    """(eval model, checkpoint-like source) for a built-in model magnitude-pruned to ``sparsity``."""
    torch.manual_seed(seed)
    model = build_model(spec)
    MagnitudePruner(model, rate=0.5, target_sparsity=sparsity).prune_to(sparsity)
    model.eval()
    source = {
        "arch": spec,
        "state_dict": model.state_dict(),
        "stage": "pruned",
        "metrics": {},
        "preprocess": preprocess_info("fashion-mnist", spec["input_shape"]),
    }
    return model, source


@pytest.fixture(scope="module")
def mlp():
    return _pruned(model_spec("mlp", {"hidden": [32]}, 10, (1, 8, 8)), 0.8)


def _x(spec: dict, n: int = 16) -> torch.Tensor:
    return torch.randn(n, *spec["input_shape"], generator=torch.Generator().manual_seed(1))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({4: torch.int32, 2: torch.int16, 8: torch.int64, 1: torch.uint8}[t.element_size()])


# -- sparse


def test_sparse_fp32_round_trip_is_bit_identical(mlp):
    model, source = copy.deepcopy(mlp)
    with torch.no_grad():
        model.net[1].weight[0, 0] = -0.0  # a signed zero must come back signed
        model.net[1].weight[0, 1] = 1e-40  # and a subnormal exactly
    blob, info = sparse.encode(model, source, {"dtype": "fp32", "codec": "lzma"}, [])
    assert info["dtype"] == "fp32" and info["sparse_tensors"] >= 1
    rebuilt, preprocess = sparse.decode(blob)
    assert not rebuilt.training
    assert preprocess == source["preprocess"]
    before, after = model.state_dict(), rebuilt.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype and before[name].shape == after[name].shape, name
        assert torch.equal(_bits(before[name]), _bits(after[name])), name
    x = _x(source["arch"])
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))


@pytest.mark.parametrize("codec", ["lzma", "zlib"])
def test_sparse_fp16_is_close_and_keeps_zeros(mlp, codec):
    model, source = mlp
    blob, info = sparse.encode(model, source, {"dtype": "fp16", "codec": codec}, [])
    fp32_blob, _ = sparse.encode(model, source, {"dtype": "fp32", "codec": codec}, [])
    assert len(blob) < len(fp32_blob)
    rebuilt, _ = sparse.decode(blob)
    for name, t in model.state_dict().items():
        got = rebuilt.state_dict()[name]
        assert got.dtype == t.dtype
        assert torch.equal(got == 0, t == 0), name
        assert torch.allclose(got, t, rtol=1e-3, atol=1e-4), name
    x = _x(source["arch"])
    with torch.no_grad():
        assert torch.allclose(model(x), rebuilt(x), atol=1e-2)


def test_sparse_fp16_refuses_values_fp16_cannot_hold(mlp):
    model, source = mlp
    big = build_model(source["arch"]).eval()
    with torch.no_grad():
        big.net[1].bias[0] = 1e6
    with pytest.raises(ValueError, match="net.1.bias .*dtype fp32"):
        sparse.encode(big, source, {"dtype": "fp16"}, [])
    with pytest.raises(ValueError, match="net.1.bias .*sparse format with dtype fp32"):
        shared.encode(big, source, {"bits": 4}, [])
    assert sparse.decode(sparse.encode(big, source, {"dtype": "fp32"}, [])[0])[0].net[1].bias[0] == 1e6


@pytest.mark.parametrize(
    "codec, options",
    [
        (sparse, {"dtype": "int8"}),
        (sparse, {"bits": 4}),
        (shared, {"bits": 9}),
        (shared, {"bits": 4.0}),
        (shared, {"codec": "gzip"}),
    ],
)
def test_bad_options_are_refused(mlp, codec, options):
    with pytest.raises(ValueError, match="option"):
        codec.encode(*mlp, options, [])


def test_a_90_percent_sparse_mlp_compresses_as_the_issue_measured():
    # the issue's figures for a random 90 % sparse 784-100-10 MLP: dense 320,349 B, bitmask + fp16 + lzma 18,640 B,
    # bitmask + 4-bit k-means + fp16 codebook + lzma 10,360 B; a magnitude-pruned random init is as unstructured
    model, source = _pruned(model_spec("mlp", {"hidden": [100]}, 10, (1, 28, 28)), 0.9)
    dense = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    small, _ = sparse.encode(model, source, {"dtype": "fp16"}, [])
    tiny, _ = shared.encode(model, source, {"bits": 4}, [])
    assert len(small) * 8 <= dense and len(small) <= 18_640
    assert len(tiny) <= 10_360


# -- shared


@pytest.mark.parametrize("bits", shared.BITS)
def test_shared_weights_are_exactly_codebook_entries(mlp, bits):
    model, source = mlp
    blob, info = shared.encode(model, source, {"bits": bits}, [])
    assert info["bits"] == bits and info["clustered_tensors"] == 2
    rebuilt, _ = shared.decode(blob)
    tensors, _ = container.unpack(blob)
    before, after = model.state_dict(), rebuilt.state_dict()
    for name in prunable_weights(model):
        codebook = tensors[f"{name}|c"]
        assert codebook.dtype == torch.float16 and codebook.numel() == 2**bits
        original, decoded = before[name], after[name]
        assert torch.equal(decoded[original == 0], torch.zeros_like(decoded[original == 0])), name
        values = decoded[original != 0]
        assert torch.isin(values, codebook.float()).all(), name
        # each weight went to its nearest centroid: nothing in the codebook is closer
        gap = (original[original != 0].unsqueeze(1) - codebook.float().unsqueeze(0)).abs()
        assert torch.equal((values - original[original != 0]).abs(), gap.min(1).values), name
        assert len(tensors[f"{name}|i"]) == math.ceil(int((original != 0).sum()) * bits / 8)
    for name in ("net.1.bias", "net.3.bias"):
        assert torch.equal(after[name], before[name].half().float())


def test_shared_more_bits_means_smaller_error(mlp):
    model, source = mlp
    x = _x(source["arch"])
    errors = []
    for bits in (2, 4, 8):
        rebuilt, _ = shared.decode(shared.encode(model, source, {"bits": bits}, [])[0])
        with torch.no_grad():
            errors.append((model(x) - rebuilt(x)).abs().max().item())
    assert errors[0] > errors[1] > errors[2]


def test_kmeans_uses_linear_initialisation_and_converges():
    values = torch.cat([torch.full((50,), -1.0), torch.full((50,), 0.25), torch.full((50,), 2.0)])
    codebook, index = shared.kmeans_codebook(values, bits=2)
    # linear init -1, 0, 1, 2: the 0 centroid takes the 0.25s, 1 is empty and stays put
    assert codebook.tolist() == [-1.0, 0.25, 1.0, 2.0]
    assert torch.equal(codebook[index].float(), values)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), data=st.data())
def test_packed_indices_round_trip(bits, data):
    values = data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=200))
    index = torch.tensor(values, dtype=torch.int64)
    packed = shared.pack_indices(index, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(len(values) * bits / 8)
    assert torch.equal(shared.unpack_indices(packed, bits, len(values)), index)


# -- structured, user models


def test_structured_pruned_cnn_round_trips():
    spec = model_spec("cnn", {"channels": [8, 16], "hidden": 24}, 10, (1, 12, 12))
    torch.manual_seed(0)
    model = build_model(spec)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 1, 12, 12))  # BatchNorm statistics and counters that are not the defaults
    pruner = StructuredPruner(model, spec["input_shape"], scope="layer")
    pruner.prune_to(0.5)
    MagnitudePruner(model, rate=0.5, target_sparsity=0.6).prune_to(0.6)
    model.eval()
    source = {"arch": spec, "structure": pruner.history(), "state_dict": model.state_dict(), "preprocess": None}
    assert isinstance(model, SmallCNN) and model.features[0].out_channels == 4
    x = _x(spec)
    blob, _ = sparse.encode(model, source, {"dtype": "fp32"}, [])
    rebuilt, preprocess = sparse.decode(blob)
    assert rebuilt.features[0].out_channels == 4 and preprocess == {}
    for name, t in model.state_dict().items():
        assert torch.equal(t, rebuilt.state_dict()[name]), name
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    blob, _ = shared.encode(model, source, {"bits": 6}, [])
    rebuilt, _ = shared.decode(blob)
    assert rebuilt.features[0].out_channels == 4
    assert torch.equal(
        rebuilt.state_dict()["features.1.num_batches_tracked"], model.state_dict()["features.1.num_batches_tracked"]
    )
    with torch.no_grad():
        assert torch.allclose(model(x), rebuilt(x), atol=0.1)


USER_MODULE = """
from pathlib import Path
from torch import nn
Path({marker!r}).touch()  # shows whether this module was ever imported

def build(num_classes, input_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0] * input_shape[1] * input_shape[2], num_classes))
"""


@pytest.mark.parametrize("fmt", CODECS)
def test_user_import_path_needs_allow_import(tmp_path, monkeypatch, fmt):
    name = f"kdc_user_net_{fmt}"
    marker = tmp_path / "imported"
    (tmp_path / f"{name}.py").write_text(USER_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = model_spec(f"{name}:build", {}, 3, (1, 2, 2))
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()  # the same network, built without importing
    blob, _ = CODECS[fmt].encode(model, {"arch": spec, "state_dict": model.state_dict()}, {}, [])
    with pytest.raises(ArtifactError, match="allow_import=True"):
        CODECS[fmt].decode(blob)
    assert not marker.exists() and name not in sys.modules
    rebuilt, _ = CODECS[fmt].decode(blob, allow_import=True)
    assert marker.exists()
    assert torch.allclose(rebuilt[1].weight, model[1].weight, atol=0.05)


# -- refusals


class _Payload:
    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))  # unpickling creates the file


def test_the_pickle_payload_is_live(tmp_path):
    # the payload the next test feeds the codecs does run when unpickled: its absence there means it was not
    target = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(target))).close()
    assert target.exists()


@pytest.mark.parametrize("fmt", CODECS)
@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_crafted_pickle_is_refused_without_running(tmp_path, fmt, how):
    target = tmp_path / "ran"
    if how == "pickle":
        blob = pickle.dumps({"state_dict": _Payload(target)})
    else:
        path = tmp_path / "model.pt"
        torch.save({"state_dict": _Payload(target)}, path)
        blob = path.read_bytes()
    with pytest.raises(ArtifactError, match="never unpickles") as caught:
        CODECS[fmt].decode(blob)
    assert isinstance(caught.value, CheckpointError)
    assert not target.exists()


def _damaged(blob: bytes) -> dict[str, bytes]:
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x10
    return {
        "empty": b"",
        "random bytes": os.urandom(2000),
        "header only": blob[:14],
        "truncated": blob[: len(blob) * 3 // 4],
        "one byte short": blob[:-1],
        "trailing bytes": blob + b"\0",
        "bit flipped": bytes(flipped),
        "wrong version": blob[:4] + b"\x09" + blob[5:],
        "unknown codec": blob[:5] + b"\x07" + blob[6:],
        "wrong magic": b"KDCB" + blob[4:],
    }


@pytest.mark.parametrize("fmt", CODECS)
@pytest.mark.parametrize("codec", ["lzma", "zlib"])
def test_damaged_blobs_are_refused(mlp, fmt, codec):
    blob, _ = CODECS[fmt].encode(*mlp, {"codec": codec}, [])
    for what, bad in _damaged(blob).items():
        with pytest.raises(ArtifactError) as caught:
            CODECS[fmt].decode(bad, where="model.kdc")
        message = str(caught.value)
        assert message.startswith("model.kdc") and "\n" not in message, (what, message)


def test_a_blob_of_the_other_format_is_refused(mlp):
    with pytest.raises(ArtifactError, match="'sparse' artifact, not 'shared'"):
        shared.decode(sparse.encode(*mlp, {}, [])[0])


def test_a_decompression_bomb_stops_at_the_declared_size(monkeypatch):
    import zlib

    # 64 MB of zeros in ~64 KB, declared as 1,000 bytes: the reader must stop at 1,001
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = packer.compress(bytes(64 << 20)) + packer.flush()
    blob = container.HEADER.pack(container.MAGIC, container.VERSION, container.CODECS["zlib"], 1000, 0) + bomb
    seen = []
    real = zlib.decompressobj

    class Spy:
        def __init__(self, *args):
            self.inner = real(*args)

        def decompress(self, data, max_length=0):
            out = self.inner.decompress(data, max_length)
            seen.append(len(out))
            return out

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(zlib, "decompressobj", Spy)
    with pytest.raises(ArtifactError, match="truncated or damaged"):
        container.unpack(blob)
    assert seen == [1001]
    huge = container.HEADER.pack(container.MAGIC, container.VERSION, 1, container.MAX_RAW_BYTES + 1, 0) + b"\0" * 10
    with pytest.raises(ArtifactError, match="limit"):
        container.unpack(huge)


def test_damaged_layout_is_refused(mlp):
    model, source = mlp
    tensors = {"net.1.weight|m": torch.zeros(3, dtype=torch.uint8), "net.1.weight|v": torch.zeros(2)}
    meta = {"format": "sparse", "arch": source["arch"], "layout": {"net.1.weight": ["s", "float32", [32, 64]]}}
    with pytest.raises(ArtifactError, match="bitmask does not fit"):
        sparse.decode(container.pack(tensors, meta))
    meta["layout"] = {"net.1.weight": ["s", "complex64", [1]]}
    with pytest.raises(ArtifactError, match="unknown dtype"):
        sparse.decode(container.pack(tensors, meta))
    meta["arch"] = {"model": "mlp", "args": {"hidden": "x"}, "num_classes": 10, "input_shape": [1, 8, 8]}
    meta["layout"] = {}
    with pytest.raises(ArtifactError):
        sparse.decode(container.pack({}, meta))


# -- a fresh process


@pytest.mark.parametrize(
    "fmt, options", [("sparse", {"dtype": "fp32"}), ("sparse", {"dtype": "fp16"}), ("shared", {"bits": 4})]
)
def test_each_format_decodes_in_a_fresh_process(tmp_path, mlp, fmt, options):
    model, source = mlp
    blob, _ = CODECS[fmt].encode(model, source, options, [])
    here, _ = CODECS[fmt].decode(blob)
    x = _x(source["arch"])
    with torch.no_grad():
        expected = here(x)
    (tmp_path / "artifact").write_bytes(blob)
    torch.save(x, tmp_path / "x.pt")
    code = textwrap.dedent(
        f"""
        import sys, torch
        from kdcompress.export import {fmt}
        model, preprocess = {fmt}.decode(open("artifact", "rb").read())
        with torch.no_grad():
            torch.save(model(torch.load("x.pt", weights_only=True)), "out.pt")
        print(preprocess["dataset"])
        """
    )
    root = str(Path(kdcompress.__file__).resolve().parents[1])  # this checkout's kdcompress, not an installed one
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "fashion-mnist"
    assert torch.equal(torch.load(tmp_path / "out.pt", weights_only=True), expected)
    if options.get("dtype") == "fp32":
        with torch.no_grad():
            assert torch.equal(expected, model(x))
