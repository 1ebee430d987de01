"""scripts/bench.py --quick: the whole benchmark (CLI processes and in-process loops) runs and reports every field.

No timing is asserted: speed is for the benchmark itself, run on a quiet machine.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"

# every key of the JSON result; a number > 0 unless listed in a group below
POSITIVE = [
    "train_samples",
    "test_samples",
    "epochs",
    "teacher_epochs",
    "batch_size",
    "temperature",
    "alpha",
    "lr",
    "momentum",
    "torch_threads",
    "teacher_params",
    "student_params",
    "teacher_accuracy",
    "teacher_train_seconds",
    "cli_short_epochs",
    "cli_epochs",
    "cli_rounds",
    "cli_runs",
    "cli_warmup_seconds",
    "augment_epochs",
    "kdc_data_load_seconds",
    "naive_data_setup_seconds",
    "naive_median_epoch_seconds",
    "kdc_distill_median_epoch_seconds",
    "ce_median_epoch_seconds",
    "naive_min_epoch_seconds",
    "kdc_distill_min_epoch_seconds",
    "ce_min_epoch_seconds",
    "ratio_a_b_min",
    "ratio_b_c_min",
    "teacher_cache_seconds",
    "kdc_distill_median_epoch_seconds_amortised",
    "ratio_a_b",
    "ratio_a_b_amortised",
    "ratio_b_c",
    "ratio_a_b_of_medians",
    "ratio_b_c_of_medians",
    "target_a_b",
    "target_b_c",
    "target_naive_cli",
    "naive_accuracy",
    "kdc_distill_accuracy",
    "ce_accuracy",
    "naive_test_samples",
    "peak_rss_mb",
    "wall_seconds",
    "cpu_count",
]
# marginal epochs are differences of two wall times: on a busy machine one can come out <= 0, so only their type
SIGNED = [
    "cli_marginal_epoch_seconds",
    "augment_marginal_epoch_seconds",
    "ratio_naive_cli",
    "ratio_naive_cli_of_medians",
    "ratio_cli_b",
    "ratio_augment_cli",
]
LISTS = {  # key: length in the quick configuration (1 in-process epoch, 1 CLI round)
    "teacher_epoch_seconds": 1,
    "cli_short_seconds": 1,
    "cli_long_seconds": 1,
    "cli_marginal_epoch_seconds_per_round": 1,
    "ratio_naive_cli_per_round": 1,
    "augment_short_seconds": 1,
    "augment_long_seconds": 1,
    "augment_marginal_epoch_seconds_per_round": 1,
    "naive_epoch_seconds": 1,
    "kdc_distill_epoch_seconds": 1,
    "ce_epoch_seconds": 1,
    "ratio_a_b_per_epoch": 1,
    "ratio_b_c_per_epoch": 1,
    "loadavg_start": 3,
    "loadavg_end": 3,
}
FLAGS = ["quick", "compile", "meets_a_b", "meets_b_c", "meets_naive_cli"]
TEXT = ["dataset", "device", "cli_command", "cli_recipe", "date", "cpu_model", "python", "torch_version"]
OTHER = ["commit", "commit_dirty", "seed", "cli_env_omp_wait_policy", "cli_run_threads", "augment", "peak_rss_mb_after"]


def _load_bench():
    spec = importlib.util.spec_from_file_location("kdc_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_bench_times_the_cli_and_the_in_process_loops_and_writes_every_key(tmp_path, capsys):
    bench = _load_bench()
    out, history = tmp_path / "bench.json", tmp_path / "bench.md"
    result = bench.main(["--quick", "--threads", "1", "--json", str(out), "--history", str(history)])

    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(result))
    assert set(result) == {*POSITIVE, *SIGNED, *LISTS, *FLAGS, *TEXT, *OTHER}
    for key in POSITIVE:
        assert isinstance(result[key], (int, float)) and result[key] > 0, key
    for key in SIGNED:
        assert isinstance(result[key], float), key
    for key, length in LISTS.items():
        assert len(result[key]) == length, key
    for key in FLAGS:
        assert isinstance(result[key], bool), key
    for key in TEXT:
        assert isinstance(result[key], str) and result[key], key

    assert result["quick"] and result["dataset"] == "fashion-mnist-mini" and result["torch_threads"] == 1
    # the headline ratios are medians of ratios measured side by side, not ratios of medians taken minutes apart
    assert result["ratio_b_c"] == statistics.median(result["ratio_b_c_per_epoch"])
    assert result["ratio_naive_cli"] == statistics.median(result["ratio_naive_cli_per_round"])
    # the CLI ran in kdc's default environment (no wait policy), 2 vs 3 epochs, with the recipe's threads set
    assert result["cli_env_omp_wait_policy"] is None and result["cli_run_threads"] == 1
    assert (result["cli_short_epochs"], result["cli_epochs"], result["augment_epochs"]) == (2, 3, 3)
    assert result["augment"] == {"hflip": True, "crop_padding": 2}
    # train-teacher, the cache-building distill, the augmented run's teacher, then two pairs of timed runs
    assert result["cli_runs"] == 7
    assert "distill.epochs=N" in result["cli_command"] and "run.threads=1" in result["cli_command"]

    rows = history.read_text(encoding="utf-8").splitlines()
    assert rows[-1].startswith("| ") and "fashion-mnist-mini" in rows[-1] and "[bench.json](bench.json)" in rows[-1]
    assert sum(row.startswith("| date |") for row in rows) == 1
    bench.add_history_row(history, bench.history_row(result, out, history))  # a later run: a row under the same header
    again = history.read_text(encoding="utf-8").splitlines()
    assert again[:-1] == rows and sum(row.startswith("| date |") for row in again) == 1
