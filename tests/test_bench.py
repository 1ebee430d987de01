"""Smoke test for scripts/bench.py: a tiny configuration runs end to end and reports every field."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("kdc_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_smoke(tmp_path, capsys):
    bench = _load_bench()
    out = tmp_path / "bench.json"
    result = bench.main(["--dataset", "fashion-mnist-mini", "--epochs", "1", "--teacher-epochs", "1",
                         "--limit", "2000", "--threads", "1", "--json-out", str(out)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(result))
    assert result["train_samples"] == 2000 and result["torch_threads"] == 1
    for key in ("naive_median_epoch_seconds", "kdc_distill_median_epoch_seconds", "ce_median_epoch_seconds",
                "ratio_a_b", "ratio_a_b_amortised", "ratio_b_c", "teacher_cache_seconds", "peak_rss_mb",
                "naive_accuracy", "kdc_distill_accuracy", "ce_accuracy", "teacher_accuracy", "wall_seconds"):
        assert result[key] > 0, key
    for key in ("naive_epoch_seconds", "kdc_distill_epoch_seconds", "ce_epoch_seconds"):
        assert len(result[key]) == 1
