"""Bounded memory on crafted checkpoints (issue 17, item 4): pickle's memo cannot make a small file huge.

``torch.load(..., weights_only=True)`` runs no code, but pickle's memo lets a file name the same list many
times: a few kilobytes can hold a value that is billions of values once written out, as the report writes
a checkpoint's recipe and history (YAML, JSON) and as stage_status compares them. load_checkpoint measures
the shared graph before anyone walks it and refuses such a file, naming the part.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import kdc_in_child, subprocess_env, working_copy

from kdcompress.checkpoint import load_checkpoint, save_checkpoint
from kdcompress.errors import CheckpointError


def _memo_bomb(levels: int = 9, width: int = 10) -> list:
    """A list that is width**levels strings once written out, but levels lists in memory (and in the file)."""
    value = ["kdc"] * width
    for _ in range(levels):
        value = [value] * width
    return value


@pytest.fixture(scope="module")
def run(fresh_run, tiny_recipe_text):
    work, _ = fresh_run(tiny_recipe_text, "memo", "train-teacher")
    return work


@pytest.mark.parametrize("part", ["history", "recipe", "metrics"])
def test_a_checkpoint_whose_shared_parts_expand_to_billions_is_refused_naming_the_part(run, tmp_path, part):
    path, original = tmp_path / "model.pt", run / "runs" / "tiny" / "teacher" / "model.pt"
    ckpt = load_checkpoint(original)
    if part == "recipe":
        ckpt["recipe"]["teacher"]["args"]["hidden"] = _memo_bomb()
    else:
        ckpt[part] = _memo_bomb() if part == "history" else {**ckpt[part], "confusion": _memo_bomb()}
    save_checkpoint(path, ckpt)  # torch.save keeps the sharing: the file stays small
    assert path.stat().st_size < original.stat().st_size + 5_000
    with pytest.raises(CheckpointError, match=f"{part}.* values once written out"):
        load_checkpoint(path)


def test_a_checkpoint_that_contains_itself_is_refused(run, tmp_path):
    path = tmp_path / "model.pt"
    ckpt = load_checkpoint(run / "runs" / "tiny" / "teacher" / "model.pt")
    loop: list = []
    loop.append(loop)
    ckpt["history"] = loop
    save_checkpoint(path, ckpt)
    with pytest.raises(CheckpointError, match="contains itself"):
        load_checkpoint(path)


def test_kdc_report_of_a_run_with_a_memo_bomb_checkpoint_exits_2_under_1_gb(run, tmp_path):
    work = tmp_path / "copy"
    shutil.copytree(run, work)
    path = work / "runs" / "tiny" / "teacher" / "model.pt"
    ckpt = load_checkpoint(path)
    ckpt["recipe"]["report"] = _memo_bomb()
    ckpt["history"] = _memo_bomb()
    save_checkpoint(path, ckpt)
    (work / "runs" / "tiny" / "recipe.yaml").unlink()  # the report then falls back on the checkpoint's recipe
    result = kdc_in_child("report", "runs/tiny", cwd=work)
    assert result["rc"] == 2, result["output"]
    assert "values once written out" in result["output"] and "Traceback" not in result["output"]
    assert result["max_rss_kb"] < 1024 * 1024, f"peak RSS {result['max_rss_kb'] / 1024:.0f} MiB"


def test_a_resume_state_holding_a_memo_bomb_is_refused_with_restart_advice(run, tmp_path, kdc, monkeypatch):
    from kdcompress.checkpoint import save_state

    work = tmp_path / "copy"
    shutil.copytree(run, work)
    stage = work / "runs" / "tiny" / "teacher"
    for name in ("model.pt", "model.pt.manifest.json", "metrics.jsonl"):
        (stage / name).unlink()  # an unfinished teacher: its state.pt is what a rerun resumes from
    save_state(stage / "state.pt", {"tag": "x", "epoch": 1, "model": {}, "history": _memo_bomb()})
    monkeypatch.chdir(work)
    result = kdc("train-teacher", "recipe.yaml")
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    assert "state.pt was refused" in out and "values once written out" in out and "--restart" in out, out


# --------------------------------------------------------------------------- planted values the report reads


@pytest.fixture(scope="module")
def full_run(fresh_run, tiny_recipe_text):
    work, _ = fresh_run(tiny_recipe_text, "planted-values", "run")
    return work


@pytest.fixture
def copy(full_run, tmp_path, monkeypatch):
    return working_copy(full_run, tmp_path, monkeypatch)


@pytest.mark.parametrize(
    "key, value",
    [
        ("test_samples", "2000"),
        ("seconds", [1]),
        ("channel_sparsity", "c"),
        ("confusion", "x"),
        ("confusion", [[1, 2]]),
        ("train_device", 5),
    ],
)
def test_a_checkpoint_metric_of_the_wrong_type_is_a_damaged_file_not_an_internal_error(copy, kdc, key, value):
    path = copy / "runs" / "tiny" / "distilled" / "model.pt"
    ckpt = load_checkpoint(path)
    ckpt["metrics"][key] = value
    save_checkpoint(path, ckpt)
    result = kdc("report", "runs/tiny")
    kdc.assert_clean_exit(result, 2)
    assert "distilled/model.pt is damaged" in kdc.flat(result) and key.split("_")[0] in kdc.flat(result)


def test_a_checkpoint_recipe_of_the_wrong_types_leaves_its_row_without_settings(copy, kdc):
    path = copy / "runs" / "tiny" / "pruned" / "model.pt"
    ckpt = load_checkpoint(path)
    ckpt["recipe"]["prune"] = "x"
    ckpt["recipe"]["distill"]["temperature"] = "hot"
    save_checkpoint(path, ckpt)
    kdc.assert_clean_exit(kdc("report", "runs/tiny"), 0)
    assert (copy / "runs" / "tiny" / "report.html").is_file()


def test_planted_metrics_jsonl_values_of_the_wrong_type_are_left_out_of_the_curve(copy, kdc):
    lines = [
        '{"epoch": 1, "train_loss": "1", "first_batch_loss": "1", "max_batch_loss": [5], "train_accuracy": {}}',
        "[1, 2]",
        '{"epoch": 2, "train_loss": 0.5, "seconds": NaN}',
    ]
    (copy / "runs" / "tiny" / "teacher" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    kdc.assert_clean_exit(kdc("report", "runs/tiny"), 0)
    report = json.loads((copy / "runs" / "tiny" / "report.json").read_text())
    teacher = next(row for row in report["stages"] if row["stage"] == "teacher")
    assert [p["train_loss"] for p in teacher["curve"]] == [None, 0.5]
    assert teacher["curve"][0]["max_batch_loss"] is None and teacher["curve"][1]["seconds"] is None
    assert teacher["train_accuracy"] is None


def test_a_damaged_model_name_in_an_out_of_date_checkpoint_is_refused_not_an_internal_error(copy, kdc):
    path = copy / "runs" / "tiny" / "pruned" / "model.pt"
    ckpt = load_checkpoint(path)
    ckpt["arch"]["model"] = 5
    ckpt["fingerprint"] = "out of date"
    save_checkpoint(path, ckpt)
    result = kdc("report", "runs/tiny")
    kdc.assert_clean_exit(result, 2)
    assert "architecture entry is damaged" in kdc.flat(result)


def test_kdc_report_never_reads_a_teacher_file_outside_the_run_that_its_recipe_yaml_names(copy):
    """/dev/zero would never end: the report says it cannot tell whether the stages are up to date instead."""
    recipe = copy / "runs" / "tiny" / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("checkpoint: null", "checkpoint: /dev/zero"))
    done = subprocess.run(
        [sys.executable, "-m", "kdcompress", "report", "runs/tiny"],
        cwd=copy,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((copy / "runs" / "tiny" / "report.json").read_text())
    assert report["stale_checked"] is False
    assert "teacher.checkpoint /dev/zero, outside the run" in report["stale_check_problem"]
    assert "--trust-code" in report["stale_check_problem"]
