"""End to end through the `kdc` CLI on the tiny recipe (a few seconds on a CPU).

One full `kdc run` happens once per module (``first_run``); tests that run
more commands work in their own copy of that directory, so they do not
depend on each other or on their order.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from kdcompress.recipe import load_recipe, recipe_to_dict

STAGES = ["teacher", "student", "distilled", "pruned"]
RUN = Path("runs") / "tiny"


@pytest.fixture(scope="module")
def first_run(fresh_run, tiny_recipe_text):
    """`kdc run recipe.yaml` in a fresh directory; returns (directory, CliRunner result)."""
    return fresh_run(tiny_recipe_text, "e2e", "run", check=False)


@pytest.fixture
def copied_run(first_run, tmp_path, monkeypatch):
    """A private copy of the first run's directory, made the working directory."""
    work, result = first_run
    assert result.exit_code == 0, result.output
    dest = tmp_path / "copy"
    shutil.copytree(work, dest)
    monkeypatch.chdir(dest)
    return dest


def digests(root: Path) -> dict[str, str]:
    return {s: hashlib.sha256((root / RUN / s / "model.pt").read_bytes()).hexdigest() for s in STAGES}


# --------------------------------------------------------------------------- first run


def test_run_exits_0_and_writes_every_artifact(first_run, kdc):
    work, result = first_run
    kdc.assert_clean_exit(result, 0)
    run_dir = work / RUN
    for name in ("recipe.yaml", "report.json", "report.md"):
        assert (run_dir / name).is_file(), name
    for stage in STAGES:
        assert (run_dir / stage / "model.pt").is_file(), stage
        assert (run_dir / stage / "model.pt").stat().st_size > 0
        lines = (run_dir / stage / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert [r["epoch"] for r in records] == [1, 2], stage
        assert all(r["stage"] == stage for r in records)
    pruned = [json.loads(x) for x in (run_dir / "pruned" / "metrics.jsonl").read_text().splitlines()]
    assert pruned[-1]["sparsity"] == pytest.approx(0.75, abs=0.005)
    # no temporary files left behind by the atomic writes
    assert not list(run_dir.rglob("*.tmp"))


def test_run_prints_progress_and_the_report(first_run, kdc):
    _, result = first_run
    out = kdc.flat(result)
    for stage in STAGES:
        assert f"{stage}: training on fashion-mnist-mini" in out
    assert "kdc report: tiny" in result.stdout  # the table goes to stdout, progress to stderr
    assert "report.json" in out


def test_report_json_schema_and_values(first_run):
    work, _ = first_run
    report = json.loads((work / RUN / "report.json").read_text())
    assert {"recipe", "dataset", "stages"} <= set(report)
    assert report["recipe"] == "tiny"
    assert report["dataset"] == "fashion-mnist-mini"
    rows = report["stages"]
    assert [r["stage"] for r in rows] == STAGES
    teacher = rows[0]
    for row in rows:
        assert row["model"] == "mlp"
        assert isinstance(row["accuracy"], float) and 0.0 <= row["accuracy"] <= 1.0
        assert row["accuracy"] > 0.3  # ten classes: clearly better than chance after 2 epochs
        assert isinstance(row["params"], int) and row["params"] > 0
        assert isinstance(row["nonzero_params"], int) and 0 < row["nonzero_params"] <= row["params"]
        assert isinstance(row["sparsity"], float) and 0.0 <= row["sparsity"] <= 1.0
        assert isinstance(row["checkpoint_bytes"], int) and row["checkpoint_bytes"] > 0
        assert row["checkpoint_bytes"] == (work / RUN / row["stage"] / "model.pt").stat().st_size
        assert isinstance(row["compression_vs_teacher"], float)
        assert row["compression_vs_teacher"] == pytest.approx(teacher["nonzero_params"] / row["nonzero_params"])
    by_stage = {r["stage"]: r for r in rows}
    assert by_stage["teacher"]["compression_vs_teacher"] == pytest.approx(1.0)
    assert by_stage["teacher"]["params"] == 784 * 64 + 64 + 64 * 10 + 10
    assert by_stage["student"]["params"] == by_stage["distilled"]["params"] == by_stage["pruned"]["params"]
    assert by_stage["student"]["params"] == 784 * 32 + 32 + 32 * 10 + 10
    for stage in ("teacher", "student", "distilled"):
        assert by_stage[stage]["sparsity"] == 0.0
    assert by_stage["pruned"]["sparsity"] == pytest.approx(0.75, abs=0.005)
    assert by_stage["pruned"]["nonzero_params"] < by_stage["distilled"]["nonzero_params"]
    assert by_stage["pruned"]["compression_vs_teacher"] > by_stage["distilled"]["compression_vs_teacher"]


def test_report_md_lists_every_stage(first_run):
    work, _ = first_run
    text = (work / RUN / "report.md").read_text()
    assert "tiny" in text
    for stage in STAGES:
        assert f"| {stage} " in text


def test_resolved_recipe_reloads_to_the_same_recipe(first_run):
    work, _ = first_run
    original = load_recipe(work / "recipe.yaml")
    resolved = load_recipe(work / RUN / "recipe.yaml")
    assert recipe_to_dict(resolved) == recipe_to_dict(original)


# --------------------------------------------------------------------------- reruns


def test_rerun_skips_every_stage(copied_run, kdc):
    before = digests(copied_run)
    result = kdc("run", "recipe.yaml")
    kdc.assert_clean_exit(result, 0)
    out = kdc.flat(result)
    for stage in STAGES:
        assert f"{stage}: up to date, skipped" in out
        assert f"{stage}: training on" not in out
    assert "rerunning" not in out
    assert digests(copied_run) == before
    assert (copied_run / RUN / "report.json").is_file()


@pytest.mark.parametrize("setting", ["data.workers=0", "data.workers=5", "run.threads=1"])
def test_how_to_run_settings_do_not_retrain(copied_run, kdc, setting):
    before = digests(copied_run)
    result = kdc("run", "recipe.yaml", "--set", setting)
    kdc.assert_clean_exit(result, 0)
    out = kdc.flat(result)
    for stage in STAGES:
        assert f"{stage}: up to date, skipped" in out
    assert digests(copied_run) == before


def test_changed_prune_value_reruns_only_pruned(copied_run, kdc):
    before = digests(copied_run)
    result = kdc("run", "recipe.yaml", "--set", "prune.target_sparsity=0.5")
    kdc.assert_clean_exit(result, 0)
    out = kdc.flat(result)
    for stage in ("teacher", "student", "distilled"):
        assert f"{stage}: up to date, skipped" in out
        assert f"{stage}: training on" not in out
    assert "pruned: up to date" not in out
    assert "pruned: rerunning" in out
    assert "pruned: training on" in out
    after = digests(copied_run)
    assert {s: after[s] == before[s] for s in STAGES} == {
        "teacher": True,
        "student": True,
        "distilled": True,
        "pruned": False,
    }
    report = json.loads((copied_run / RUN / "report.json").read_text())
    pruned = [r for r in report["stages"] if r["stage"] == "pruned"][0]
    assert pruned["sparsity"] == pytest.approx(0.5, abs=0.005)


# --------------------------------------------------------------------------- errors and help


def test_stage_out_of_order_names_the_missing_command(kdc, write_recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_recipe("recipe.yaml")
    result = kdc("distill", "recipe.yaml")
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    assert "train-teacher" in out
    assert "teacher" in out and "distilled" in out
    assert not (tmp_path / RUN / "distilled" / "model.pt").exists()


def test_prune_before_distill_names_the_missing_command(kdc, write_recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_recipe("recipe.yaml")
    result = kdc("prune", "recipe.yaml")
    kdc.assert_clean_exit(result, 2)
    assert "kdc distill" in kdc.flat(result)
    assert not (tmp_path / RUN / "pruned" / "model.pt").exists()


def test_report_on_dir_without_checkpoints(kdc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty-run").mkdir()
    result = kdc("report", "empty-run")
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    out = kdc.flat(result)
    assert "no stage checkpoints in empty-run" in out
    assert "kdc run" in out
    assert not (tmp_path / "empty-run" / "report.json").exists()


def test_report_on_missing_dir(kdc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = kdc("report", "runs/nothing-here")
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert "run directory not found" in kdc.flat(result)


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["run", "--help"],
        ["train-teacher", "--help"],
        ["train-student", "--help"],
        ["distill", "--help"],
        ["prune", "--help"],
        ["report", "--help"],
        ["validate", "--help"],
    ],
    ids=lambda a: " ".join(a),
)
def test_help_has_an_example(kdc, args):
    result = kdc(*args)
    kdc.assert_clean_exit(result, 0)
    assert "Example" in result.output
    assert "kdc " in result.output
