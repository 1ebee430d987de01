"""`kdc export RUN --force` after a stage was retrained brings every artifact of the stage up to date (not only
the recipe's formats), and exporting from a run directory keeps the run's paths relative (issue 20)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from kdcompress.checkpoint import read_manifest
from kdcompress.run import read_artifacts
from kdcompress.run.export import size_change

RUN = Path("runs") / "tiny"


@pytest.fixture(scope="module")
def retrained(fresh_run, tiny_recipe_text, kdc):
    """The tiny run (export.formats [sparse]) exported as sparse and shared, then its pruned stage retrained with
    --set prune.rate=0.6; returns the working directory."""
    recipe = {**yaml.safe_load(tiny_recipe_text), "export": {"formats": ["sparse"]}}
    work, _ = fresh_run(yaml.safe_dump(recipe, sort_keys=False), "stale-export", "run")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        assert kdc("export", str(RUN), "--format", "sparse", "--format", "shared").exit_code == 0
        result = kdc("prune", "recipe.yaml", "--set", "prune.rate=0.6")
        assert result.exit_code == 0, result.output
    finally:
        os.chdir(cwd)
    return work


def test_export_force_after_a_set_rerun_rewrites_every_stale_artifact(retrained, tmp_path, monkeypatch, kdc):
    import shutil

    work = tmp_path / "work"
    shutil.copytree(retrained, work)
    monkeypatch.chdir(work)
    stale = kdc.flat(kdc("report", str(RUN)))
    assert "pruned-shared-4bit.kdca is stale" in stale  # the trial's starting point
    result = kdc("export", str(RUN), "--force")
    kdc.assert_clean_exit(result, 0)
    text = kdc.flat(result)
    assert "writing export/pruned-shared-4bit.kdca" in text and "writing export/pruned-sparse-fp16.kdca" in text
    assert "is stale" not in text, text  # the warning does not repeat after its own advice
    current = read_manifest(work / RUN / "pruned" / "model.pt")["fingerprint"]
    rows = {r["path"]: r for r in read_artifacts(work / RUN)}
    assert set(rows) == {"export/pruned-sparse-fp16.kdca", "export/pruned-shared-4bit.kdca"}
    assert all(r["source_fingerprint"] == current for r in rows.values())
    assert rows["export/pruned-shared-4bit.kdca"]["options"]["bits"] == 4  # written with the settings it had


def test_export_without_a_format_rewrites_the_stale_artifacts(retrained, tmp_path, monkeypatch, kdc):
    import shutil

    work = tmp_path / "work"
    shutil.copytree(retrained, work)
    monkeypatch.chdir(work)
    recipe = yaml.safe_load((work / RUN / "recipe.yaml").read_text())
    recipe["export"]["formats"] = []  # the recipe names none: the stale files are still brought up to date
    (work / RUN / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = kdc("export", str(RUN), "--force")
    kdc.assert_clean_exit(result, 0)
    assert "nothing to export" not in kdc.flat(result)
    assert "is stale" not in kdc.flat(kdc("report", str(RUN)))


def test_export_from_a_run_directory_keeps_its_paths_relative(retrained, tmp_path, monkeypatch, kdc):
    import shutil

    work = tmp_path / "work"
    shutil.copytree(retrained, work)
    monkeypatch.chdir(work)
    result = kdc("export", str(RUN), "--format", "sparse")
    kdc.assert_clean_exit(result, 0)
    absolute = str(work)
    assert absolute not in result.output, result.output
    assert yaml.safe_load((work / RUN / "recipe.yaml").read_text())["run"]["out_dir"] == "runs"
    report = (work / RUN / "report.json").read_text()
    assert absolute not in report
    assert absolute not in (work / RUN / "report.md").read_text()


def test_a_file_as_big_as_its_checkpoint_is_the_same_size_not_1x_smaller():
    assert size_change(1000, 990, "pruned/model.pt") == "the same size as pruned/model.pt"
    assert size_change(4200, 1000, "x") == "4.2x smaller than x"
    assert size_change(1000, 1500, "x") == "1.5x larger than x"
