"""Feature-distillation losses (issue 11, part 2): attention transfer and FitNets hints against float64
hand computations and gradcheck; hooks that find modules by dotted name."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdcompress.errors import ModelError
from kdcompress.features import FeatureTaps, at_loss, attention_map, hint_loss, make_adapter, module_named
from kdcompress.models import build_model, model_spec


def _attention_by_hand(feature: torch.Tensor) -> list[list[float]]:
    """Zagoruyko and Komodakis' spatial attention, element by element: mean over channels of a^2, then L2-normalise."""
    n, c, h, w = feature.shape
    maps = []
    for i in range(n):
        q = [sum(float(feature[i, k, y, x]) ** 2 for k in range(c)) / c for y in range(h) for x in range(w)]
        norm = math.sqrt(sum(v * v for v in q))
        maps.append([v / norm for v in q])
    return maps


def test_attention_map_matches_a_hand_computation():
    torch.manual_seed(0)
    feature = torch.randn(3, 5, 4, 2, dtype=torch.float64)
    got = attention_map(feature)
    want = torch.tensor(_attention_by_hand(feature), dtype=torch.float64)
    assert got.shape == (3, 8)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


def test_at_loss_matches_a_hand_computation_and_ignores_channel_counts():
    torch.manual_seed(1)
    s = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    t = torch.randn(2, 7, 4, 4, dtype=torch.float64)  # the teacher has more channels: AT compares maps only
    qs, qt = _attention_by_hand(s), _attention_by_hand(t)
    want = sum((a - b) ** 2 for rs, rt in zip(qs, qt) for a, b in zip(rs, rt)) / (2 * 16)
    assert float(at_loss(s, t)) == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert float(at_loss(t, t)) == 0.0


def test_at_loss_gradcheck():
    torch.manual_seed(2)
    s = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: at_loss(x, t), (s,))


def test_at_loss_does_not_train_the_teacher():
    s = torch.randn(2, 3, 3, 3, requires_grad=True)
    t = torch.randn(2, 3, 3, 3, requires_grad=True)
    at_loss(s, t).backward()
    assert s.grad is not None and t.grad is None


def test_at_loss_refuses_maps_of_different_sizes():
    with pytest.raises(ValueError, match="same height and width"):
        at_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="same height and width"):
        at_loss(torch.randn(2, 8), torch.randn(2, 8))


def test_hint_loss_matches_a_hand_computation_and_gradchecks():
    torch.manual_seed(3)
    s = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 2, 2, dtype=torch.float64)
    adapter = make_adapter(s, t).double()
    assert isinstance(adapter, nn.Conv2d) and adapter.weight.shape == (5, 3, 1, 1)
    w, sd = adapter.weight.detach()[:, :, 0, 0], s.detach()
    mapped = [
        [
            [[sum(float(w[o, c]) * float(sd[n, c, y, x]) for c in range(3)) for x in range(2)] for y in range(2)]
            for o in range(5)
        ]
        for n in range(2)
    ]
    want = sum(
        (mapped[n][o][y][x] - float(t[n, o, y, x])) ** 2
        for n in range(2)
        for o in range(5)
        for y in range(2)
        for x in range(2)
    ) / (2 * 5 * 2 * 2)
    assert hint_loss(s, t, adapter).item() == pytest.approx(want, rel=1e-12)
    weight = adapter.weight
    assert torch.autograd.gradcheck(
        lambda x, wt: torch.nn.functional.mse_loss(torch.nn.functional.conv2d(x, wt), t), (s, weight)
    )


def test_adapters_bridge_widths_and_refuse_what_cannot_line_up():
    assert isinstance(make_adapter(torch.randn(2, 32), torch.randn(2, 128)), nn.Linear)
    assert isinstance(make_adapter(torch.randn(2, 8, 7, 7), torch.randn(2, 8, 7, 7)), nn.Identity)
    with pytest.raises(ValueError, match="line up"):
        make_adapter(torch.randn(2, 8, 7, 7), torch.randn(2, 16, 14, 14))


def test_a_hint_adapter_learns_the_map_between_widths():
    torch.manual_seed(4)
    s = torch.randn(64, 6)
    true_map = torch.randn(6, 10)
    t = s @ true_map
    adapter = make_adapter(s, t)
    opt = torch.optim.SGD(adapter.parameters(), lr=0.1)
    first = hint_loss(s, t, adapter).item()
    for _ in range(300):
        opt.zero_grad()
        hint_loss(s, t, adapter).backward()
        opt.step()
    assert hint_loss(s, t, adapter).item() < first * 1e-3


def _cnn(channels):
    return build_model(model_spec("cnn", {"channels": channels, "hidden": 32}, 10, (1, 28, 28)))


def test_taps_record_outputs_by_name_and_remove_their_hooks():
    student, teacher = _cnn([8, 16]), _cnn([16, 32])
    x = torch.randn(2, 1, 28, 28)
    with FeatureTaps(student, ["features.3"]) as s_taps, FeatureTaps(teacher, ["features.3"]) as t_taps:
        student(x), teacher(x)
        loss = at_loss(s_taps["features.3"], t_taps["features.3"])
    assert s_taps["features.3"].shape[1] == 8 and t_taps["features.3"].shape[1] == 16
    assert loss.requires_grad
    assert not student.features[3]._forward_hooks and not teacher.features[3]._forward_hooks


def test_an_unknown_module_name_says_what_is_there():
    with pytest.raises(ModelError) as info:
        module_named(_cnn([8, 16]), "feature.3", where="student")
    text = str(info.value)
    assert "student has no module named 'feature.3'" in text and "did you mean 'features.3'" in text
