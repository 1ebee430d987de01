"""What a model costs: parameters, non-zeros, sparsity, MACs, latency and bytes on disk.

Example::

    >>> import torch
    >>> from kdcompress.measure import count_params, count_nonzero, count_macs
    >>> net = torch.nn.Linear(4, 2)
    >>> count_params(net), count_macs(net, (4,))
    (10, 8)
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

__all__ = ["count_params", "count_nonzero", "count_macs", "latency_ms"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (every element, zero or not)."""
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    """Number of parameter elements that are not exactly zero."""
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_shape, device: str | torch.device = "cpu") -> int:
    """Dense multiply-accumulates of one forward pass on one sample, Conv and Linear layers only.

    Zeros in a dense weight still cost their MACs on ordinary hardware, so a
    pruned model reports the same MACs as its dense parent.
    """
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Linear):
            total += module.in_features * module.out_features * (output.numel() // output.shape[-1])
        elif isinstance(module, nn.modules.conv._ConvNd):
            per_output = (module.in_channels // module.groups) * int(torch.tensor(module.kernel_size).prod())
            total += per_output * output.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    was_training = model.training
    try:
        model.eval()
        model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


@torch.no_grad()
def latency_ms(model: nn.Module, input_shape, batch: int = 1, repeats: int = 50, warmup: int = 5) -> float:
    """Median wall-clock milliseconds of one CPU forward pass of ``batch`` samples."""
    model = model.eval()
    x = torch.randn(batch, *input_shape)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)
