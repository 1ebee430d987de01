"""Several seeds (issue 11, part 1): `kdc run --seeds N` trains the teacher once and every other stage per
seed, keeps each seed's checkpoints, and the report gives each stage's mean and std over the seeds and the
distilled-minus-student difference with its spread."""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
from pathlib import Path

import pytest

from kdcompress.checkpoint import load_checkpoint
from kdcompress.recipe import load_recipe, recipe_to_dict
from kdcompress.report import report_warnings
from kdcompress.run import stage_named

RUN = Path("runs") / "tiny"
SEEDS = (0, 1, 2)
TRAINED = ("student", "distilled", "pruned")


def seed_dir(work: Path, seed: int) -> Path:
    return work / RUN if seed == SEEDS[0] else work / RUN / "seeds" / f"seed-{seed}"


def accuracy(work: Path, seed: int, stage: str) -> float:
    return load_checkpoint(seed_dir(work, seed) / stage / "model.pt")["metrics"]["test_accuracy"]


@pytest.fixture(scope="module")
def seeded(fresh_run, tiny_recipe_text, kdc):
    """The tiny recipe run with --seeds 3, once for this module."""
    work, _ = fresh_run(tiny_recipe_text, "seeds")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        result = kdc("run", "recipe.yaml", "--seeds", "3")
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    return work, result


def test_the_teacher_is_trained_once_and_every_other_stage_per_seed(seeded):
    work, result = seeded
    out = result.output
    assert out.count("teacher: training on") == 1
    for stage in TRAINED:
        assert out.count(f"{stage}: training on") == 3, stage
    for seed in SEEDS:
        for stage in ("teacher", *TRAINED):
            assert (seed_dir(work, seed) / stage / "model.pt").is_file(), (seed, stage)
        assert load_checkpoint(seed_dir(work, seed) / "student" / "model.pt")["recipe"]["run"]["seed"] == seed
    # one teacher, linked into every seed's run directory
    teachers = [(seed_dir(work, s) / "teacher" / "model.pt").read_bytes() for s in SEEDS]
    assert teachers[0] == teachers[1] == teachers[2]
    # the seeds really differ: three students from three initialisations
    students = [(seed_dir(work, s) / "student" / "model.pt").read_bytes() for s in SEEDS]
    assert len(set(students)) == 3


def test_report_gives_each_stage_the_mean_and_std_over_the_seeds(seeded):
    work, result = seeded
    report = json.loads((work / RUN / "report.json").read_text())
    rows = {r["stage"]: r for r in report["stages"]}
    for stage in ("teacher", *TRAINED):
        accs = [accuracy(work, s, stage) for s in SEEDS]
        row = rows[stage]
        assert [e["seed"] for e in row["seeds"]] == list(SEEDS)
        assert [e["accuracy"] for e in row["seeds"]] == pytest.approx(accs)
        assert row["accuracy_mean"] == pytest.approx(statistics.mean(accs))
        assert row["accuracy_std"] == pytest.approx(statistics.stdev(accs))  # sample std, n - 1
    assert rows["teacher"]["trained_once"] and not rows["student"]["trained_once"]
    # the terminal shows mean ± std, and the markdown every number
    assert "mean ± std" in result.output
    md = (work / RUN / "report.md").read_text()
    assert "## Seeds" in md and "| seed 0 | seed 1 | seed 2 | mean | std |" in md
    assert f"{rows['distilled']['accuracy_mean']:.2%}" in md


def test_the_distilled_minus_student_difference_has_its_seed_spread(seeded):
    work, _ = seeded
    report = json.loads((work / RUN / "report.json").read_text())
    (comp,) = [c for c in report["comparisons"] if (c["stage"], c["against"]) == ("distilled", "student")]
    diffs = [accuracy(work, s, "distilled") - accuracy(work, s, "student") for s in SEEDS]
    seeds = comp["seeds"]
    assert seeds["n"] == 3
    assert [d["difference"] for d in seeds["differences"]] == pytest.approx(diffs)
    assert seeds["mean"] == pytest.approx(statistics.mean(diffs))
    assert seeds["std"] == pytest.approx(statistics.stdev(diffs))
    assert seeds["se"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(3))
    assert seeds["mean_above_2se"] == (statistics.mean(diffs) > 2 * statistics.stdev(diffs) / math.sqrt(3))


def test_a_second_run_trains_nothing_and_an_interrupted_seed_goes_on(seeded, tmp_path, kdc, monkeypatch):
    work, _ = seeded
    copy = tmp_path / "copy"
    shutil.copytree(work, copy)
    monkeypatch.chdir(copy)
    result = kdc("run", "recipe.yaml", "--seeds", "3")
    kdc.assert_clean_exit(result, 0)
    assert "training on" not in result.output
    # as if the run had been stopped during the last seed's distillation
    for stage in ("distilled", "pruned"):
        shutil.rmtree(RUN / "seeds" / "seed-2" / stage)
    result = kdc("run", "recipe.yaml", "--seeds", "3")
    kdc.assert_clean_exit(result, 0)
    assert result.output.count("training on") == 2
    assert "distilled: training on" in result.output and "teacher: training on" not in result.output
    # the run directory remembers its seeds: going on from it runs them all again
    result = kdc("run", str(RUN))
    kdc.assert_clean_exit(result, 0)
    assert "training on" not in result.output and "seed 2 (3/3)" in result.output


def test_teacher_seed_leaves_fingerprints_of_earlier_runs_as_they_were(tiny_recipe_text, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(tiny_recipe_text)
    teacher = stage_named("teacher")
    before = teacher.inputs(recipe_to_dict(load_recipe(path)))
    # null (the default) is no input at all: run directories made before teacher.seed existed stay up to date
    assert teacher.inputs(recipe_to_dict(load_recipe(path, ["teacher.seed=null"]))) == before
    assert "teacher.seed" not in before and before["run.seed"] == 0
    # a teacher pinned to seed 0 is the seed-0 teacher, whatever run.seed is; the student is not shared
    pinned = load_recipe(path, ["run.seed=1", "teacher.seed=0"])
    assert teacher.inputs(recipe_to_dict(pinned)) == before
    assert stage_named("student").inputs(recipe_to_dict(pinned))["run.seed"] == 1


def test_distilling_at_another_seed_reuses_a_pinned_teacher(write_recipe, kdc, in_tmp):
    write_recipe()
    kdc.assert_clean_exit(kdc("train-teacher", "recipe.yaml"), 0)
    result = kdc("distill", "recipe.yaml", "--set", "run.seed=1", "--set", "teacher.seed=0")
    kdc.assert_clean_exit(result, 0)
    assert "teacher: training on" not in result.output and "distilled: training on" in result.output
    assert load_checkpoint(RUN / "distilled" / "model.pt")["recipe"]["run"]["seed"] == 1


def test_repeated_seeds_are_a_recipe_error(write_recipe, kdc, in_tmp):
    write_recipe(changes={"run": {"seeds": [0, 0]}})
    result = kdc("run", "recipe.yaml")
    kdc.assert_clean_exit(result, 2)
    assert "run.seeds" in kdc.flat(result) and "must be distinct seeds" in kdc.flat(result)
    assert not (in_tmp / "runs").exists()


def test_the_worse_than_baseline_warning_follows_the_seed_mean():
    def row(stage, acc, mean):
        return {
            "stage": stage,
            "accuracy": acc,
            "accuracy_mean": mean,
            "settings": {},
            "chance_accuracy": None,
            "train_accuracy": None,
            "seeds": [{"seed": 0, "accuracy": acc}, {"seed": 1, "accuracy": acc}],
        }

    seeds = {
        "n": 3,
        "differences": [],
        "mean": 0.004,
        "std": 0.001,
        "se": 0.0006,
        "noise_z": 2.0,
        "mean_above_2se": True,
    }
    comp = {
        "stage": "distilled",
        "against": "student",
        "difference": -0.02,
        "se": 0.005,
        "z": -4.0,
        "within_noise": False,
        "noise_z": 2.0,
        "seeds": seeds,
    }
    report = {
        "run_dir": "runs/x",
        "stages": [row("student", 0.85, 0.85), row("distilled", 0.83, 0.854)],
        "comparisons": [comp],
    }
    # the first seed alone came out worse, beyond noise; the mean over the seeds is better: no warning
    assert not [w for w in report_warnings(report) if "worse than the baseline" in w]
    seeds.update(mean=-0.004)
    (warning,) = [w for w in report_warnings(report) if "worse than the baseline" in w]
    assert "over 3 seeds" in warning and "0.40 points lower" in warning
