"""Issue 17, rows 4, 6 and 11: YAML alias bombs, run.name outside out_dir, and results that mean nothing.

A recipe (or a run directory's recipe.yaml, or a --set value) whose aliases expand it a billionfold is refused
with exit 2 before anything that size is built; run.name is one folder inside run.out_dir; a stage trained 0
epochs, a teacher at chance and a loss that exploded are warned about in the terminal and in report.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import TINY_RECIPE, _deep_merge, kdc_in_child

from kdcompress.errors import RecipeError
from kdcompress.recipe import parse_recipe, recipe_from_dict, recipe_to_dict
from kdcompress.report import report_warnings

LEVELS = "abcdefghi"  # nine levels of nine aliases each: 9**9 (387 million) leaves once expanded


def _bomb_lines(indent: str, sep: str) -> list[str]:
    lines = [f"{indent}a: &a [" + sep.join(["lol"] * 9) + "]"]
    for before, level in zip(LEVELS, LEVELS[1:]):
        lines.append(f"{indent}{level}: &{level} [" + sep.join([f"*{before}"] * 9) + "]")
    return lines


# 478 bytes: the bomb as a model's arguments inside an otherwise ordinary recipe
BOMB_IN_ARGS = "\n".join(["run: {name: xy}", "teacher:", "  model: mlp", "  args:", *_bomb_lines("    ", ", ")]) + "\n"
# 368 bytes: the bomb as top-level keys
BOMB_AT_TOP = "# a billion laughs: 9 levels of 9 aliases.\n\n" + "\n".join(_bomb_lines("", ",")) + "\n"

# the same through merge keys (<<): PyYAML builds it small, but a walk of the tree visits i's 9**8 merged copies
BOMB_BY_MERGES = "teacher:\n  args:\n    a: &a {x: 1, y: 2, z: 3}\n" + "".join(
    f"    {level}: &{level} {{<<: [" + ", ".join([f"*{before}"] * 9) + "]}\n"
    for before, level in zip(LEVELS, LEVELS[1:])
)


@pytest.mark.parametrize(
    "text,size",
    [(BOMB_IN_ARGS, 478), (BOMB_AT_TOP, 368), (BOMB_BY_MERGES, 470)],
    ids=["in-args", "at-top", "merge-keys"],
)
def test_a_yaml_alias_bomb_is_refused_with_exit_2_under_1_gb_peak_rss(tmp_path, text, size):
    assert len(text.encode()) == size
    (tmp_path / "bomb.yaml").write_text(text, encoding="utf-8")
    result = kdc_in_child("validate", "bomb.yaml", cwd=tmp_path)
    assert result["rc"] == 2, result["output"]
    assert "too big for a recipe" in result["output"] and "alias" in result["output"]
    assert "(line " in result["output"]
    assert "Traceback" not in result["output"]
    assert result["max_rss_kb"] < 1024 * 1024, f"peak RSS {result['max_rss_kb'] / 1024:.0f} MiB"


def test_the_refusal_names_the_first_key_that_expands_too_far_with_its_line():
    with pytest.raises(RecipeError) as caught:
        parse_recipe(BOMB_IN_ARGS)
    (problem,) = caught.value.problems
    # a: 37 values and characters, b: 334, c: 3,007, d: 27,064, e: 243,577 > 100,000
    assert (problem.path, problem.line) == ("teacher.args.e", 9)


def test_an_alias_bomb_in_a_set_value_is_refused():
    value = "{" + ", ".join(_bomb_lines("", ",")) + "}"
    with pytest.raises(RecipeError) as caught:
        parse_recipe("", overrides=[f"teacher.args={value}"])
    (problem,) = caught.value.problems
    assert problem.path.startswith("--set teacher.args=") and "too big for a recipe" in problem.message


def test_an_alias_inside_the_value_it_names_is_refused_with_its_line():
    with pytest.raises(RecipeError) as caught:
        parse_recipe("run: {name: loop}\nteacher:\n  args: &me {hidden: [64], again: [*me]}\n")
    (problem,) = caught.value.problems
    assert problem.path == "teacher.args.again.0" and problem.line == 3
    assert "contain itself" in problem.message


def test_a_recipe_dict_whose_parts_are_shared_a_billion_times_over_is_refused():
    # what a checkpoint's pickled recipe can hold: the same list object nine times at each of nine levels
    level: list = ["lol"] * 9
    for _ in range(8):
        level = [level] * 9
    data = _deep_merge(TINY_RECIPE, {})
    data["teacher"]["args"] = {"hidden": [64], "bomb": level}
    with pytest.raises(RecipeError) as caught:
        recipe_from_dict(data, source="teacher/model.pt")
    assert "teacher.args.bomb" in str(caught.value) and "too big for a recipe" in str(caught.value)


ORDINARY_ALIASES = """\
run: {name: aliases, device: cpu}
teacher:
  model: mlp
  args: &net {hidden: [64]}
  epochs: 2
  lr: &lr 0.1
student:
  model: mlp
  args: *net
distill: &train
  epochs: 2
  lr: *lr
prune:
  <<: *train
  rate: 0.5
  target_sparsity: 0.75
  every: 0.5
report: {latency: false}
"""


def test_a_recipe_with_ordinary_anchors_and_aliases_still_validates(tmp_path, kdc):
    path = tmp_path / "aliases.yaml"
    path.write_text(ORDINARY_ALIASES, encoding="utf-8")
    kdc.assert_clean_exit(kdc("validate", path), 0)
    recipe = parse_recipe(ORDINARY_ALIASES)
    assert (recipe.teacher.lr, recipe.distill.lr, recipe.prune.lr, recipe.prune.epochs) == (0.1, 0.1, 0.1, 2)
    assert recipe.student.args == {"hidden": [64]}
    assert yaml.safe_load(yaml.safe_dump(recipe_to_dict(recipe)))["student"]["args"] == {"hidden": [64]}


def test_a_set_on_an_aliased_section_changes_that_section_alone():
    recipe = parse_recipe(ORDINARY_ALIASES, overrides=["teacher.args.hidden=[128]"])
    assert recipe.teacher.args == {"hidden": [128]} and recipe.student.args == {"hidden": [64]}


# --------------------------------------------------------------------------- run.name


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


BAD_NAMES = [
    ("../../escape", "is a path"),
    ("ABSOLUTE", "is a path"),
    ("..", "the folder above run.out_dir"),
    (".", "run.out_dir itself"),
    ("", "is empty"),
    ("runs\\..\\..\\escape", "is a path"),
    ("tab\there", "control character"),
]


@pytest.mark.parametrize("name,why", BAD_NAMES, ids=[n for n, _ in BAD_NAMES])
def test_a_run_name_that_is_not_one_plain_folder_is_refused_from_set_and_nothing_is_written(
    tmp_path, monkeypatch, kdc, write_recipe, name, why
):
    work = tmp_path / "work"
    recipe = write_recipe(where=work)
    monkeypatch.chdir(work)
    name = str(tmp_path / "elsewhere") if name == "ABSOLUTE" else name
    before = _listing(tmp_path)
    result = kdc("run", recipe, "--set", f"run.name={name}")
    kdc.assert_clean_exit(result, 2)
    flat = kdc.flat(result)
    assert f"run.name (from --set run.name={' '.join(name.split())})" in flat
    assert why in flat and "use run.out_dir to put runs elsewhere" in flat
    assert _listing(tmp_path) == before


@pytest.mark.parametrize(
    "name,why",
    [("../escape", "is a path"), ("nul\x00byte", "control character"), ("ABSOLUTE", "is a path")],
    ids=["climbing", "nul", "absolute"],
)
def test_a_run_name_that_is_not_one_plain_folder_is_refused_in_the_recipe_with_its_line(
    tmp_path, monkeypatch, kdc, name, why
):
    name = str(tmp_path / "elsewhere") if name == "ABSOLUTE" else name
    text = yaml.safe_dump(_deep_merge(TINY_RECIPE, {"run": {"name": name}}), sort_keys=False)
    assert text.splitlines()[1].startswith("  name: ")
    (tmp_path / "recipe.yaml").write_text(text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    before = _listing(tmp_path)
    result = kdc("run", "recipe.yaml")
    kdc.assert_clean_exit(result, 2)
    flat = kdc.flat(result)
    assert "run.name (line 2)" in flat and why in flat
    assert _listing(tmp_path) == before


def test_a_resolved_recipe_with_a_climbing_run_name_is_refused():
    data = _deep_merge(TINY_RECIPE, {"run": {"name": "../../escape"}})
    with pytest.raises(RecipeError, match="run.name"):
        recipe_from_dict(data)


# --------------------------------------------------------------------------- results that mean nothing


@pytest.fixture(scope="module")
def zero_epoch_run(fresh_run):
    """A tiny run in which no stage trains (pruning kept at 0 %, which needs no retraining)."""
    text = yaml.safe_dump(
        _deep_merge(
            TINY_RECIPE,
            {
                "run": {"name": "zero"},
                "teacher": {"epochs": 0},
                "distill": {"epochs": 0},
                "prune": {"epochs": 0, "target_sparsity": 0.0},
            },
        ),
        sort_keys=False,
    )
    work, result = fresh_run(text, "zero", "run")
    return work, result


def test_stages_trained_0_epochs_are_warned_about_in_the_terminal_and_in_report_json(zero_epoch_run, kdc):
    work, result = zero_epoch_run
    warnings = json.loads((work / "runs" / "zero" / "report.json").read_text())["warnings"]
    for stage, key in (("teacher", "teacher"), ("student", "distill"), ("distilled", "distill"), ("pruned", "prune")):
        (found,) = [w for w in warnings if w.startswith(f"{stage}: trained 0 epochs")]
        assert f"({key}.epochs: 0)" in found and f"--set {key}.epochs=" in found
    flat = kdc.flat(result)
    assert "warning: teacher: trained 0 epochs (teacher.epochs: 0)" in flat
    assert "warning: pruned: trained 0 epochs (prune.epochs: 0)" in flat


def test_a_run_directory_still_runs_by_its_path_with_its_name_as_run_name(zero_epoch_run, kdc, monkeypatch):
    work, _ = zero_epoch_run
    monkeypatch.chdir(work)
    result = kdc("run", "runs/zero")  # cli._load passes run.name=zero, run.out_dir=<work>/runs
    kdc.assert_clean_exit(result, 0)
    assert "warning: teacher: trained 0 epochs" in kdc.flat(result)


def test_a_planted_alias_bomb_recipe_yaml_in_a_run_directory_is_refused_by_kdc_report_under_1_gb(
    zero_epoch_run, tmp_path
):
    work, _ = zero_epoch_run
    run = tmp_path / "zero"
    shutil.copytree(work / "runs" / "zero", run)
    (run / "recipe.yaml").write_text(BOMB_IN_ARGS, encoding="utf-8")
    result = kdc_in_child("report", str(run), "--format", "json", cwd=tmp_path)
    assert result["rc"] == 0, result["output"]
    (warning,) = [w for w in json.loads((run / "report.json").read_text())["warnings"] if "up to date" in w]
    assert "recipe.yaml does not load" in warning and "too big for a recipe" in warning
    assert result["max_rss_kb"] < 1024 * 1024, f"peak RSS {result['max_rss_kb'] / 1024:.0f} MiB"


def test_an_exploding_loss_is_warned_about_though_each_epoch_mean_fell(fresh_run, kdc):
    text = yaml.safe_dump(
        _deep_merge(
            TINY_RECIPE,
            {
                "run": {"name": "diverged"},
                "teacher": {"optimizer": "adam", "lr": 1e6},
            },
        ),
        sort_keys=False,
    )
    work, result = fresh_run(text, "diverged", "train-teacher")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        result = kdc("report", "runs/diverged")
    kdc.assert_clean_exit(result, 0)
    report = json.loads((work / "runs" / "diverged" / "report.json").read_text())
    (found,) = [w for w in report["warnings"] if "training loss grew" in w]
    assert found.startswith("teacher:") and "teacher.lr (1e+06 with adam" in found
    assert "warning: teacher: its training loss grew" in kdc.flat(result)
    curve = report["stages"][0]["curve"]
    assert curve[0]["first_batch_loss"] < 10 < 1e12 < max(p["max_batch_loss"] for p in curve)


def test_a_normal_tiny_run_gets_none_of_these_warnings(fresh_run):
    text = yaml.safe_dump(_deep_merge(TINY_RECIPE, {"run": {"name": "normal"}}), sort_keys=False)
    work, result = fresh_run(text, "normal", "run")
    report = json.loads((work / "runs" / "normal" / "report.json").read_text())
    assert not [w for w in report["warnings"] if "0 epochs" in w or "at chance" in w or "loss grew" in w]
    assert all(p["first_batch_loss"] > 0 for row in report["stages"] for p in row["curve"])


def _row(**extra) -> dict:
    row = {
        "stage": "teacher",
        "accuracy": 0.1,
        "test_samples": 2000,
        "num_classes": 10,
        "chance_accuracy": 0.1,
        "train_accuracy": 0.1,
        "has_batchnorm": False,
        "epochs": 8,
        "settings": {"lr": 0.05, "epochs": 8},
        "curve": [],
    }
    return {**row, **extra}


def test_a_teacher_at_chance_is_warned_about_and_a_supplied_one_names_its_file():
    (warning,) = report_warnings({"stages": [_row()], "comparisons": []})
    assert warning.startswith("teacher: test accuracy 10.0% is at chance") and "nothing to teach" in warning
    supplied = {"supplied_from": "/models/t.pt", "epochs": 0}  # teacher.checkpoint: 0 epochs here is right
    (warning,) = report_warnings({"stages": [_row(epochs=0, settings=supplied)], "comparisons": []})
    assert "teacher.checkpoint (/models/t.pt)" in warning and "0 epochs" not in warning
    assert report_warnings({"stages": [_row(epochs=0, accuracy=0.9, settings=supplied)], "comparisons": []}) == []


def test_distillation_worse_than_baseline_from_a_teacher_at_chance_says_fix_the_teacher_not_the_temperature():
    stages = [
        _row(),  # the teacher at chance
        _row(stage="student", accuracy=0.8, chance_accuracy=None),
        _row(stage="distilled", accuracy=0.5, chance_accuracy=None),
    ]
    comparison = {
        "stage": "distilled",
        "against": "student",
        "difference": -0.3,
        "se": 0.01,
        "z": -30.0,
        "within_noise": False,
        "noise_z": 2.0,
    }
    warning = report_warnings({"stages": stages, "comparisons": [comparison]})[-1]
    assert warning.startswith("distillation came out worse") and "fix the teacher first" in warning, warning
    assert "distill.temperature" not in warning
    stages[0] = _row(accuracy=0.9)  # a teacher that learned: the usual advice
    warning = report_warnings({"stages": stages, "comparisons": [comparison]})[-1]
    assert "try another distill.temperature" in warning, warning
