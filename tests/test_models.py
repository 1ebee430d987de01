"""The built-in CNNs' pooling: MaxPool2x2 gives nn.MaxPool2d's numbers, faster at inference on CPU (issue 18)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdcompress.models import LeNet5, MaxPool2x2, SmallCNN


@pytest.mark.parametrize("shape", [(3, 5, 8, 8), (2, 4, 7, 9), (1, 1, 2, 3), (2, 3, 28, 28)])
def test_inference_pool_gives_the_same_numbers_as_nn_maxpool2d(shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    x[0, 0, 0, :2] = 1.5  # a tie inside a window
    with torch.no_grad():
        fast, plain = MaxPool2x2()(x), nn.MaxPool2d(2)(x)
    assert fast.shape == plain.shape and torch.equal(fast, plain)
    assert fast.is_contiguous()


def test_an_input_too_small_to_pool_gets_nn_maxpool2ds_error():
    with torch.no_grad(), pytest.raises(RuntimeError, match="Output size is too small"):
        MaxPool2x2()(torch.randn(1, 1, 1, 3))


def test_inference_pool_takes_the_fast_path_and_keeps_nan_as_nn_maxpool2d_does(monkeypatch):
    x = torch.randn(2, 3, 6, 6)
    x[1, 2, 3, 4] = float("nan")
    calls = []
    monkeypatch.setattr(nn.MaxPool2d, "forward", lambda self, t: calls.append(1) or F.max_pool2d(t, 2))
    with torch.no_grad():
        fast = MaxPool2x2()(x)
    assert calls == []  # the two maxima, not nn.MaxPool2d's kernel
    plain = F.max_pool2d(x, 2)
    assert torch.isnan(fast[1, 2, 1, 2]) and torch.equal(fast.nan_to_num(), plain.nan_to_num())


def test_training_takes_nn_maxpool2ds_path_so_a_tied_window_gets_the_same_gradient():
    x = torch.zeros(1, 1, 2, 2, requires_grad=True)  # all four tied
    y = torch.zeros(1, 1, 2, 2, requires_grad=True)
    MaxPool2x2()(x).sum().backward()
    nn.MaxPool2d(2)(y).sum().backward()
    assert torch.equal(x.grad, y.grad) and x.grad.sum() == 1  # one element gets it, not a quarter each


@pytest.mark.parametrize("net", [SmallCNN(channels=(8, 16), hidden=32), LeNet5()])
def test_built_in_cnns_give_the_same_outputs_as_with_nn_maxpool2d(net):
    torch.manual_seed(1)
    net.eval()
    plain = type(net)(**({"channels": (8, 16), "hidden": 32} if isinstance(net, SmallCNN) else {})).eval()
    plain.load_state_dict(net.state_dict())
    for module in plain.modules():
        if isinstance(module, nn.Sequential):
            for i, child in enumerate(module):
                if isinstance(child, MaxPool2x2):
                    module[i] = nn.MaxPool2d(2)
    assert not any(isinstance(m, MaxPool2x2) for m in plain.modules())
    assert any(isinstance(m, MaxPool2x2) for m in net.modules())
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(net(x), plain(x))
