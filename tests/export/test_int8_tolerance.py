"""int8 that keeps its accuracy (issue 21, item 4): ``nodes_to_exclude`` leaves nodes in fp32, the tolerance
search excludes the most damaging nodes first and stops when the loss fits, and the export stage records the
search in artifacts.json without ever reading the test split.

Needs the onnx extra (``pip install 'kdcompress[onnx]'``); skipped without it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402

from kdcompress.data import load_data  # noqa: E402
from kdcompress.export import int8  # noqa: E402
from kdcompress.export.int8_tolerance import search  # noqa: E402
from kdcompress.export.onnx_common import export_onnx  # noqa: E402
from kdcompress.models import SmallCNN  # noqa: E402
from kdcompress.recipe import DataSection  # noqa: E402
from kdcompress.report import build_report, report_markdown  # noqa: E402
from kdcompress.run import export as export_mod  # noqa: E402
from kdcompress.run import export_int8  # noqa: E402
from kdcompress.run.export import read_artifacts  # noqa: E402
from kdcompress.run.export_int8 import search_data  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    """A tiny untrained CNN's fp32 export, its pre-processed graph, the graph's weight nodes and calibration."""
    torch.manual_seed(0)
    model = SmallCNN(channels=(4, 8), hidden=16).eval()
    calibration = [torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    proto = export_onnx(model, calibration[0][:8], "int8")
    pre = int8.preprocess(proto)
    weights = {
        n.name: n.input[1] for n in pre.graph.node if n.op_type in int8.WEIGHT_OPS
    }  # conv1, conv2, linear1, linear2 in graph order
    return proto, pre, weights, calibration


def _producers(proto) -> dict:
    return {out: node for node in proto.graph.node for out in node.output}


def _consumers(proto, tensor: str) -> list:
    return [node for node in proto.graph.node if tensor in node.input]


def test_nodes_to_exclude_leave_those_nodes_in_fp32(tiny):
    _, pre, weights, calibration = tiny
    conv2, last = list(weights)[1], list(weights)[-1]
    assert set(int8.quantisable_nodes(pre)) >= set(weights)  # the weight nodes are quantisable
    everything = int8.quantize(pre, calibration, preprocessed=True)
    kept = int8.quantize(pre, calibration, nodes_to_exclude=[conv2, last], preprocessed=True)
    for proto, excluded in ((everything, set()), (kept, {conv2, last})):
        made_by = _producers(proto)
        nodes = {n.name: n for n in proto.graph.node}
        for name in weights:
            node = nodes[name]
            weight_from = made_by.get(node.input[1])
            output_quantised = any(c.op_type == "QuantizeLinear" for c in _consumers(proto, node.output[0]))
            if name in excluded:  # fp32 weight straight from an initializer, fp32 output
                assert weight_from is None and node.input[1] in {t.name for t in proto.graph.initializer}
                assert not output_quantised
            else:
                assert weight_from is not None and weight_from.op_type == "DequantizeLinear"
        assert set(int8.fp32_nodes(proto, list(weights))) == excluded
    stored = {t.name: t.data_type for t in kept.graph.initializer}
    assert stored[weights[conv2]] == stored[weights[last]] == onnx.TensorProto.FLOAT  # stored in fp32
    int8_weights = {
        w
        for w in weights.values()
        if any(n.startswith(w) and "zero_point" not in n and t == 3 for n, t in stored.items())
    }
    assert onnx.TensorProto.INT8 == 3 and int8_weights == set(weights.values()) - {weights[conv2], weights[last]}


def _fake_evaluate(weights: list, penalty: dict, calls: list):
    """An evaluate that reads which weight nodes are quantised in the model it is given: 0.9 minus each quantised
    weight node's penalty (points), whatever the data."""

    def evaluate(blob: bytes) -> float:
        proto = onnx.load_model_from_string(blob)
        fp32 = set(int8.fp32_nodes(proto, weights))
        calls.append(frozenset(fp32))
        return 0.9 - sum(penalty[w] for w in weights if w not in fp32) / 100

    return evaluate


def test_the_search_excludes_the_worst_node_first_and_stops_when_it_fits(tiny):
    proto, _, weights, calibration = tiny
    names = list(weights)
    penalty = dict(zip(names, (0.5, 3.0, 1.0, 0.2)))  # conv2 is the worst, then linear1
    calls = []
    result = search(proto, calibration, _fake_evaluate(names, penalty, calls), tolerance=1.5)
    assert result.nodes == [names[1], names[2]]  # conv2 first: 4.7 -> 1.7 points, then linear1: 0.7 fits
    assert [e.drop for e in result.excluded] == [3.0, 1.0]
    assert result.excluded[0].label == "features.4 Conv" and result.excluded[1].label == "classifier.1 Gemm"
    assert result.fitted
    assert result.fp32_accuracy == pytest.approx(0.9)
    assert result.int8_accuracy_before == pytest.approx(0.9 - 0.047)
    assert result.int8_accuracy == pytest.approx(0.9 - 0.007)
    assert result.evaluations == len(calls)
    # once it fitted it tried nothing more than taking the two back: no model with a third weight node in fp32
    assert all(len(c & set(names)) <= 2 for c in calls[2:])


def test_a_model_within_the_tolerance_is_quantised_whole(tiny):
    proto, _, weights, calibration = tiny
    names = list(weights)
    calls = []
    result = search(proto, calibration, _fake_evaluate(names, dict.fromkeys(names, 0.1), calls), tolerance=0.5)
    assert result.fitted and result.excluded == [] and result.evaluations == 2 == len(calls)


def test_tolerance_zero_terminates_and_says_it_did_not_fit(tiny):
    proto, pre, weights, calibration = tiny
    names = list(weights)
    penalty = dict(zip(names, (0.5, 3.0, 1.0, 0.2)))
    calls = []
    result = search(proto, calibration, _fake_evaluate(names, penalty, calls), tolerance=0.0)
    assert not result.fitted
    # every weight node but the least damaging one, which stays int8 (without one the file would not be int8);
    # the nodes that gave nothing back were quantised again
    assert result.nodes == [names[1], names[2], names[0]]
    assert result.int8_accuracy == pytest.approx(0.9 - 0.002)
    assert result.evaluations <= 2 + 3 * len(int8.quantisable_nodes(pre))


def test_search_data_is_the_validation_split_or_a_seeded_training_sample():
    with_val = load_data(DataSection(dataset="fashion-mnist-mini", val_split=0.1), seed=0)
    split, data, what = search_data(with_val, seed=0)
    assert split == "val" and torch.equal(data.labels, with_val.val.labels) and "validation" in what
    without = load_data(DataSection(dataset="fashion-mnist-mini"), seed=0)
    split, data, what = search_data(without, seed=0, limit=500)
    again = search_data(without, seed=0, limit=500)[1]
    assert split == "train" and len(data) == 500 and "training" in what
    assert torch.equal(data.images, again.images)  # the same sample for the same seed
    assert not torch.equal(data.images, search_data(without, seed=1, limit=500)[1].images)


def _penalised_search(proto, calibration, evaluate, tolerance, progress=None):
    """The real search with the stage's real evaluate, minus 2 points while the first Gemm is quantised: the tiny
    MLP's int8 is about as accurate as its fp32, and this makes the search measure, exclude and re-measure."""

    def scored(blob: bytes) -> float:
        graph = onnx.load_model_from_string(blob)
        first = next(n.name for n in graph.graph.node if n.op_type == "Gemm")
        return evaluate(blob) - (0.0 if int8.fp32_nodes(graph, [first]) else 0.02)

    return search(proto, calibration, scored, tolerance, progress)


@pytest.fixture(scope="module")
def student_run(fresh_run, tiny_recipe_text):
    """The tiny recipe's student stage (MLP [32], 2 epochs on fashion-mnist-mini, 10 % held out) and its int8
    export with a tolerance of 0 points (its search penalised, see :func:`_penalised_search`)."""
    recipe = yaml.safe_load(tiny_recipe_text)
    recipe["data"]["val_split"] = 0.1
    recipe["export"] = {"stage": "student", "formats": ["int8"], "calibration_batches": 2, "int8_tolerance": 0.0}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export_int8, "search", _penalised_search)
        work, _ = fresh_run(yaml.safe_dump(recipe, sort_keys=False), "int8tol", "train-student", "export")
    return work


def _row(run_dir: Path) -> dict:
    (row,) = [r for r in read_artifacts(run_dir) if r["format"] == "int8"]
    return row


def test_the_export_stage_records_the_search(student_run):
    row = _row(student_run / "runs" / "tiny")
    search_row = row["int8_search"]
    assert row["options"] == {"calibration_batches": 2, "int8_tolerance": 0.0}
    assert search_row["tolerance"] == 0.0 and search_row["split"] == "val" and search_row["samples"] == 1000
    for key in ("fp32_accuracy", "int8_accuracy_before", "int8_accuracy"):
        assert 0.0 < search_row[key] <= 1.0
    assert isinstance(search_row["fitted"], bool)
    assert search_row["fitted"] == (search_row["fp32_accuracy"] - search_row["int8_accuracy"] <= 1e-11)
    kept = search_row["kept_fp32"]
    assert kept and kept[0]["op"] == "Gemm" and kept[0]["drop"] >= 2.0  # the penalised Gemm, excluded first
    assert [k["label"] for k in kept] == row["info"]["fp32_nodes"]
    assert all(set(k) == {"node", "label", "op", "drop"} for k in kept)
    assert search_row["evaluations"] > 2 and len(search_row["drops"]) >= 3
    assert row["test_samples"] == 2000  # the file is still scored on the test split afterwards
    report = build_report(student_run / "runs" / "tiny")
    (note,) = [line for line in report_markdown(report).splitlines() if "kept in fp32" in line]
    assert note.startswith("student-int8.onnx: ") and "tolerance 0 points" in note and "on val (1,000 images)" in note
    assert f"({kept[0]['label']}: {-kept[0]['drop']:+.2f} points when quantised" in note


def test_a_changed_tolerance_exports_again(student_run, kdc, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(student_run, work)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        kept = kdc("export", "recipe.yaml")
        assert kept.exit_code == 0 and "up to date, kept" in kdc.flat(kept)
        changed = kdc("export", "recipe.yaml", "--set", "export.int8_tolerance=100")
        assert changed.exit_code == 0, changed.output
    finally:
        os.chdir(cwd)
    row = _row(work / "runs" / "tiny")
    assert row["options"]["int8_tolerance"] == 100.0 and row["int8_search"]["tolerance"] == 100.0
    assert row["int8_search"]["kept_fp32"] == [] and row["int8_search"]["fitted"] is True


def test_the_search_never_reads_the_test_split(student_run, kdc, tmp_path, monkeypatch):
    """Shuffled test labels change the file's test accuracy and nothing the search chose or measured."""
    work = tmp_path / "poisoned"
    shutil.copytree(student_run, work)
    real = export_mod.load_data

    def poisoned(*args, **kwargs):
        data = real(*args, **kwargs)
        order = torch.randperm(len(data.test), generator=torch.Generator().manual_seed(7))
        data.test.labels = data.test.labels[order]
        return data

    monkeypatch.setattr(export_mod, "load_data", poisoned)
    monkeypatch.setattr(export_int8, "search", _penalised_search)
    monkeypatch.chdir(work)
    result = kdc("export", "recipe.yaml", "--force")
    assert result.exit_code == 0, result.output
    clean, dirty = _row(student_run / "runs" / "tiny"), _row(work / "runs" / "tiny")
    assert dirty["accuracy"] < clean["accuracy"] - 0.3  # the poison reached the test scoring
    for key in ("seconds",):
        clean["int8_search"].pop(key), dirty["int8_search"].pop(key)
    assert json.dumps(dirty["int8_search"], sort_keys=True) == json.dumps(clean["int8_search"], sort_keys=True)
