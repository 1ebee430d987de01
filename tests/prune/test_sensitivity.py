"""Per-layer sensitivity (issue 21): each group of a small CNN trained one epoch on fashion-mnist-mini, pruned
alone at a grid of ratios.

* Structured: one curve per group of the pruner, as many points as ratios, MACs falling with the ratio, the
  original model untouched, the drop at 90 % well above the drop at 10 % for the first conv; pruning the same
  copy ratio after ratio gives the same model as pruning a fresh copy to the last ratio.
* Unstructured: one curve per weight tensor, non-zeros falling, the model untouched.
* The record round-trips through JSON and refuses damaged data with a message naming the entry.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from kdcompress.data import load_data
from kdcompress.measure import count_macs
from kdcompress.models import SmallCNN
from kdcompress.prune.sensitivity import GroupCurve, Sensitivity, measure_sensitivity
from kdcompress.prune.structured import StructuredPruner
from kdcompress.recipe import DataSection
from kdcompress.stats import accuracy_se

RATIOS = [0.1, 0.5, 0.9]
SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def trained():
    """A CNN (8/16 channels, 32 hidden) trained one epoch on fashion-mnist-mini, and 500 scoring images."""
    torch.manual_seed(0)
    data = load_data(DataSection(dataset="fashion-mnist-mini"), seed=0)
    model = SmallCNN(SHAPE, 10, channels=(8, 16), hidden=32)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for x, y, _ in data.train.batches(128, shuffle=True, generator=torch.Generator().manual_seed(0)):
        optimiser.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimiser.step()
    model.eval()
    return model, data.train.subset(torch.arange(500))


def scorer(split):
    def evaluate(model):
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(x).argmax(1) == y).sum()) for x, y, _ in split.batches(250))
        p = correct / len(split)
        return p, accuracy_se(p, len(split))

    return evaluate


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    for key, tensor in before.items():
        assert after[key].shape == tensor.shape and torch.equal(after[key], tensor), key


def test_structured_curves_have_one_point_per_ratio_and_leave_the_model_alone(trained):
    model, split = trained
    before = snapshot(model)
    calls = []
    result = measure_sensitivity(
        model, SHAPE, scorer(split), RATIOS, method="structured", progress=lambda *a: calls.append(a)
    )
    assert_unchanged(model, before)
    roots = [g["root"] for g in StructuredPruner(copy.deepcopy(model), SHAPE, scope="layer").groups_info()]
    assert sorted(g.name for g in result.groups) == sorted(roots) and len(roots) == 3
    assert [g.name for g in result.groups] == ["features.0", "features.4", "classifier.1"]  # model order
    assert result.baseline_macs == count_macs(model, SHAPE) and result.baseline_accuracy == scorer(split)(model)[0]
    for g in result.groups:
        for values in (g.accuracy, g.se, g.drop, g.macs, g.params):
            assert len(values) == len(RATIOS)
        assert g.macs == sorted(g.macs, reverse=True) and g.macs[-1] < result.baseline_macs, g
        assert g.params[-1] < result.baseline_params
        assert all(
            d == pytest.approx((result.baseline_accuracy - a) * 100) for d, a in zip(g.drop, g.accuracy, strict=True)
        )
    first = result.group("features.0")
    assert first.size == 8
    assert first.drop[-1] > first.drop[0] + 5  # 1 of 8 first-layer channels left: far worse than 7 of 8
    assert all(-100 <= d <= 100 and math.isfinite(d) for g in result.groups for d in g.drop)
    assert len(calls) == 1 + 3 * len(RATIOS) and calls[-1][:2] == (10, 10)


def test_pruning_ratio_after_ratio_equals_pruning_a_fresh_copy_to_the_last_ratio(trained):
    model, split = trained
    result = measure_sensitivity(model, SHAPE, scorer(split), [0.25, 0.75])
    fresh = copy.deepcopy(model)
    StructuredPruner(fresh, SHAPE, scope="layer").prune_ratios({"features.4": 0.75})
    assert scorer(split)(fresh)[0] == result.group("features.4").accuracy[-1]
    assert count_macs(fresh, SHAPE) == result.group("features.4").macs[-1]


def test_unstructured_curves_zero_each_tensor_alone(trained):
    model, split = trained
    before = snapshot(model)
    result = measure_sensitivity(model, SHAPE, scorer(split), RATIOS, method="unstructured", exclude=["classifier.3"])
    assert_unchanged(model, before)
    assert [g.name for g in result.groups] == ["features.0.weight", "features.4.weight", "classifier.1.weight"]
    assert result.unit == "weights" and result.group("features.0.weight").size == 8 * 9
    for g in result.groups:
        assert g.params == sorted(g.params, reverse=True)
        saved = result.baseline_params - g.params[-1]  # the non-zeros zeroed at 90 %
        assert saved == round(0.9 * g.size)
        assert g.macs[-1] < result.baseline_macs  # sparse MACs


def test_bad_ratios_and_methods_are_refused(trained):
    model, split = trained
    for ratios in ([], [0.0, 0.5], [0.5, 1.0], [0.5, 0.3], [0.3, 0.3]):
        with pytest.raises(ValueError, match="ratio"):
            measure_sensitivity(model, SHAPE, scorer(split), ratios)
    with pytest.raises(ValueError, match="method"):
        measure_sensitivity(model, SHAPE, scorer(split), [0.5], method="channels")


def small_record() -> Sensitivity:
    curve = GroupCurve("fc", ["fc"], 8, [0.5, 0.75], [0.8, 0.6], [0.01, 0.02], [2.0, 22.0], [90, 80], [40, 30])
    return Sensitivity(
        method="structured",
        importance="l1",
        ratios=[0.5, 0.75],
        baseline_accuracy=0.82,
        baseline_se=0.01,
        baseline_macs=100,
        baseline_params=50,
        groups=[curve],
        samples=500,
        split="val",
        note="scored on 500 validation images",
        key="abc",
        source_fingerprint="def",
        seconds=1.5,
    )


def test_the_record_round_trips_through_json():
    record = small_record()
    again = Sensitivity.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again == record


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(schema=7), "schema"),
        (lambda d: d.update(method="rm -rf"), "method"),
        (lambda d: d["baseline"].update(accuracy=float("nan")), "baseline.accuracy is not a finite number"),
        (lambda d: d["baseline"].update(accuracy=3.0), "outside"),
        (lambda d: d["groups"][0].update(drop=[1.0]), r"groups\[0\] \(fc\).drop has 1 entries, not 2"),
        (lambda d: d["groups"][0].update(macs=[1, "x"]), "macs is not a whole number"),
        (lambda d: d["groups"][0].update(ratios=[0.5, 0.8]), "other ratios"),
        (lambda d: d.update(groups=[{}] * 20_000), "at most"),
        (lambda d: d["groups"][0].update(name=""), "name"),
        (lambda d: d.update(ratios=[0.5, True]), "ratio"),
    ],
)
def test_damaged_data_is_refused_with_a_message_naming_the_entry(change, message):
    data = small_record().to_dict()
    change(data)
    with pytest.raises(ValueError, match=message):
        Sensitivity.from_dict(data)
