"""What a model costs: parameters, non-zeros, sparsity, MACs, latency and bytes on disk.

Example::

    >>> import torch
    >>> from kdcompress.measure import count_params, count_nonzero, count_macs
    >>> net = torch.nn.Linear(4, 2)
    >>> count_params(net), count_macs(net, (4,))
    (10, 8)
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["count_params", "count_nonzero", "count_macs", "latency", "latency_ms"]


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
def latency(
    model: nn.Module, input_shape, batch: int = 1, threads: int = 1, min_run_time: float = 0.5
) -> dict:
    """CPU forward-pass time of ``batch`` samples: median and spread, with a fixed thread count.

    Measured with ``torch.utils.benchmark.Timer.blocked_autorange`` (it warms
    up, picks a block size that hides the timer's overhead and runs blocks for
    at least ``min_run_time`` seconds); each block gives one per-call time.
    The thread count is fixed because the same model timed with "all cores"
    on a busy machine differs from run to run by far more than its spread
    (one teacher read 4.59 ms, then 2.97 ms); ``threads`` is recorded.
    Returns ``{"median_ms", "iqr_ms", "p25_ms", "p75_ms", "batch", "threads", "runs"}``
    (``runs``: how many timed blocks the quartiles come from).

    Example::

        >>> latency(torch.nn.Linear(4, 2), (4,), batch=64)["batch"]  # doctest: +SKIP
        64
    """
    from torch.utils.benchmark import Timer

    was_training = model.training
    model.eval()
    x = torch.randn(batch, *input_shape)
    try:
        # no_grad above applies: the Timer runs the statement in this thread
        measured = Timer("model(x)", globals={"model": model, "x": x}, num_threads=threads).blocked_autorange(
            min_run_time=min_run_time
        )
    finally:
        model.train(was_training)
    p25, median, p75 = torch.tensor(measured.times, dtype=torch.float64).quantile(
        torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    ).tolist()
    return {
        "median_ms": median * 1e3,
        "iqr_ms": (p75 - p25) * 1e3,
        "p25_ms": p25 * 1e3,
        "p75_ms": p75 * 1e3,
        "batch": int(batch),
        "threads": int(threads),
        "runs": len(measured.times),
    }


def latency_ms(model: nn.Module, input_shape, batch: int = 1, threads: int = 1, min_run_time: float = 0.5) -> float:
    """Median milliseconds of one CPU forward pass of ``batch`` samples; see :func:`latency` for the spread."""
    return latency(model, input_shape, batch=batch, threads=threads, min_run_time=min_run_time)["median_ms"]
