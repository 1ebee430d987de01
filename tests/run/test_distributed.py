"""Two processes with torch.distributed (gloo on CPU) against one, on the quickstart recipe."""

import json
import os
import subprocess
import sys

import pytest
import torch

# Shortened quickstart so the test stays in CI's budget; the recipe, data and models are the quickstart's.
SHORTER = [
    "--set",
    "teacher.epochs=2",
    "--set",
    "distill.epochs=4",
    "--set",
    "prune.epochs=4",
    "--set",
    "report.latency=false",
]


def kdc(cwd, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "kdcompress", "run", *SHORTER, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    single = kdc(tmp_path, "--set", "run.name=single")
    assert single.returncode == 0, single.stderr[-3000:]
    double = kdc(tmp_path, "--set", "run.name=double", "--nproc", "2")
    assert double.returncode == 0, double.stderr[-3000:]
    assert "launching 2 processes" in double.stderr
    # one set of outputs: one report, one checkpoint per stage, one line per epoch in the metrics
    run = tmp_path / "runs" / "double"
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [
            ".kdc.lock",
            "cache",
            "distilled",
            "kdc-run.json",
            "pruned",
            "recipe.yaml",
            "report.html",
            "report.json",
            "report.md",
            "student",
            "teacher",
        ]
    )
    assert (run / ".kdc.lock").read_text() == ""  # rank 0 held the run directory's lock, and let it go
    assert [json.loads(line)["epoch"] for line in (run / "teacher" / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
    ]
    assert double.stdout.count("kdc report") == 1
    ckpt = torch.load(run / "pruned" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])  # DDP's wrapper is not saved
    one = {r["stage"]: r for r in json.loads((tmp_path / "runs" / "single" / "report.json").read_text())["stages"]}
    two = {r["stage"]: r for r in json.loads((run / "report.json").read_text())["stages"]}
    assert list(one) == list(two) == ["teacher", "student", "distilled", "pruned"]
    for stage in one:
        assert abs(one[stage]["accuracy"] - two[stage]["accuracy"]) <= 0.01, (stage, one[stage], two[stage])
    assert abs(two["pruned"]["sparsity"] - 0.9) < 0.005


@pytest.mark.slow
def test_two_processes_on_an_image_folder_read_disjoint_shards_and_match_one_process(tmp_path):
    """The quickstart's images written as a grey PNG folder: --nproc 2 reads it from the image cache, each rank its
    own shard, and scores as one process does, as the built-in data does above."""
    from PIL import Image

    from kdcompress.data import load_data
    from kdcompress.recipe import DataSection

    mini = load_data(DataSection(dataset="fashion-mnist-mini"))
    for split, data in (("train", mini.train), ("test", mini.test)):
        for label in range(10):
            (tmp_path / "imgs" / split / f"{label}").mkdir(parents=True)
        for i, (image, label) in enumerate(zip(data.images, data.labels.tolist())):
            Image.fromarray(image[0].numpy()).save(tmp_path / "imgs" / split / f"{label}" / f"{i:05d}.png")
    folder = ["--set", f"data.dataset=imagefolder:{tmp_path / 'imgs'}"]
    single = kdc(tmp_path, *folder, "--set", "run.name=single")
    assert single.returncode == 0, single.stderr[-3000:]
    double = kdc(tmp_path, *folder, "--set", "run.name=double", "--nproc", "2")
    assert double.returncode == 0, double.stderr[-3000:]
    assert "launching 2 processes" in double.stderr
    one = {r["stage"]: r for r in json.loads((tmp_path / "runs" / "single" / "report.json").read_text())["stages"]}
    two = {r["stage"]: r for r in json.loads((tmp_path / "runs" / "double" / "report.json").read_text())["stages"]}
    assert list(one) == list(two) == ["teacher", "student", "distilled", "pruned"]
    for stage in one:
        assert abs(one[stage]["accuracy"] - two[stage]["accuracy"]) <= 0.01, (stage, one[stage], two[stage])
    report = json.loads((tmp_path / "runs" / "double" / "report.json").read_text())
    assert report["input"]["input_shape"] == [1, 28, 28]
