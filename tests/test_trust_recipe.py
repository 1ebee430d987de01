"""Issue 17, rows 4 and 6: YAML alias bombs, run.name outside out_dir.

A recipe (or a run directory's recipe.yaml, or a --set value) whose aliases expand it a billionfold is refused
with exit 2 before anything that size is built; run.name is one folder inside run.out_dir.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import kdcompress
from kdcompress.errors import RecipeError
from kdcompress.recipe import parse_recipe, recipe_from_dict, recipe_to_dict

from conftest import TINY_RECIPE, _deep_merge

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

# Run in a child process: RUSAGE_CHILDREN then holds that child's peak RSS alone. The address-space cap only
# keeps a regression from taking the machine down with it (the code before the fix passed 11 GB).
_MEASURE = """
import json, resource, subprocess, sys
cap = 8 << 30
done = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=600,
                      preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap)))
print(json.dumps({"rc": done.returncode, "output": done.stdout + done.stderr,
                  "max_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def _kdc_in_child(*args: str, cwd: Path) -> dict:
    """``kdc ARGS`` in a child process: its exit code, its output and its peak RSS in KiB."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(kdcompress.__file__).resolve().parents[1])] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    ))
    done = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable, "-m", "kdcompress", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@pytest.mark.parametrize("text", [BOMB_IN_ARGS, BOMB_AT_TOP], ids=["478-byte-in-args", "368-byte-at-top"])
def test_a_yaml_alias_bomb_is_refused_with_exit_2_under_1_gb_peak_rss(tmp_path, text):
    assert len(text.encode()) in (478, 368)
    (tmp_path / "bomb.yaml").write_text(text, encoding="utf-8")
    result = _kdc_in_child("validate", "bomb.yaml", cwd=tmp_path)
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


@pytest.mark.parametrize("name,why", [("../escape", "is a path"), ("nul\x00byte", "control character"),
                                      ("ABSOLUTE", "is a path")], ids=["climbing", "nul", "absolute"])
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
