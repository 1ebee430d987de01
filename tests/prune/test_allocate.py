"""Allocating a budget over groups of channels (kdcompress.prune.allocate) and the pruner that follows it.

* budget_target: fractions of the reference, absolute counts, the latency kinds.
* The exact cost (a pruned copy, measured) agrees with the pruned model; the quadratic fitted to it agrees
  with it at shares it was not fitted on.
* uniform lands within 3 % under a MACs budget on SmallCNN; sensitivity, with synthetic curves, prunes the
  insensitive group more and predicts a smaller drop than uniform; an impossible budget is one clear error;
  round_to 8 keeps multiples of 8.
* StructuredPruner(allocation=...) ramps each group towards its own share and lands exactly on it; its
  state replays on a fresh model, and a state made for another allocation is refused.
"""

from __future__ import annotations

import copy

import pytest
import torch

from kdcompress.errors import KdcError
from kdcompress.measure import count_macs, count_params
from kdcompress.models import SmallCNN
from kdcompress.prune.allocate import (
    NEAR,
    allocate_sensitivity,
    allocate_uniform,
    budget_target,
    groups_of,
    interpolate_drop,
    quadratic_cost,
    structure_cost,
)
from kdcompress.prune.structured import StructuredPruner, kept_channels

SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return SmallCNN(input_shape=SHAPE, channels=(16, 32), hidden=64)


@pytest.fixture(scope="module")
def macs(net):
    return structure_cost(net, SHAPE, "macs")


@pytest.fixture(scope="module")
def groups(net):
    return groups_of(net, SHAPE)


@pytest.fixture(scope="module")
def fast(macs, groups):
    """The quadratic fitted to the exact MACs: what the pruned stage searches on (exact for MACs)."""
    return quadratic_cost(macs, groups)


def _pruned(net, shares, round_to=None):
    model = copy.deepcopy(net)
    StructuredPruner(model, SHAPE, scope="layer", round_to=round_to).prune_ratios(shares)
    return model


def test_budget_target_reads_fractions_and_counts():
    assert budget_target("macs", 0.25, 1_000_000) == 250_000
    assert budget_target("params", 1.0, 500) == 500  # at most 1: a fraction
    assert budget_target("bytes", 120_000, 1_000_000) == 120_000  # more than 1: a count
    assert budget_target("latency", 0.5, 8.0) == 4.0  # always a fraction
    assert budget_target("latency_ms", 0.5, 8.0) == 0.5  # always milliseconds
    with pytest.raises(ValueError):
        budget_target("macs", 0.0, 10)


def test_exact_cost_is_what_the_pruned_model_measures_and_the_quadratic_fits_it(net, macs, groups):
    shares = {"features.0": 0.3, "features.4": 0.55, "classifier.1": 0.2}
    assert macs({}) == count_macs(net, SHAPE)
    assert macs(shares) == count_macs(_pruned(net, shares), SHAPE)
    assert macs(shares) < macs({})
    fitted = quadratic_cost(macs, groups)
    params = structure_cost(net, SHAPE, "params")
    fitted_params = quadratic_cost(params, groups)
    for other in ({"features.0": 0.7, "classifier.1": 0.6}, {"features.4": 0.81}, shares):
        assert fitted(other) == pytest.approx(macs(other), rel=1e-9)
        assert fitted_params(other) == pytest.approx(count_params(_pruned(net, other)), rel=1e-9)
    with pytest.raises(ValueError, match="no prunable group"):
        macs({"nope": 0.5})


def test_uniform_meets_a_macs_budget_within_3_percent(net, macs, groups):
    target = budget_target("macs", 0.3, macs({}))
    a = allocate_uniform(groups, macs, target, kind="macs")
    reached = count_macs(_pruned(net, a.shares), SHAPE)
    assert reached == a.predicted
    assert (1 - NEAR) * target <= reached <= target
    assert a.method == "uniform" and a.kind == "macs" and a.reference == count_macs(net, SHAPE)
    spread = [a.shares[g["root"]] for g in groups]
    assert max(spread) - min(spread) < 0.1  # one share for all, but for a channel's granularity
    # the share of channels it removes is what the pruner measures after pruning so
    pruner = StructuredPruner(copy.deepcopy(net), SHAPE, scope="layer")
    pruner.prune_ratios(a.shares)
    assert pruner.sparsity() == pytest.approx(a.sparsity)


CURVES = {  # features.4 loses much accuracy, features.0 and the hidden layer little
    "features.0": [(0.2, 0.1), (0.5, 0.4), (0.8, 1.5)],
    "features.4": [(0.2, 1.0), (0.5, 6.0), (0.8, 20.0)],
    "classifier.1": [(0.2, 0.0), (0.5, 0.2), (0.8, 0.8)],
}


def test_sensitivity_prunes_the_insensitive_group_more(net, fast, groups):
    target = budget_target("macs", 0.4, fast({}))
    a = allocate_sensitivity(groups, fast, target, CURVES, kind="macs")
    assert a.shares["features.0"] > a.shares["features.4"] + 0.15
    reached = count_macs(_pruned(net, a.shares), SHAPE)
    assert reached == pytest.approx(a.predicted)
    assert (1 - NEAR) * target <= reached <= target
    uniform = allocate_uniform(groups, fast, target, kind="macs")
    uniform_drop = sum(interpolate_drop(CURVES[r], s) for r, s in uniform.shares.items())
    assert a.predicted_drop < uniform_drop
    assert all(a.kept[g["root"]] >= 1 for g in groups)
    # flip the curves: the other conv goes first
    flipped = {**CURVES, "features.0": CURVES["features.4"], "features.4": CURVES["features.0"]}
    b = allocate_sensitivity(groups, fast, target, flipped, kind="macs")
    assert b.shares["features.4"] > b.shares["features.0"]


def test_interpolation_is_linear_and_extends_the_last_slope():
    curve = [(0.5, 2.0), (0.25, 1.0)]
    assert interpolate_drop(curve, 0.0) == 0.0
    assert interpolate_drop(curve, 0.125) == pytest.approx(0.5)
    assert interpolate_drop(curve, 0.375) == pytest.approx(1.5)
    assert interpolate_drop(curve, 0.75) == pytest.approx(3.0)


@pytest.mark.parametrize("method", ["uniform", "sensitivity"])
def test_an_impossible_budget_is_one_clear_error(net, fast, groups, method):
    target = 1000.0  # a few MACs: not even one channel per layer fits
    with pytest.raises(KdcError) as err:
        if method == "uniform":
            allocate_uniform(groups, fast, target, kind="macs")
        else:
            allocate_sensitivity(groups, fast, target, CURVES, kind="macs")
    text = str(err.value)
    assert "cannot be met" in text and "1,000" in text and "raise the budget" in text


@pytest.mark.parametrize("method", ["uniform", "sensitivity"])
def test_round_to_8_keeps_multiples_of_8(net, groups, method):
    cost = quadratic_cost(structure_cost(net, SHAPE, "macs", round_to=8), groups, round_to=8)
    target = budget_target("macs", 0.35, cost({}))
    if method == "uniform":
        a = allocate_uniform(groups, cost, target, round_to=8)
    else:
        a = allocate_sensitivity(groups, cost, target, CURVES, round_to=8)
    assert a.predicted <= target
    assert count_macs(_pruned(net, a.shares, round_to=8), SHAPE) == pytest.approx(a.predicted)
    model = copy.deepcopy(net)
    pruner = StructuredPruner(model, SHAPE, scope="layer", round_to=8, allocation=a.shares)
    for level in (0.3 * pruner.allocation_sparsity, 0.8 * pruner.allocation_sparsity, pruner.allocation_sparsity):
        pruner.prune_to(level)
        for g in pruner.groups_info():
            assert g["channels"] % 8 == 0, (g, level)
    assert {g["root"]: g["channels"] for g in pruner.groups_info()} == a.kept
    assert any(k < g["initial"] for g in groups for k in [a.kept[g["root"]]])


def test_the_pruner_ramps_each_group_to_its_own_share_and_lands_on_it(net):
    shares = {"features.0": 0.5, "features.4": 0.25, "classifier.1": 0.75}
    model = copy.deepcopy(net)
    pruner = StructuredPruner(model, SHAPE, scope="layer", allocation=shares)
    final = pruner.allocation_sparsity
    pruner.prune_to(final / 2)  # half way: each group half way to its own share
    half = {g["root"]: g["channels"] for g in pruner.groups_info()}
    assert half == {"features.0": 12, "features.4": 28, "classifier.1": 40}
    pruner.prune_to(final)
    assert {g["root"]: g["channels"] for g in pruner.groups_info()} == {
        r: kept_channels(n, shares[r]) for r, n in {"features.0": 16, "features.4": 32, "classifier.1": 64}.items()
    }
    assert pruner.sparsity() == pytest.approx(final)
    x = torch.randn(3, *SHAPE)
    state = pruner.state_dict()
    fresh = copy.deepcopy(net)
    again = StructuredPruner(fresh, SHAPE, scope="layer", allocation=shares)
    again.load_state_dict(state)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))
    other = StructuredPruner(copy.deepcopy(net), SHAPE, scope="layer", allocation={**shares, "features.0": 0.1})
    with pytest.raises(ValueError, match="another allocation|towards the allocation"):
        other.load_state_dict(state)


@pytest.mark.slow
def test_a_bytes_budget_is_met_on_the_exported_onnx_file(net):
    """A bytes budget (the fp32 ONNX file): each measurement is an export, so this takes a minute or two here."""
    pytest.importorskip("onnxruntime")
    from kdcompress.recipe import BudgetSection, PruneSection
    from kdcompress.run.budget import allocate_budget, measure_model

    prune = PruneSection(method="structured", budget=BudgetSection(bytes=0.3))
    a = allocate_budget(net, SHAPE, prune)
    assert a.kind == "bytes" and a.reference == measure_model("bytes", net, SHAPE, prune)
    reached = measure_model("bytes", _pruned(net, a.shares), SHAPE, prune)
    assert reached == a.predicted
    assert (1 - NEAR) * a.target <= reached <= a.target
