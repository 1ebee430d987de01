"""What a model costs: parameters, non-zeros, sparsity, MACs, latency and bytes on disk.

Example::

    >>> import torch
    >>> from kdcompress.measure import count_params, count_nonzero, count_macs
    >>> net = torch.nn.Linear(4, 2)
    >>> count_params(net), count_macs(net, (4,))
    (10, 8)
"""

from __future__ import annotations

import contextlib
import logging
import math
import platform
from collections.abc import Hashable, Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "cpu_name",
    "count_params",
    "count_nonzero",
    "count_macs",
    "count_sparse_macs",
    "latency",
    "latencies",
    "latency_ms",
    "interleaved_latencies",
    "paired_ratio",
    "LATENCY_BATCHES",
    "LATENCY_ROUNDS",
]

# batch 1 is what one request costs; batch 64 is throughput, where removed channels show best
LATENCY_BATCHES = (1, 64)
# rounds of interleaved_latencies: enough for quartiles that mean something, few enough that a model whose
# one call is slow (a block of one call) still fits a report's time
LATENCY_ROUNDS = 15


def cpu_name() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def count_params(model: nn.Module) -> int:
    """Number of parameters (every element, zero or not)."""
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    """Number of parameter elements that are not exactly zero."""
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


@contextlib.contextmanager
def _countable(model: nn.Module):
    """Eval mode, no gradients, and the attention paths that torch's flop counter can see.

    On the CPU, ``scaled_dot_product_attention`` runs a fused kernel and
    ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` take a fused "fast path" in eval mode;
    the flop counter has no formula for either and would count them (projections included) as 0.
    The math backend and the slow path compute the same thing with the matmuls it counts.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        math_attention = sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # torch < 2.3
        math_attention = contextlib.nullcontext()
    was_training = model.training
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        model.eval()
        with torch.no_grad(), math_attention:
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
        model.train(was_training)


def _macs(model: nn.Module, input_shape, device, sparse: bool) -> int:
    """Dense MACs of one sample from torch's flop counter; with ``sparse``, less the zero weights' share."""
    from torch.utils.flop_counter import FlopCounterMode

    zero_macs = 0

    def hook(module, inputs, output):
        # a weight element is used once per output position (once per input position for a transposed
        # conv), so each zero in it saves that many MACs
        nonlocal zero_macs
        weight = module.weight
        zeros = weight.numel() - int(torch.count_nonzero(weight))
        if isinstance(module, nn.Linear):
            positions = output.numel() // module.out_features
        elif isinstance(module, nn.modules.conv._ConvTransposeNd):
            positions = inputs[0].numel() // module.in_channels
        else:
            positions = output.numel() // module.out_channels
        zero_macs += zeros * positions

    layers = (nn.Linear, nn.modules.conv._ConvNd)
    handles = [m.register_forward_hook(hook) for m in model.modules() if sparse and isinstance(m, layers)]
    try:
        with _countable(model), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
    # the counter gives FLOPs as 2 per multiply-accumulate for matmul, conv and attention
    return counter.get_total_flops() // 2 - zero_macs


def count_macs(model: nn.Module, input_shape, device: str | torch.device = "cpu") -> int:
    """Dense multiply-accumulates of one forward pass on one sample (``input_shape`` without the batch).

    Counted by torch's operator-level counter (``torch.utils.flop_counter.FlopCounterMode``, MACs =
    FLOPs / 2), so every matmul, linear, convolution and attention is counted, called through a module
    or functionally: torchvision's resnet18 at 3x224x224 gives 1.81 G, vit_b_16 17.6 G, as torchvision
    documents. Element-wise work (activations, normalisation, pooling, additions) is not counted.
    Zeros in a dense weight still cost their MACs on ordinary hardware, so an unstructured-pruned
    model reports the same MACs as its dense parent; see :func:`count_sparse_macs`.

    Example::

        >>> count_macs(torch.nn.Conv2d(3, 8, 3), (3, 10, 10))  # 8 x 8 outputs x 8 channels x 3*3*3
        13824
    """
    return _macs(model, input_shape, device, sparse=False)


def count_sparse_macs(model: nn.Module, input_shape, device: str | torch.device = "cpu") -> int:
    """MACs of one sample counting only the non-zero weights: what sparse kernels could reach at best.

    As :func:`count_macs`, less the MACs of the zero weights of every ``nn.Linear`` and convolution
    called as a module: a Linear with k non-zero weights costs k per output position, a convolution
    with k non-zero weights k per output pixel. Weights used outside their module's own forward (the
    output projection inside ``nn.MultiheadAttention``) are counted dense. Equal to :func:`count_macs`
    for a model without zero weights.

    Example::

        >>> net = torch.nn.Linear(4, 2)
        >>> with torch.no_grad():
        ...     _ = net.weight[0].zero_()
        >>> count_macs(net, (4,)), count_sparse_macs(net, (4,))
        (8, 4)
    """
    return _macs(model, input_shape, device, sparse=True)


def _benchmark_timer():
    """``torch.utils.benchmark.Timer``, imported without its "No CUDA runtime is found" warning.

    The import reaches ``torch.utils.cpp_extension``, which logs that warning on a machine with a CUDA
    toolkit but no GPU: noise on the user's terminal, since the timing here is on the CPU.
    """
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils.benchmark import Timer
    finally:
        logger.setLevel(level)
    return Timer


@torch.no_grad()
def latency(model: nn.Module, input_shape, batch: int = 1, threads: int = 1, min_run_time: float = 0.5) -> dict:
    """CPU forward-pass time of ``batch`` samples: median and spread, with a fixed thread count.

    Measured with ``torch.utils.benchmark.Timer.blocked_autorange`` (it warms
    up, picks a block size that hides the timer's overhead and runs blocks for
    at least ``min_run_time`` seconds); each block gives one per-call time.
    The thread count is fixed because the same model timed with "all cores"
    on a busy machine differs from run to run by far more than its spread
    (one teacher read 4.59 ms, then 2.97 ms); ``threads`` is recorded.
    A busy machine still inflates the numbers: with 2 OpenMP threads that spin while they wait, resnet18
    at batch 1 took 440 ms instead of 4 ms under load; ``OMP_WAIT_POLICY=PASSIVE`` in the environment
    before torch starts avoided it. OpenMP reads it once, so the report times in a process of its own
    started with it (:mod:`kdcompress.timing`); training keeps the default, which suits it.
    Returns ``{"median_ms", "iqr_ms", "p25_ms", "p75_ms", "batch", "threads", "runs"}``
    (``runs``: how many timed blocks the quartiles come from).

    Example::

        >>> latency(torch.nn.Linear(4, 2), (4,), batch=64)["batch"]  # doctest: +SKIP
        64
    """
    Timer = _benchmark_timer()
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
    p25, median, p75 = (
        torch.tensor(measured.times, dtype=torch.float64)
        .quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
        .tolist()
    )
    return {
        "median_ms": median * 1e3,
        "iqr_ms": (p75 - p25) * 1e3,
        "p25_ms": p25 * 1e3,
        "p75_ms": p75 * 1e3,
        "batch": int(batch),
        "threads": int(threads),
        "runs": len(measured.times),
    }


def latencies(
    model: nn.Module, input_shape, batches=LATENCY_BATCHES, threads: int = 1, min_run_time: float = 0.5
) -> dict[str, dict]:
    """:func:`latency` at each batch size, keyed by the batch size as text (JSON keys): ``{"1": {...}, "64": {...}}``.

    Example::

        >>> sorted(latencies(torch.nn.Linear(4, 2), (4,), threads=2))  # doctest: +SKIP
        ['1', '64']
    """
    return {
        str(int(b)): latency(model, input_shape, batch=int(b), threads=threads, min_run_time=min_run_time)
        for b in batches
    }


def latency_ms(model: nn.Module, input_shape, batch: int = 1, threads: int = 1, min_run_time: float = 0.5) -> float:
    """Median milliseconds of one CPU forward pass of ``batch`` samples; see :func:`latency` for the spread."""
    return latency(model, input_shape, batch=batch, threads=threads, min_run_time=min_run_time)["median_ms"]


def _quartiles_ms(seconds: list[float]) -> dict:
    """Median, 25th and 75th percentile and interquartile range of per-call times, in milliseconds."""
    p25, median, p75 = (
        torch.tensor(seconds, dtype=torch.float64)
        .quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
        .tolist()
    )
    return {"median_ms": median * 1e3, "iqr_ms": (p75 - p25) * 1e3, "p25_ms": p25 * 1e3, "p75_ms": p75 * 1e3}


@torch.no_grad()
def interleaved_latencies(
    models: Mapping[Hashable, tuple[nn.Module, tuple]],
    batch: int = 1,
    threads: int = 1,
    rounds: int = LATENCY_ROUNDS,
    min_run_time: float = 0.5,
) -> dict[Hashable, dict]:
    """CPU forward-pass time of several models at one batch size, timed in turns: the same rounds for all.

    ``models`` maps a key to ``(model, input_shape)``. Each model first gets a block size: as many calls
    as take about ``min_run_time / rounds`` seconds (at least one). Then, ``rounds`` times, every model runs
    one block (``torch.utils.benchmark.Timer.timeit``, which runs two warm-up calls before it, so a block
    does not pay for the caches the previous model left cold), starting each round one model further on so
    none is always first. A change in the machine's load during the measurement falls on every model
    alike, where timing one model after the other (as :func:`latencies` does) compares one stretch of time
    with another. For a ratio of two models, :func:`paired_ratio` of their ``rounds_ms`` compares each
    round's two blocks, taken side by side.

    Returns, per key, what :func:`latency` returns (``runs``: the rounds the quartiles come from) and
    ``rounds_ms``: the per-call time of each round, in round order.

    Example::

        >>> timing = interleaved_latencies({"a": (torch.nn.Linear(4, 2), (4,)), "b": (torch.nn.Linear(4, 8), (4,))},
        ...                                batch=64, threads=1, min_run_time=0.05)  # doctest: +SKIP
        >>> timing["a"]["runs"] == timing["b"]["runs"]  # doctest: +SKIP
        True
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, not {rounds}")
    Timer = _benchmark_timer()
    keys = list(models)
    modes = {key: model.training for key, (model, _) in models.items()}
    timers, numbers = {}, {}
    target = min_run_time / rounds  # seconds of one block
    try:
        for key, (model, shape) in models.items():
            model.eval()
            # no_grad above applies: the Timer runs the statement in this thread
            timers[key] = Timer(
                "model(x)", globals={"model": model, "x": torch.randn(batch, *shape)}, num_threads=threads
            )
            number = 1
            for _ in range(2):  # a first guess from one call (also the warm-up), then from the block it gives
                per_call = max(timers[key].timeit(number).raw_times[0] / number, 1e-9)
                number = max(1, math.ceil(target / per_call))
            numbers[key] = number
        times: dict[Hashable, list[float]] = {key: [] for key in keys}
        for r in range(rounds):
            start = r % len(keys) if keys else 0
            for key in keys[start:] + keys[:start]:
                times[key].append(timers[key].timeit(numbers[key]).times[0])
    finally:
        for key, (model, _) in models.items():
            model.train(modes[key])
    return {
        key: {
            **_quartiles_ms(times[key]),
            "batch": int(batch),
            "threads": int(threads),
            "runs": len(times[key]),
            "rounds_ms": [t * 1e3 for t in times[key]],
        }
        for key in keys
    }


def paired_ratio(first_ms: list[float], second_ms: list[float]) -> float:
    """How many times slower ``first`` is than ``second``: the median over rounds of first / second, each round's
    two times taken side by side (``rounds_ms`` of :func:`interleaved_latencies`, the same rounds).

    On a busy machine a small model's per-round times can jump between two levels (a thread woken at once or
    late); the ratio of two medians then jumps with them, while each round's ratio stays put: for two copies of
    one MLP at batch 1, six timings gave medians' ratios from 0.59 to 1.06 and paired ratios from 0.91 to 1.01.

        >>> paired_ratio([2.0, 4.0, 2.2], [1.0, 2.0, 1.0])
        2.0
    """
    if len(first_ms) != len(second_ms) or not first_ms:
        raise ValueError(f"paired_ratio needs two equal, non-empty lists of rounds ({len(first_ms)}, {len(second_ms)})")
    ratios = sorted(a / b for a, b in zip(first_ms, second_ms) if b > 0)
    if not ratios:
        raise ValueError("paired_ratio: every round of the second model took no time")
    middle = len(ratios) // 2
    return ratios[middle] if len(ratios) % 2 else (ratios[middle - 1] + ratios[middle]) / 2
