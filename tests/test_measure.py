"""What the report measures: MACs by torch's operator-level counter, sparse MACs, latency at two batch sizes
(issue 9, part 4). Every expected count is worked out by hand in the test.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdcompress.measure import count_macs, count_sparse_macs, interleaved_latencies, latencies, paired_ratio


def zero_half(weight: torch.Tensor) -> None:
    """Zero every other element of ``weight`` (exactly half when its size is even)."""
    with torch.no_grad():
        weight.view(-1)[::2] = 0


# --------------------------------------------------------------------------- dense MACs


def test_linear_macs_per_sample():
    # one sample: 7 inputs x 5 outputs; the batch of one the count runs on is not counted
    assert count_macs(nn.Linear(7, 5), (7,)) == 7 * 5


def test_linear_macs_on_a_3d_input_count_every_position():
    # (4, 7) per sample: the 7 -> 5 projection at each of 4 positions (a token sequence)
    assert count_macs(nn.Linear(7, 5), (4, 7)) == 4 * 7 * 5


def test_conv2d_macs_with_stride_padding_groups_and_bias():
    conv = nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=1, groups=2, bias=True)
    # output 5 x 6: (9 + 2 - 3) // 2 + 1 = 5, (11 + 2 - 3) // 2 + 1 = 6; each of the 6 output channels
    # reads 4 / 2 = 2 input channels through a 3 x 3 kernel; the bias adds, it does not multiply
    assert count_macs(conv, (4, 9, 11)) == (5 * 6) * 6 * (2 * 3 * 3)


def test_functional_ops_are_counted():
    """A user's net that calls F.linear, F.conv2d and a matmul on its own parameters (no nn.Linear or
    nn.Conv2d module): the old module-hook count saw none of it and reported 0."""

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(8, 3, 3, 3))
            self.proj = nn.Parameter(torch.randn(6, 8))
            self.mix = nn.Parameter(torch.randn(6, 6))

        def forward(self, x):
            x = F.conv2d(x, self.kernel)  # (8, 8, 8): 8 x 8 pixels x 8 channels x 3*3*3
            x = x.flatten(2).transpose(1, 2)  # 64 positions of 8 features
            x = F.linear(x, self.proj)  # 64 x 8 x 6
            return x @ self.mix  # 64 x 6 x 6

    assert count_macs(Functional(), (3, 10, 10)) == 8 * 8 * 8 * 27 + 64 * 8 * 6 + 64 * 6 * 6


def test_attention_is_counted_with_its_projections():
    """nn.TransformerEncoderLayer in eval mode: on the CPU its fused fast path and fused attention kernel
    are invisible to the flop counter (0 MACs) unless the count takes the plain path."""
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True).train()
    seq, d, heads, head_dim, ff = 8, 16, 2, 8, 32
    expected = (
        seq * d * 3 * d  # q, k, v projections
        + heads * (seq * seq * head_dim) * 2  # q k^T and the weighted sum of v, per head
        + seq * d * d  # output projection
        + seq * d * ff * 2  # feed-forward, up and down
    )
    fast_path = torch.backends.mha.get_fastpath_enabled()
    assert count_macs(layer, (seq, d)) == expected == 18432
    assert layer.training  # the caller's mode is kept
    assert torch.backends.mha.get_fastpath_enabled() == fast_path  # and torch's global setting


def test_torchvision_resnet18_matches_the_documented_1_81_gmacs():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18()
    assert count_macs(model, (3, 224, 224)) == pytest.approx(1.81e9, rel=0.01)


# --------------------------------------------------------------------------- sparse MACs


def test_sparse_macs_of_a_half_zeroed_linear_are_half():
    linear = nn.Linear(8, 6)
    zero_half(linear.weight)
    assert count_macs(linear, (8,)) == 48  # zeros cost their MACs in a dense kernel
    assert count_sparse_macs(linear, (8,)) == 24
    assert count_sparse_macs(linear, (5, 8)) == 5 * 24  # k non-zero weights cost k at each position


def test_sparse_macs_of_a_half_zeroed_conv_are_half():
    conv = nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=1, groups=2)
    zero_half(conv.weight)
    dense = (5 * 6) * 6 * (2 * 3 * 3)
    assert count_macs(conv, (4, 9, 11)) == dense
    assert count_sparse_macs(conv, (4, 9, 11)) == dense // 2 == (5 * 6) * (conv.weight.numel() // 2)


def test_sparse_macs_of_a_half_zeroed_transposed_conv_are_half():
    # a transposed convolution uses each weight once per *input* pixel
    deconv = nn.ConvTranspose2d(4, 6, kernel_size=2, stride=2)
    zero_half(deconv.weight)
    dense = count_macs(deconv, (4, 5, 5))
    assert dense == 5 * 5 * deconv.weight.numel()
    assert count_sparse_macs(deconv, (4, 5, 5)) == dense // 2


def test_sparse_macs_only_discount_zero_weights():
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 4))
    assert count_sparse_macs(net, (4, 4)) == count_macs(net, (4, 4)) == 16 * 10 + 10 * 4
    zero_half(net[1].weight)
    assert count_sparse_macs(net, (4, 4)) == 16 * 10 // 2 + 10 * 4
    assert count_macs(net, (4, 4)) == 16 * 10 + 10 * 4


def test_structured_pruning_shows_in_both_counts():
    """A model whose channels were removed is simply smaller: both counts see its real shapes."""
    full = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3))
    half = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    shape = (1, 12, 12)
    assert count_macs(full, shape) == 10 * 10 * 32 * 9 + 8 * 8 * 32 * 32 * 9
    assert count_macs(half, shape) == 10 * 10 * 16 * 9 + 8 * 8 * 16 * 16 * 9
    assert count_sparse_macs(half, shape) == count_macs(half, shape)


# --------------------------------------------------------------------------- latency


def test_latencies_at_batch_1_and_64_on_a_fixed_thread_count():
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).train()
    threads_before = torch.get_num_threads()
    timing = latencies(net, (32,), threads=2, min_run_time=0.02)
    assert list(timing) == ["1", "64"]  # text keys, as JSON stores them
    for batch, entry in timing.items():
        assert set(entry) >= {"median_ms", "iqr_ms", "p25_ms", "p75_ms", "batch", "threads", "runs"}
        assert entry["batch"] == int(batch)
        assert entry["threads"] == 2
        assert entry["median_ms"] > 0 and entry["runs"] >= 1
        assert entry["p25_ms"] <= entry["median_ms"] <= entry["p75_ms"]
    assert torch.get_num_threads() == threads_before
    assert net.training
    assert list(latencies(net, (32,), batches=[8], threads=1, min_run_time=0.02)) == ["8"]


class Logged(nn.Module):
    """A model that writes its name into ``log`` on every call."""

    def __init__(self, name: str, log: list, width: int):
        super().__init__()
        self.name, self.log, self.layer = name, log, nn.Linear(8, width)

    def forward(self, x):
        self.log.append(self.name)
        return self.layer(x)


def _blocks(log: list) -> list[tuple[str, int]]:
    """The call log as (model, calls in a row)."""
    blocks = []
    for name in log:
        if blocks and blocks[-1][0] == name:
            blocks[-1] = (name, blocks[-1][1] + 1)
        else:
            blocks.append((name, 1))
    return blocks


def test_interleaved_latencies_give_every_model_one_block_per_round_in_turns():
    log: list = []
    models = {name: (Logged(name, log, width).train(), (8,)) for name, width in (("a", 4), ("b", 256), ("c", 32))}
    threads_before = torch.get_num_threads()
    timing = interleaved_latencies(models, batch=16, threads=1, rounds=5, min_run_time=0.01)
    assert list(timing) == ["a", "b", "c"]
    for name, entry in timing.items():
        assert entry["runs"] == len(entry["rounds_ms"]) == 5  # every model, the same rounds
        assert entry["median_ms"] == pytest.approx(sorted(entry["rounds_ms"])[2])
        assert (entry["batch"], entry["threads"]) == (16, 1)
        assert 0 < entry["p25_ms"] <= entry["median_ms"] <= entry["p75_ms"]
        assert entry["iqr_ms"] == pytest.approx(entry["p75_ms"] - entry["p25_ms"])
        assert models[name][0].training  # the caller's mode is kept
    assert torch.get_num_threads() == threads_before
    timed = _blocks(log)[-15:]  # after each model's warm-up: 5 rounds of one block per model
    rounds = [[name for name, _ in timed[i : i + 3]] for i in range(0, 15, 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds), rounds  # each round runs each model once
    assert [r[0] for r in rounds] == ["a", "b", "c", "a", "b"]  # and starts one model further on
    for name in "abc":  # a model's blocks are all the same size (two warm-up calls, then the timed ones)
        assert len({calls for n, calls in timed if n == name}) == 1


def test_paired_ratio_compares_each_round_s_two_times_not_the_two_medians():
    # two copies of one model whose rounds jump between 1 ms and 2 ms: their medians differ (2 and 1),
    # while in four rounds of five the two took the same time
    first, second = [1.0, 2.0, 1.0, 2.0, 2.0], [1.0, 2.0, 1.0, 2.0, 1.0]
    assert sorted(first)[2] / sorted(second)[2] == 2.0
    assert paired_ratio(first, second) == 1.0
    assert paired_ratio([3.0, 5.0], [1.0, 1.0]) == 4.0  # an even count: the mean of the middle two
    with pytest.raises(ValueError, match="equal"):
        paired_ratio([1.0, 2.0], [1.0])


def test_latency_does_not_print_the_no_cuda_runtime_warning():
    """Importing torch.utils.benchmark logs "No CUDA runtime is found" on a machine with a CUDA toolkit
    and no GPU; the measurement keeps it off the user's terminal."""
    code = (
        "import torch\n"
        "from unittest import mock\n"
        "from kdcompress.measure import latency\n"
        # make the warning's condition true on any machine: a CUDA home and no GPU
        "with mock.patch.dict('os.environ', {'CUDA_HOME': '/usr/local'}), "
        "mock.patch('torch.cuda.is_available', return_value=False):\n"
        "    latency(torch.nn.Linear(4, 2), (4,), min_run_time=0.01)\n"
        "import logging, torch.utils.cpp_extension as ext\n"
        "assert logging.getLogger(ext.__name__).level == logging.NOTSET\n"  # the logger is left as it was
        "print('done')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "done" in result.stdout
    assert "No CUDA runtime" not in result.stderr + result.stdout
