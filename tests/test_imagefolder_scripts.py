"""scripts/bench_imagefolder.py and scripts/imagefolder_memory.py run end to end on a few images (nothing timed)."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from kdcompress.data import DEBIAN_FASHION_MNIST, IDX_FILES

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its pool's workers find their function by module name
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(
    not all((DEBIAN_FASHION_MNIST / f"{n}.gz").is_file() for n in IDX_FILES), reason="needs Debian's Fashion-MNIST"
)
def test_the_bench_writes_fashion_mnist_as_pngs_and_compares_both_paths(tmp_path, capsys):
    bench = load("bench_imagefolder")
    folder = tmp_path / "png"
    result = bench.main(["--make-fashion-pngs", str(folder), "--limit", "40", str(folder), "--rounds", "1"])
    assert sorted(p.name for p in (folder / "train").iterdir())[:2] == ["0-T-shirt_top", "1-Trouser"]
    assert sum(1 for _ in (folder / "test").rglob("*.png")) == 40 and result["train_images"] == 40
    for key in ("decode_s", "cache_epoch_s", "loader_epoch_s", "epoch_speedup", "decode_over_loader_epoch"):
        assert result[key] > 0, key
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith('{"bench": "imagefolder"')


def test_the_memory_script_reports_peak_anonymous_memory_per_phase(tmp_path, image_cache):
    result = load("imagefolder_memory").main(
        ["--images", "60", "--test", "10", "--size", "16", "--workers", "0", "--dir", str(tmp_path)]
    )
    assert result["trained_samples"] == 60 and result["decoded_gb"] == round(60 * 3 * 16 * 16 / 1e9, 3)
    assert set(result["peak_mb"]) == {"start", "decode", "train"} and result["peak_rss_anon_mb"] > 0
    assert list(tmp_path.iterdir()) == []  # the folder and its cache removed
    assert os.environ["KDC_CACHE"] == str(image_cache)  # as it was
