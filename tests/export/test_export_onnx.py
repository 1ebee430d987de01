"""The onnx and int8 export formats as codecs: faithful, dynamic in batch, smaller, and safe to load.

The codecs are pure (bytes in, bytes out, see kdcompress/export/onnx.py and int8.py); the files, manifests
and the `kdc export` command around them are tested elsewhere. These tests need the onnx extra
(``pip install 'kdcompress[onnx]'``) and are skipped without it.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pathlib
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from kdcompress.data import load_data  # noqa: E402
from kdcompress.errors import ArtifactError, KdcError, ModelError  # noqa: E402
from kdcompress.export import int8  # noqa: E402
from kdcompress.export import onnx as onnx_format
from kdcompress.models import SmallCNN, model_spec  # noqa: E402
from kdcompress.recipe import DataSection  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
CODECS = {"onnx": onnx_format, "int8": int8}


@pytest.fixture(scope="module")
def mini():
    return load_data(DataSection(dataset="fashion-mnist-mini"), seed=0)


@pytest.fixture(scope="module")
def trained(mini):
    """A small CNN trained for two epochs on fashion-mnist-mini (about 80 % test accuracy), with its source dict."""
    torch.manual_seed(0)
    args = {"channels": [8, 16], "hidden": 32}
    model = SmallCNN(input_shape=(1, 28, 28), num_classes=10, **args)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(2):
        for x, y, _ in mini.train.batches(64, shuffle=True, generator=generator):
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimiser.step()
    model.eval()
    source = {
        "arch": model_spec("cnn", args, 10, (1, 28, 28)),
        "state_dict": model.state_dict(),
        "preprocess": mini.preprocess,
        "stage": "distilled",
        "metrics": {},
    }
    return model, source


@pytest.fixture(scope="module")
def calibration(mini):
    generator = torch.Generator().manual_seed(1)
    batches = []
    for x, _, _ in mini.train.batches(128, shuffle=True, generator=generator):
        batches.append(x)
        if len(batches) == 4:
            break
    return batches


@pytest.fixture(scope="module")
def encoded(trained, calibration):
    """{format: (bytes, info)} for the trained model, encoded once per module."""
    model, source = trained
    return {name: codec.encode(model, source, {}, calibration) for name, codec in CODECS.items()}


def _test_inputs(mini):
    x = torch.cat([b for b, _, _ in mini.test.batches(500)])
    return x, mini.test.labels


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _state_dict_bytes(model) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


# --------------------------------------------------------------------------- onnx: faithful, dynamic, smaller


def test_onnx_predicts_as_eager_on_the_test_set(trained, encoded, mini):
    model, source = trained
    blob, info = encoded["onnx"]
    loaded, preprocess = onnx_format.decode(blob)
    x, _ = _test_inputs(mini)
    with torch.no_grad():
        want, got = model(x), loaded(x)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.shape == want.shape
    assert float((want.argmax(1) == got.argmax(1)).float().mean()) >= 0.999
    assert float((want - got).abs().max()) < 1e-3
    assert preprocess == source["preprocess"]
    assert info["dtype"] == "fp32" and info["check"]["agreement"] == 1.0


@pytest.mark.parametrize("batch", [1, 7])
def test_onnx_batch_dimension_is_dynamic(trained, encoded, mini, batch):
    """Exported from a batch of 8 calibration rows, the graph still takes 1 or 7 rows."""
    model, _ = trained
    loaded, _ = onnx_format.decode(encoded["onnx"][0])
    x, _ = _test_inputs(mini)
    with torch.no_grad():
        got = loaded(x[:batch])
        assert got.shape == (batch, 10)
        assert torch.allclose(got, model(x[:batch]), atol=1e-4)


def test_onnx_wrapper_is_a_module_for_torch_benchmark(encoded):
    """The lead times artifacts with torch.utils.benchmark through measure.latency: the wrapper must fit it."""
    from kdcompress.measure import latency

    loaded, _ = onnx_format.decode(encoded["onnx"][0], threads=1)
    assert isinstance(loaded, torch.nn.Module) and not loaded.training
    result = latency(loaded, (1, 28, 28), batch=4, min_run_time=0.05)
    assert result["median_ms"] > 0 and not loaded.training
    loaded.set_threads(2)
    assert loaded(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_structured_pruned_model_exports_a_smaller_graph(trained, calibration):
    from kdcompress.prune.structured import StructuredPruner

    model, source = trained
    pruned = copy.deepcopy(model)
    pruner = StructuredPruner(pruned, input_shape=(1, 28, 28))
    pruner.prune_to(0.5)
    pruned.eval()
    pruned_source = dict(source, structure=pruner.history(), state_dict=pruned.state_dict())
    dense_blob, _ = onnx_format.encode(model, source, {}, calibration)
    pruned_blob, _ = onnx_format.encode(pruned, pruned_source, {}, calibration)
    # half the channels of each layer: the middle layers keep about a quarter of their weights
    assert len(pruned_blob) < 0.5 * len(dense_blob)
    loaded, _ = onnx_format.decode(pruned_blob)
    x = calibration[0]
    with torch.no_grad():
        assert torch.equal(loaded(x).argmax(1), pruned(x).argmax(1))


def test_unstructured_zeros_leave_the_onnx_file_dense_sized(trained, encoded, calibration):
    """What the docs say: ONNX stores dense tensors, so 90 % zeros make the onnx file no smaller."""
    model, source = trained
    sparse = copy.deepcopy(model)
    with torch.no_grad():
        for module in sparse.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                w = module.weight
                w.mul_((w.abs() >= w.abs().flatten().kthvalue(int(0.9 * w.numel())).values).float())
    blob, _ = onnx_format.encode(sparse, source, {}, calibration[:1])
    assert len(blob) > 0.95 * len(encoded["onnx"][0])


def test_encode_refuses_an_export_that_does_not_match_eager(trained, calibration, monkeypatch):
    """If onnxruntime computed something else than the model, encode raises instead of writing a wrong file."""
    from kdcompress.export import onnx_common

    class Drifting(onnx_common.OrtModule):
        def forward(self, x):
            out = super().forward(x)
            out[:, 0] += 100.0
            return out

    monkeypatch.setattr(onnx_format, "OrtModule", Drifting)
    model, source = trained
    with pytest.raises(ModelError, match="does not reproduce the model"):
        onnx_format.encode(model, source, {}, calibration)


def test_encode_prints_nothing(trained, calibration, capfd):
    """The exporter and quantiser are chatty; the CLI's terminal must stay clean."""
    import warnings

    model, source = trained
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # a warning would reach the terminal as stderr text
        int8.encode(model, source, {}, calibration[:1])
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert [str(w.message) for w in caught] == []


# --------------------------------------------------------------------------- int8: accurate and smaller


def test_int8_is_close_to_fp32_and_clearly_smaller(trained, encoded, mini):
    model, source = trained
    blob, info = encoded["int8"]
    loaded, preprocess = int8.decode(blob)
    x, y = _test_inputs(mini)
    fp32, quantised = _accuracy(model, x, y), _accuracy(loaded, x, y)
    assert fp32 > 0.7  # the model did learn, so the comparison means something
    assert abs(quantised - fp32) <= 0.01  # 1,000 test images: 0.5 point is five of them
    assert len(blob) * 3 < _state_dict_bytes(model)
    assert len(blob) * 3 < len(encoded["onnx"][0])
    assert info["quantised_weights"] == 4  # two convs, two linear layers
    assert preprocess == source["preprocess"]


def test_int8_stores_integer_weights_for_conv_and_linear(encoded):
    import onnx

    proto = onnx.load_model_from_string(encoded["int8"][0])
    stored = {t.name: t.data_type for t in proto.graph.initializer}
    for layer in ("features.0", "features.4", "classifier.1", "classifier.3"):
        name = f"{layer}.weight_quantized"
        assert stored.get(name) == onnx.TensorProto.INT8, (name, sorted(stored))


def test_int8_needs_calibration(trained):
    model, source = trained
    with pytest.raises(KdcError, match="calibration"):
        int8.encode(model, source, {}, [])


# --------------------------------------------------------------------------- loading: fresh process, safety


@pytest.mark.parametrize("fmt", ["onnx", "int8"])
def test_decode_in_a_fresh_process(fmt, encoded, calibration, tmp_path):
    blob, _ = encoded[fmt]
    path = tmp_path / f"model.{fmt}"
    path.write_bytes(blob)
    x = calibration[0][:5]
    torch.save(x, tmp_path / "x.pt")
    code = textwrap.dedent(
        f"""
        import json, sys, torch
        from kdcompress.export import {fmt if fmt == "int8" else "onnx"} as codec
        model, preprocess = codec.decode(open(sys.argv[1], 'rb').read())
        x = torch.load(sys.argv[2], weights_only=True)
        print(json.dumps({{"logits": model(x).tolist(), "dataset": preprocess["dataset"]}}))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", code, str(path), str(tmp_path / "x.pt")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    here, _ = CODECS[fmt].decode(blob)
    assert torch.allclose(torch.tensor(out["logits"]), here(x), atol=1e-5)
    assert out["dataset"] == "fashion-mnist-mini"


class Payload:
    """Unpickling this runs code: it touches ``marker``."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_the_pickle_payload_really_runs_when_unpickled(tmp_path):
    """The control for the next test: these bytes do create the marker when unpickled."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps({"model": Payload(marker)}))
    assert marker.exists()


@pytest.mark.parametrize("fmt", ["onnx", "int8"])
@pytest.mark.parametrize("kind", ["pickle", "torch.save", "random", "empty", "truncated-early", "truncated-late"])
def test_bad_bytes_are_refused_without_running_anything(fmt, kind, encoded, tmp_path):
    marker = tmp_path / "pwned"
    good = encoded[fmt][0]
    if kind == "pickle":
        blob = pickle.dumps({"format": fmt, "model": Payload(marker)})
    elif kind == "torch.save":
        buffer = io.BytesIO()
        torch.save({"format": fmt, "model": Payload(marker)}, buffer)
        blob = buffer.getvalue()
    elif kind == "random":
        blob = (
            torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
            .numpy()
            .tobytes()
        )
    elif kind == "empty":
        blob = b""
    elif kind == "truncated-early":
        blob = good[: len(good) // 3]
    else:
        blob = good[:-7]  # inside kdc's metadata, the last field written
    with pytest.raises(ArtifactError):
        CODECS[fmt].decode(blob)
    assert not marker.exists()


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9, 0.99])
def test_every_truncation_is_refused(encoded, cut):
    good = encoded["int8"][0]
    with pytest.raises(ArtifactError):
        int8.decode(good[: int(len(good) * cut)])


def test_an_onnx_file_kdc_did_not_write_is_refused(encoded):
    """A valid ONNX model without kdc's metadata is not an artifact: it might be anything."""
    import onnx

    proto = onnx.load_model_from_string(encoded["onnx"][0])
    del proto.metadata_props[:]
    with pytest.raises(ArtifactError, match="metadata"):
        onnx_format.decode(proto.SerializeToString())


def test_the_wrong_format_is_refused(encoded):
    with pytest.raises(ArtifactError, match="'int8', not 'onnx'"):
        onnx_format.decode(encoded["int8"][0])
    with pytest.raises(ArtifactError, match="'onnx', not 'int8'"):
        int8.decode(encoded["onnx"][0])


def test_external_weight_files_are_refused(encoded, tmp_path):
    """A tensor stored 'beside' the model would be read from disk, outside the bytes the manifest checks."""
    import onnx
    from onnx import external_data_helper

    proto = onnx.load_model_from_string(encoded["onnx"][0])
    tensor = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    external_data_helper.set_external_data(tensor, location=str(tmp_path / "secret.bin"))
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    with pytest.raises(ArtifactError, match="external"):
        onnx_format.decode(proto.SerializeToString())


def test_a_user_import_path_arch_is_never_imported(trained, calibration, tmp_path, monkeypatch):
    """An artifact whose arch names a user's factory loads with allow_import=False, importing nothing.

    onnx and int8 artifacts are graphs that onnxruntime runs: the architecture spec in their metadata is only
    information, so unlike a checkpoint (load_model) no code named in the file is ever imported or run, and
    allow_import does not matter. The module named here would touch a marker file if it were imported.
    """
    marker = tmp_path / "imported"
    (tmp_path / "kdc_evil_nets.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\ndef build(**kw):\n    raise RuntimeError\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model, source = trained
    source = dict(source, arch=dict(source["arch"], model="kdc_evil_nets:build"))
    for codec in CODECS.values():
        blob, _ = codec.encode(model, source, {}, calibration[:1])
        loaded, _ = codec.decode(blob, allow_import=False)
        assert loaded(calibration[0][:2]).shape == (2, 10)
        assert loaded.meta["arch"]["model"] == "kdc_evil_nets:build"
    assert "kdc_evil_nets" not in sys.modules
    assert not marker.exists()


# --------------------------------------------------------------------------- the optional extra


def test_missing_onnxruntime_says_how_to_install(trained, calibration, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    model, source = trained
    for codec in CODECS.values():
        with pytest.raises(KdcError, match=r"pip install 'kdcompress\[onnx\]'"):
            codec.encode(model, source, {}, calibration)


def test_importing_kdcompress_and_the_codecs_needs_no_onnx():
    code = (
        "import sys, kdcompress, kdcompress.export.onnx, kdcompress.export.int8; "
        "print(sorted(m for m in ('onnx', 'onnxruntime', 'onnxscript') if m in sys.modules))"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"
