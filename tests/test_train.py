"""fit's per-batch bookkeeping: losses read back once per window, NaN named at its exact step, same totals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from kdcompress.data import DataSplits, TensorData
from kdcompress.errors import KdcError
from kdcompress.recipe import TrainSettings
from kdcompress.train import CHECK_EVERY, fit, make_optimizer, make_scheduler, step_function


def tiny_splits(n: int = 200) -> DataSplits:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    data = TensorData(images, labels, (0.5,), (0.25,))
    return DataSplits("tiny", data, data, None, 3, (1, 4, 4), "tiny")


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))


SETTINGS = TrainSettings(epochs=2, optimizer="sgd", lr=0.1, momentum=0.9, schedule="constant")
QUIET = Console(stderr=True, quiet=True)
BATCHES = 200 // 8  # 25 batches per epoch at batch 8: windows of 10, 10, 5


@pytest.mark.parametrize("bad_step", [1, CHECK_EVERY, CHECK_EVERY + 1, 2 * CHECK_EVERY + 3, BATCHES])
@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
def test_a_bad_loss_is_named_at_its_step_in_any_window(bad_step, bad_value):
    calls = {"n": 0}

    def loss(logits, y, idx, x):
        calls["n"] += 1
        value = F.cross_entropy(logits, y)
        return value * bad_value if calls["n"] == BATCHES + bad_step else value  # in epoch 2

    with pytest.raises(KdcError, match=rf"the loss became {bad_value} at epoch 2, step {bad_step} of {BATCHES};"):
        fit(model(), loss, tiny_splits(), SETTINGS, batch_size=8, console=QUIET)


def test_windowed_totals_equal_per_batch_totals():
    """The epoch's train loss and accuracy are the sample-weighted means over every batch, last short window included."""
    seen = []

    def loss(logits, y, idx, x):
        value = F.cross_entropy(logits, y)
        seen.append((value.item(), len(y), int((logits.argmax(1) == y).sum())))
        return value

    history = fit(model(), loss, tiny_splits(203), SETTINGS, batch_size=8, console=QUIET)  # 26 batches, last of 3
    per_epoch = len(seen) // 2
    for record, rows in zip(history, (seen[:per_epoch], seen[per_epoch:])):
        n = sum(size for _, size, _ in rows)
        assert n == 203
        assert record["train_loss"] == pytest.approx(sum(v * size for v, size, _ in rows) / n, rel=1e-6)
        assert record["train_accuracy"] == pytest.approx(sum(c for _, _, c in rows) / n, abs=1e-12)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_fused_optimizer_matches_the_plain_one(name):
    """make_optimizer's fused kernel gives the same update as torch's reference implementation."""
    settings = TrainSettings(epochs=1, optimizer=name, lr=0.01, momentum=0.9, weight_decay=1e-3)
    fused_model, plain_model = model(), model()
    fused = make_optimizer(fused_model, settings)
    if not fused.defaults.get("fused"):
        pytest.skip(f"torch {torch.__version__} has no fused {name} kernel on CPU; make_optimizer fell back")
    plain = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=1e-3, foreach=False),
        "adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-3, foreach=False),
        "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=1e-3, foreach=False),
    }[name](plain_model.parameters())
    assert type(plain) is type(fused)
    x = torch.randn(32, 1, 4, 4)
    y = torch.randint(0, 3, (32,))
    for _ in range(5):
        for m, opt in ((fused_model, fused), (plain_model, plain)):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(fused_model[1].weight, model()[1].weight)  # it did train


def test_the_step_function_updates_bit_for_bit_as_optimizer_step():
    """fit's step call for fused SGD: the same weights, momentum buffers and saved state as ``optimizer.step()``,
    over a schedule that changes the learning rate and a first step that creates the buffers."""
    settings = TrainSettings(epochs=3, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3, schedule="cosine")
    runs = []
    for fast in (False, True):
        m = model()
        opt = make_optimizer(m, settings)
        if not opt.defaults.get("fused"):
            pytest.skip(f"torch {torch.__version__} has no fused SGD on CPU; step_function is optimizer.step")
        scheduler = make_scheduler(opt, settings)
        step = step_function(opt) if fast else opt.step
        g = torch.Generator().manual_seed(1)
        for _ in range(settings.epochs):
            for _ in range(4):
                x, y = torch.randn(16, 1, 4, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
                for p in m.parameters():
                    p.grad = None
                F.cross_entropy(m(x), y).backward()
                step()
            scheduler.step()
        runs.append((m, opt))
    (plain_model, plain), (fast_model, fast) = runs
    for a, b in zip(plain_model.parameters(), fast_model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(plain.state.values(), fast.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert not torch.equal(fast_model[1].weight, model()[1].weight)  # it did train


def test_the_step_function_is_optimizer_step_where_it_has_no_shortcut():
    """Adam, unfused SGD, SGD without momentum: the step call is the optimiser's own."""
    params = list(model().parameters())
    for opt in (
        torch.optim.Adam(params, lr=0.01),
        torch.optim.SGD(params, lr=0.01, momentum=0.9),
        torch.optim.SGD(params, lr=0.01, fused=True),
    ):
        assert step_function(opt) == opt.step


def test_resolve_device_refuses_a_gpu_index_this_machine_lacks(monkeypatch):
    from kdcompress.train import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(KdcError, match=r"run.device: cuda:2 was asked for but this machine has 2 CUDA GPU\(s\)"):
        resolve_device("cuda:2")
