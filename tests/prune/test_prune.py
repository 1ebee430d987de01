"""MagnitudePruner: per-step amounts, exact target, scopes, what is prunable, masks that hold, saved masks."""

from __future__ import annotations

import io
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from torch import nn

from kdcompress.models import build_model
from kdcompress.prune import MagnitudePruner, prunable_weights
from kdcompress.recipe import recipe_from_dict
from kdcompress.run import checkpoint_path, run_pipeline


def mlp(seed: int = 0, sizes=(20, 30, 10)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def zeros(model_or_weights) -> int:
    weights = (
        model_or_weights.values() if isinstance(model_or_weights, dict) else prunable_weights(model_or_weights).values()
    )
    return sum(int((w == 0).sum()) for w in weights)


def total(weights: dict) -> int:
    return sum(w.numel() for w in weights.values())


# --------------------------------------------------------------------------- amounts per step


@pytest.mark.parametrize("rate", [0.3, 0.45, 0.7])
def test_each_step_removes_rate_of_what_is_left(rate):
    net = mlp()
    pruner = MagnitudePruner(net, rate=rate, target_sparsity=0.95)
    n = total(pruner.weights)  # 20*30 + 30*10 = 900
    assert n == 900 and zeros(net) == 0

    first = pruner.step()
    expected_first = round(rate * n)
    assert first == expected_first
    assert zeros(net) == expected_first

    left = n - expected_first
    second = pruner.step()
    expected_second = round(rate * left)
    assert second == expected_second
    assert zeros(net) == expected_first + expected_second
    assert pruner.steps_taken == 2


def test_step_removes_the_smallest_magnitudes():
    net = mlp(seed=3)
    before = {k: w.detach().clone() for k, w in prunable_weights(net).items()}
    pruner = MagnitudePruner(net, rate=0.4, target_sparsity=0.9)
    pruner.step()
    pruned = torch.cat([before[k][~pruner.masks[k]].abs() for k in before])
    kept = torch.cat([before[k][pruner.masks[k]].abs() for k in before])
    assert pruned.numel() == round(0.4 * 900)
    assert pruned.max() <= kept.min()
    # the weights themselves: pruned are zero, kept are untouched
    for k, w in pruner.weights.items():
        assert (w[~pruner.masks[k]] == 0).all()
        assert torch.equal(w[pruner.masks[k]], before[k][pruner.masks[k]])


# --------------------------------------------------------------------------- target


def _prune_to_done(pruner, limit=500):
    n = total(pruner.weights)
    if pruner.scope == "global":
        cap = round(pruner.target * n)
    else:  # each layer is capped at its own rounded target
        cap = sum(round(pruner.target * w.numel()) for w in pruner.weights.values())
    for _ in range(limit):
        if pruner.done:
            break
        pruner.step()
        assert n - sum(int(m.sum()) for m in pruner.masks.values()) <= cap  # never past the target
    assert pruner.done
    return n


@settings(max_examples=40, deadline=None)
@given(
    rate=st.floats(0.05, 0.95),
    target=st.floats(0.0, 0.99),
    hidden=st.integers(1, 40),
    scope=st.sampled_from(["global", "layer"]),
)
def test_target_reached_exactly_and_never_exceeded(rate, target, hidden, scope):
    net = mlp(sizes=(12, hidden, 7))
    pruner = MagnitudePruner(net, rate=rate, target_sparsity=target, scope=scope)
    n = _prune_to_done(pruner)
    pruned = zeros(pruner.weights)
    # within one weight of target * n (per layer for layer scope, so up to one per layer)
    slack = 1 if scope == "global" else len(pruner.weights)
    assert abs(pruned - target * n) <= slack
    assert pruned <= target * n + slack
    assert pruner.sparsity() == pytest.approx(pruner.mask_sparsity())
    # further steps change nothing
    assert pruner.step() == 0
    assert zeros(pruner.weights) == pruned


@pytest.mark.parametrize("rate, target", [(0.3, 0.9), (0.5, 0.75), (0.2, 0.5), (0.9, 0.1), (0.05, 0.3)])
def test_target_reached_exactly(rate, target):
    net = mlp()
    pruner = MagnitudePruner(net, rate=rate, target_sparsity=target)
    n = _prune_to_done(pruner)
    assert abs(zeros(net) - target * n) <= 1
    assert pruner.sparsity() == pytest.approx(target, abs=1 / n)


def test_last_step_is_trimmed_to_the_target():
    net = mlp()
    pruner = MagnitudePruner(net, rate=0.5, target_sparsity=0.6)  # 450 then only 90 more, not 225
    assert pruner.step() == 450
    assert pruner.step() == 90
    assert pruner.done
    assert zeros(net) == 540


# --------------------------------------------------------------------------- scope


def _two_layer_uneven():
    net = mlp(seed=1)
    with torch.no_grad():  # every weight of the second layer larger in magnitude than any of the first
        w = net[2].weight
        w.copy_(torch.where(w >= 0, 1.0, -1.0) * (1.0 + w.abs()))
    assert net[2].weight.abs().min() > net[0].weight.abs().max()
    return net


def test_global_scope_ranks_across_layers():
    net = _two_layer_uneven()
    pruner = MagnitudePruner(net, rate=0.5, target_sparsity=0.5, scope="global")
    _prune_to_done(pruner)
    assert zeros(net) == 450
    first = float((net[0].weight == 0).float().mean())
    second = float((net[2].weight == 0).float().mean())
    assert first == pytest.approx(0.75)  # all 450 pruned weights come from the small layer
    assert second == 0.0


@pytest.mark.parametrize("target", [0.5, 0.8, 0.93])
def test_layer_scope_every_layer_at_target(target):
    net = _two_layer_uneven()
    pruner = MagnitudePruner(net, rate=0.3, target_sparsity=target, scope="layer")
    _prune_to_done(pruner)
    for name, w in pruner.weights.items():
        assert abs(int((w == 0).sum()) - target * w.numel()) <= 1, name


# --------------------------------------------------------------------------- what is prunable


def test_biases_and_batchnorm_not_pruned():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, bias=True),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 10),
        nn.BatchNorm1d(10),
    )
    with torch.no_grad():
        for m in (net[1], net[5]):  # make BN parameters non-trivial (and smaller than any conv weight)
            m.weight.uniform_(1e-6, 1e-5)
            m.bias.uniform_(1e-6, 1e-5)
        net[0].bias.uniform_(1e-6, 1e-5)
        net[4].bias.uniform_(1e-6, 1e-5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    pruner = MagnitudePruner(net, rate=0.5, target_sparsity=0.8)
    assert set(pruner.weights) == {"0.weight", "4.weight"}
    _prune_to_done(pruner)
    after = net.state_dict()
    for key in before:
        if key in ("0.weight", "4.weight"):
            assert not torch.equal(before[key], after[key])
        else:
            assert torch.equal(before[key], after[key]), key
    assert abs(zeros(pruner.weights) - 0.8 * total(pruner.weights)) <= 1


def _named_net():
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(10, 20),
            act=nn.ReLU(),
            fc2=nn.Linear(20, 20),
            block=nn.Sequential(OrderedDict(fc3=nn.Linear(20, 20))),
            head=nn.Linear(20, 3),
        )
    )


@pytest.mark.parametrize(
    "include, exclude, expected",
    [
        (["*"], [], {"fc1", "fc2", "block.fc3", "head"}),
        (["fc*"], [], {"fc1", "fc2"}),
        (["*"], ["head"], {"fc1", "fc2", "block.fc3"}),
        (["*"], ["fc2", "block.*"], {"fc1", "head"}),
        (["block.*", "head"], [], {"block.fc3", "head"}),
    ],
)
def test_include_exclude_patterns(include, exclude, expected):
    net = _named_net()
    before = {n: m.weight.detach().clone() for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    pruner = MagnitudePruner(net, rate=0.5, target_sparsity=0.7, include=include, exclude=exclude)
    assert set(pruner.weights) == {f"{n}.weight" for n in expected}
    _prune_to_done(pruner)
    for name, module in net.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        n_zero = int((module.weight == 0).sum())
        if name in expected:
            assert n_zero > 0, name
        else:
            assert n_zero == 0 and torch.equal(module.weight, before[name]), name


# --------------------------------------------------------------------------- masks hold while training


def _train(net, pruner, optimizer, steps=220, apply=True, prune_every=40):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 20, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    for step in range(steps):
        if step % prune_every == 0 and not pruner.done:
            pruner.step()
        loss = nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if apply:
            pruner.apply()


OPTIMISERS = {
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam-wd": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
}


@pytest.mark.parametrize("opt", list(OPTIMISERS))
def test_masks_hold_through_training(opt):
    net = mlp()
    pruner = MagnitudePruner(net, rate=0.5, target_sparsity=0.8)
    _train(net, pruner, OPTIMISERS[opt](net.parameters()), apply=True)
    assert pruner.done
    for name, w in pruner.weights.items():
        assert (w[~pruner.masks[name]] == 0).all(), name
        assert (w[pruner.masks[name]] != 0).all(), name  # and the kept ones still train
    assert zeros(pruner.weights) == 720
    assert pruner.sparsity() == pytest.approx(0.8)


@pytest.mark.parametrize("opt", list(OPTIMISERS))
def test_without_apply_pruned_weights_regrow(opt):
    """The control for the test above: skipping apply() lets pruned weights come back."""
    net = mlp()
    pruner = MagnitudePruner(net, rate=0.5, target_sparsity=0.8)
    _train(net, pruner, OPTIMISERS[opt](net.parameters()), apply=False)
    regrown = sum(int((w[~pruner.masks[n]] != 0).sum()) for n, w in pruner.weights.items())
    assert regrown > 0
    assert pruner.sparsity() < 0.8


# --------------------------------------------------------------------------- masks in the saved checkpoint


def test_pruned_checkpoint_holds_zeros_and_loads_into_plain_architecture(tmp_path, monkeypatch, tiny_recipe_dict):
    monkeypatch.chdir(tmp_path)
    tiny_recipe_dict["run"]["name"] = "prune-save"
    tiny_recipe_dict["teacher"]["args"] = {"hidden": [32]}
    tiny_recipe_dict["teacher"]["epochs"] = 1
    tiny_recipe_dict["student"]["baseline"] = False
    tiny_recipe_dict["distill"]["epochs"] = 1
    recipe = recipe_from_dict(tiny_recipe_dict)
    quiet = Console(file=io.StringIO())
    run_pipeline(recipe, console=quiet, stages=("teacher", "distilled", "pruned"))

    path = tmp_path / "runs" / "prune-save" / "pruned" / "model.pt"
    assert path == tmp_path / checkpoint_path(recipe.run_dir, "pruned")
    ckpt = torch.load(path, weights_only=True)
    state = ckpt["state_dict"]
    assert not any(k.endswith(("weight_orig", "weight_mask")) for k in state), list(state)

    model = build_model(ckpt["arch"])
    model.load_state_dict(state)  # strict: same keys as the plain architecture
    assert set(state) == set(model.state_dict())

    linear_weights = {f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert len(linear_weights) == 2
    n = sum(w.numel() for w in linear_weights.values())
    measured = sum(int((w == 0).sum()) for w in linear_weights.values()) / n
    assert measured == pytest.approx(0.75, abs=0.005)
    # biases stay dense
    assert all(int((m.bias == 0).sum()) == 0 for m in model.modules() if isinstance(m, nn.Linear))
    # the saved model runs
    out = model(torch.zeros(2, *ckpt["arch"]["input_shape"]))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
