"""`kdc sweep` (issue 11, part 4): every grid point runs as its own run directory, stages the points
share are trained once, the points are ranked, and an interrupted sweep goes on where it stopped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kdcompress.run import grid_points, parse_grid, point_name

SWEEP = Path("runs") / "tiny" / "sweep"


@pytest.fixture(scope="module")
def swept(fresh_run, tiny_recipe_text, kdc):
    """The tiny recipe swept over two temperatures, once for this module."""
    work, _ = fresh_run(tiny_recipe_text, "sweep")
    import os

    cwd = os.getcwd()
    os.chdir(work)
    try:
        result = kdc("sweep", "recipe.yaml", "--grid", "distill.temperature=2,4")
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    return work, result


def test_every_point_is_a_run_directory_and_shared_stages_train_once(swept):
    work, result = swept
    out = result.output
    assert out.count("teacher: training on") == 1 and out.count("student: training on") == 1
    assert out.count("distilled: training on") == 2 and out.count("pruned: training on") == 2
    for name in ("temperature-2", "temperature-4"):
        for stage in ("teacher", "student", "distilled", "pruned"):
            assert (work / SWEEP / name / stage / "model.pt").is_file()
    # the shared teacher is the same file, not a second training run
    t2, t4 = (work / SWEEP / n / "teacher" / "model.pt" for n in ("temperature-2", "temperature-4"))
    assert t2.read_bytes() == t4.read_bytes()


def test_the_ranked_table_lists_each_point_best_distilled_first(swept):
    work, _ = swept
    data = json.loads((work / SWEEP / "sweep.json").read_text())
    points = data["points"]
    assert [p["settings"]["distill.temperature"] for p in points] in (["2", "4"], ["4", "2"])
    assert points[0]["distilled"] >= points[1]["distilled"]
    for p in points:
        assert p["distilled_minus_student"] == pytest.approx(p["distilled"] - p["student"])
        assert p["student"] == points[0]["student"]  # one baseline, shared
    md = (work / SWEEP / "sweep.md").read_text()
    assert "| 1 |" in md and "| 2 |" in md and "distilled - student" in md


def test_a_second_run_trains_nothing_and_an_interrupted_point_goes_on(swept, tmp_path, kdc, monkeypatch):
    work, _ = swept
    copy = tmp_path / "copy"
    shutil.copytree(work, copy)
    monkeypatch.chdir(copy)
    result = kdc("sweep", "recipe.yaml", "--grid", "distill.temperature=2,4")
    kdc.assert_clean_exit(result, 0)
    assert "training on" not in result.output
    # as if the sweep had been stopped during the second point's distillation
    for stage in ("distilled", "pruned"):
        shutil.rmtree(SWEEP / "temperature-4" / stage)
    result = kdc("sweep", "recipe.yaml", "--grid", "distill.temperature=2,4")
    kdc.assert_clean_exit(result, 0)
    assert result.output.count("training on") == 2
    assert "distilled: training on" in result.output and "teacher: training on" not in result.output


def test_a_point_is_an_ordinary_run_directory_for_kdc_report(swept, kdc, tmp_path):
    work, _ = swept
    copy = tmp_path / "point"
    shutil.copytree(work / SWEEP / "temperature-2", copy)
    result = kdc("report", str(copy))
    kdc.assert_clean_exit(result, 0)
    assert "distilled" in result.output


def test_bad_grids_are_refused_before_anything_trains(write_recipe, kdc, in_tmp):
    write_recipe()
    for grid, message in (
        ("distill.temperature", "expected KEY.PATH=V1,V2"),
        ("distill.temprature=1,2", "distill.temprature"),
        ("distill.temperature=1,x", "distill.temperature"),
    ):
        result = kdc("sweep", "recipe.yaml", "--grid", grid)
        kdc.assert_clean_exit(result, 2)
        assert message in kdc.flat(result)
    assert not Path("runs").exists() and sorted(p.name for p in Path(".").iterdir()) == ["recipe.yaml"]


def test_grid_helpers():
    grid = parse_grid(["distill.temperature=1,2", "distill.alpha=0.5,0.9"])
    points = grid_points(grid)
    assert points[0] == ["distill.temperature=1", "distill.alpha=0.5"] and len(points) == 4
    assert point_name(points[-1]) == "temperature-2_alpha-0.9"


def test_four_points_by_two_seeds_train_the_teacher_once(fresh_run, tiny_recipe_text, kdc, monkeypatch):
    """The issue's acceptance: 4 points x 2 seeds, one teacher; the baseline once per seed; means and SE."""
    work, _ = fresh_run(tiny_recipe_text, "sweep-seeds")
    monkeypatch.chdir(work)
    grid = ["--grid", "distill.temperature=2,4", "--grid", "distill.alpha=0.5,0.9"]
    result = kdc("sweep", "recipe.yaml", *grid, "--seeds", "2")
    kdc.assert_clean_exit(result, 0)
    out = result.output
    assert out.count("teacher: training on") == 1
    assert out.count("student: training on") == 2  # one baseline per seed, shared by the four points
    assert out.count("distilled: training on") == 8 and out.count("pruned: training on") == 8
    points = json.loads((SWEEP / "sweep.json").read_text())["points"]
    assert len(points) == 4
    teachers = set()
    for p in points:
        assert p["seeds"] == 2 and p["distilled_seeds"] == [0, 1]
        run_dir = Path(p["run_dir"])
        per_seed = {}
        for seed, folder in ((0, run_dir), (1, run_dir / "seeds" / "seed-1")):
            for stage in ("teacher", "student", "distilled"):
                path = folder / stage / "model.pt"
                assert path.is_file()
                per_seed[seed, stage] = torch.load(path, weights_only=True)["metrics"]["test_accuracy"]
            teachers.add((folder / "teacher" / "model.pt").read_bytes())
        diffs = [per_seed[s, "distilled"] - per_seed[s, "student"] for s in (0, 1)]
        assert p["distilled_minus_student"] == pytest.approx(sum(diffs) / 2)
        assert p["distilled_minus_student_se"] == pytest.approx(abs(diffs[0] - diffs[1]) / 2)
        assert p["distilled"] == pytest.approx((per_seed[0, "distilled"] + per_seed[1, "distilled"]) / 2)
    assert len(teachers) == 1
    md = (SWEEP / "sweep.md").read_text()
    assert "Mean over 2 seeds" in md and "±" in md
    # run again: everything is up to date
    again = kdc("sweep", "recipe.yaml", *grid, "--seeds", "2")
    kdc.assert_clean_exit(again, 0)
    assert "training on" not in again.output


def test_a_sweep_over_another_grid_keeps_the_earlier_points_in_the_table(swept, tmp_path, kdc, monkeypatch):
    work, _ = swept
    copy = tmp_path / "copy"
    shutil.copytree(work, copy)
    monkeypatch.chdir(copy)
    result = kdc("sweep", "recipe.yaml", "--grid", "distill.alpha=0.9")
    kdc.assert_clean_exit(result, 0)
    data = json.loads((SWEEP / "sweep.json").read_text())
    assert sorted(p["point"] for p in data["points"]) == ["alpha-0.9", "temperature-2", "temperature-4"]
    assert list(data["grid"]) == ["distill.alpha", "distill.temperature"]
    md = (SWEEP / "sweep.md").read_text()
    assert "| 3 |" in md and "temperature-4" in md and "alpha-0.9" in md
    # a point folder that was deleted leaves the table at the next sweep
    shutil.rmtree(SWEEP / "temperature-4")
    kdc.assert_clean_exit(kdc("sweep", "recipe.yaml", "--grid", "distill.alpha=0.9"), 0)
    points = json.loads((SWEEP / "sweep.json").read_text())["points"]
    assert sorted(p["point"] for p in points) == ["alpha-0.9", "temperature-2"]


def test_the_one_seed_noise_note_quotes_the_real_standard_error():
    import math

    from kdcompress.run.sweep import sweep_markdown

    row = {
        "point": "temperature-2",
        "settings": {"distill.temperature": "2"},
        "run_dir": "runs/tiny/sweep/temperature-2",
        "student": 0.84,
        "distilled": 0.85,
        "student_test_samples": 2000,
        "distilled_test_samples": 2000,
        "distilled_minus_student": 0.01,
    }
    md = sweep_markdown([row], [("distill.temperature", ["2"])])
    se = math.sqrt(0.85 * 0.15 / 2000 + 0.84 * 0.16 / 2000) * 100
    assert f"standard error of up to {se:.2f} points" in md, md
    assert f"within {2 * se:.2f} points can be noise" in md
    assert "a few tenths of a point" not in md  # the old guess: 1.6 points here
