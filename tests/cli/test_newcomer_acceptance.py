"""Issue 8's acceptance: a recipe written from scratch, as a newcomer writes one, runs end to end.

``teacher: torchvision:resnet18`` and ``student: cnn`` with no ``args``,
``lr: 5e-2`` in exponent form and no ``run.name``, on the shipped quickstart
data with 1-2 epochs per stage. The run goes to ``runs/<file stem>``, its
files are readable by group and others under umask 0022, the pruned
checkpoint loaded with :func:`kdcompress.load_model` scores its reported
accuracy on raw 0-255 images, and the report table fits 100 columns.
"""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

SCRATCH = """\
# written from scratch: no args, no run.name, exponent-form floats
teacher:
  model: torchvision:resnet18
  epochs: 1
  lr: 5e-2
student:
  model: cnn
distill:
  epochs: 1
  lr: 5e-2
prune:
  rate: 0.5
  target_sparsity: 0.75
  every: 0.5
  epochs: 2
  lr: 1e-2
"""

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory, kdc):
    work = tmp_path_factory.mktemp("scratch")
    (work / "my-first.yaml").write_text(SCRATCH, encoding="utf-8")
    old_umask = os.umask(0o022)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(work)
            validated = kdc("validate", "my-first.yaml")
            ran = kdc("run", "my-first.yaml")
    finally:
        os.umask(old_umask)
    return work, validated, ran


def test_it_validates_and_runs_into_runs_file_stem(scratch_run, kdc):
    work, validated, ran = scratch_run
    kdc.assert_clean_exit(validated, 0)
    assert "runs/my-first" in validated.output
    kdc.assert_clean_exit(ran, 0)
    run_dir = work / "runs" / "my-first"
    for stage in ("teacher", "student", "distilled", "pruned"):
        assert (run_dir / stage / "model.pt").is_file(), stage
    assert not (work / "runs" / "quickstart").exists()
    resolved = (run_dir / "recipe.yaml").read_text()
    assert "name: my-first" in resolved
    report = json.loads((run_dir / "report.json").read_text())
    assert [r["stage"] for r in report["stages"]] == ["teacher", "student", "distilled", "pruned"]


def test_its_files_are_readable_by_group_and_others(scratch_run):
    work, _, _ = scratch_run
    files = [p for p in (work / "runs" / "my-first").rglob("*") if p.is_file()]
    assert files
    private = [str(p) for p in files if stat.S_IMODE(p.stat().st_mode) & 0o044 != 0o044]
    assert not private, private


def test_the_pruned_model_loaded_with_the_helper_scores_its_reported_accuracy(scratch_run):
    import kdcompress
    from kdcompress.data import load_data
    from kdcompress.recipe import DataSection

    work, _, _ = scratch_run
    run_dir = work / "runs" / "my-first"
    reported = next(r for r in json.loads((run_dir / "report.json").read_text())["stages"] if r["stage"] == "pruned")
    model, preprocess = kdcompress.load_model(run_dir / "pruned" / "model.pt")
    assert not model.training
    test = load_data(DataSection(dataset="fashion-mnist-mini")).test
    images, labels = test.images, test.labels  # raw uint8, 0-255
    assert images.dtype == torch.uint8
    with torch.no_grad():
        predicted = torch.cat([model(preprocess(images[i : i + 500])).argmax(1) for i in range(0, len(images), 500)])
    accuracy = (predicted == labels).float().mean().item()
    assert abs(accuracy - reported["accuracy"]) <= 0.001


def test_the_report_table_fits_100_columns(scratch_run, kdc, monkeypatch):
    work, _, _ = scratch_run
    monkeypatch.chdir(work)
    monkeypatch.setenv("COLUMNS", "100")
    result = kdc("report", "runs/my-first")
    kdc.assert_clean_exit(result, 0)
    assert "…" not in result.stdout
    table = [line for line in result.stdout.splitlines() if line.strip()]
    assert max(len(line) for line in table) <= 100
