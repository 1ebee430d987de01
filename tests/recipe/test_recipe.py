"""Recipe loading and validation: library (load_recipe/parse_recipe) and `kdc validate`."""

from __future__ import annotations

import pytest
import torch

from kdcompress.errors import RecipeError
from kdcompress.recipe import Recipe, builtin_recipe_path, load_recipe, parse_recipe

# (id, recipe text, key path, YAML line, a fragment of the message)
BAD_RECIPES = [
    (
        "unknown-key",
        "run:\n  name: t\ndistill:\n  epochs: 2\n  temperture: 4\n",
        "distill.temperture",
        5,
        "did you mean 'temperature'",
    ),
    ("unknown-section", "run:\n  name: t\ndistil:\n  epochs: 2\n", "distil", 3, "did you mean 'distill'"),
    ("wrong-type", 'run:\n  name: t\ndistill:\n  epochs: "ten"\n', "distill.epochs", 4, "expected an integer"),
    ("wrong-type-list", "prune:\n  include: fc1\n", "prune.include", 2, "expected a list"),
    ("temperature-0", "distill:\n  temperature: 0\n", "distill.temperature", 2, "must be > 0"),
    ("temperature-neg", "run:\n  name: t\ndistill:\n  temperature: -2\n", "distill.temperature", 4, "must be > 0"),
    ("alpha-neg", "distill:\n  alpha: -0.1\n", "distill.alpha", 2, "must be >= 0"),
    ("alpha-big", "distill:\n  epochs: 1\n  alpha: 1.5\n", "distill.alpha", 3, "<= 1"),
    ("rate-0", "prune:\n  rate: 0\n", "prune.rate", 2, "must be > 0"),
    ("rate-1", "prune:\n  rate: 1\n", "prune.rate", 2, "< 1"),
    ("rate-1.5", "prune:\n  rate: 1.5\n", "prune.rate", 2, "< 1"),
    ("target-1", "prune:\n  target_sparsity: 1.0\n", "prune.target_sparsity", 2, "< 1"),
    ("target-neg", "prune:\n  target_sparsity: -0.1\n", "prune.target_sparsity", 2, ">= 0"),
    ("teacher-epochs-neg", "teacher:\n  epochs: -1\n", "teacher.epochs", 2, ">= 0"),
    ("distill-epochs-neg", "distill:\n  epochs: -3\n", "distill.epochs", 2, ">= 0"),
    ("prune-epochs-neg", "prune:\n  epochs: -1\n", "prune.epochs", 2, ">= 0"),
    ("batch-size-0", "data:\n  dataset: fashion-mnist-mini\n  batch_size: 0\n", "data.batch_size", 3, ">= 1"),
    ("duplicate-key", "run:\n  name: a\nrun:\n  name: b\n", "run", 3, "duplicate key"),
]
BAD_IDS = [case[0] for case in BAD_RECIPES]

SYNTAX_ERROR = "run:\n  name: t\ndistill:\n  temperature: a: b\n"  # line 4: mapping values not allowed
MULTI_PROBLEMS = (
    "run:\n"
    "  name: t\n"
    "distill:\n"
    "  temperture: 4\n"  # line 4
    "  alpha: 2\n"  # line 5
    "data:\n"
    "  batch_size: 0\n"  # line 7
    "prune:\n"
    "  rate: 1.5\n"  # line 9
)


# --------------------------------------------------------------------------- library


@pytest.mark.parametrize("text, path, line, fragment", [c[1:] for c in BAD_RECIPES], ids=BAD_IDS)
def test_parse_recipe_reports_problem_with_path_and_line(text, path, line, fragment):
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, source="bad.yaml")
    problems = info.value.problems
    assert len(problems) == 1, [str(p) for p in problems]
    assert problems[0].path == path
    assert problems[0].line == line
    assert fragment in problems[0].message
    message = str(info.value)
    assert message.startswith("bad.yaml: 1 problem in the recipe")
    assert f"{path} (line {line})" in message


@pytest.mark.parametrize("text, path, line, fragment", [c[1:] for c in BAD_RECIPES], ids=BAD_IDS)
def test_load_recipe_reports_problem_from_file(tmp_path, text, path, line, fragment):
    recipe_file = tmp_path / "bad.yaml"
    recipe_file.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe_file)
    assert info.value.source == str(recipe_file)
    assert f"{path} (line {line})" in str(info.value)
    assert fragment in str(info.value)


def test_yaml_syntax_error_reports_line():
    with pytest.raises(RecipeError) as info:
        parse_recipe(SYNTAX_ERROR, source="broken.yaml")
    (problem,) = info.value.problems
    assert problem.line == 4
    assert "YAML syntax error" in problem.message
    assert "(line 4)" in str(info.value)


def test_yaml_unclosed_quote_reports_the_line_where_it_starts():
    text = 'run:\n  name: "t\ndistill:\n  epochs: 2\n'  # the quote opened on line 2 never closes
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, source="broken.yaml")
    (problem,) = info.value.problems
    assert "YAML syntax error" in problem.message
    assert problem.line == 2 or "line 2" in problem.message


def test_several_problems_reported_at_once():
    with pytest.raises(RecipeError) as info:
        parse_recipe(MULTI_PROBLEMS, source="multi.yaml")
    got = {(p.path, p.line) for p in info.value.problems}
    assert got == {("distill.temperture", 4), ("distill.alpha", 5), ("data.batch_size", 7), ("prune.rate", 9)}
    message = str(info.value)
    assert message.startswith("multi.yaml: 4 problems in the recipe")
    assert "did you mean 'temperature'" in message


def test_top_level_must_be_a_mapping():
    with pytest.raises(RecipeError, match="a recipe is a mapping of sections"):
        parse_recipe("- 1\n- 2\n")


def test_missing_recipe_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(missing)
    with pytest.raises(RecipeError, match="folder"):
        load_recipe(tmp_path)


def test_builtin_default_loads():
    recipe = load_recipe(None)
    assert isinstance(recipe, Recipe)
    assert recipe.run.name == "quickstart"
    assert recipe == load_recipe(builtin_recipe_path("quickstart"))


def test_tiny_recipe_is_valid(tiny_recipe_text):
    recipe = parse_recipe(tiny_recipe_text)
    assert recipe.teacher.args == {"hidden": [64]}
    assert recipe.prune.rate == 0.5 and recipe.prune.target_sparsity == 0.75
    assert recipe.report.latency is False


@pytest.mark.parametrize(
    "override, attr, value",
    [
        ("distill.alpha=0", ("distill", "alpha"), 0.0),
        ("distill.alpha=1", ("distill", "alpha"), 1.0),
        ("prune.target_sparsity=0", ("prune", "target_sparsity"), 0.0),
        ("distill.epochs=0", ("distill", "epochs"), 0),
        ("distill.temperature=0.01", ("distill", "temperature"), 0.01),
        ("data.batch_size=1", ("data", "batch_size"), 1),
    ],
)
def test_boundary_values_are_accepted(tiny_recipe_text, override, attr, value):
    recipe = parse_recipe(tiny_recipe_text, overrides=[override])
    assert getattr(getattr(recipe, attr[0]), attr[1]) == value


def test_recipe_that_sets_nothing_uses_valid_defaults():
    # recipe/__init__.py: "Every key is optional and has a default"
    recipe = parse_recipe("run:\n  name: only-a-name\n")
    assert recipe.run.name == "only-a-name"


# --------------------------------------------------------------------------- --set overrides


def test_override_temperature_becomes_float(tiny_recipe_text):
    recipe = parse_recipe(tiny_recipe_text, overrides=["distill.temperature=2"])
    assert recipe.distill.temperature == 2.0
    assert type(recipe.distill.temperature) is float


def test_override_name_stays_string(tiny_recipe_text):
    recipe = parse_recipe(tiny_recipe_text, overrides=["run.name=007"])
    assert recipe.run.name == "007"
    assert str(recipe.run_dir).endswith("007")


def test_override_unknown_path_suggests(tiny_recipe_text):
    with pytest.raises(RecipeError) as info:
        parse_recipe(tiny_recipe_text, overrides=["distill.temprature=2"])
    assert "did you mean 'temperature'" in str(info.value)
    assert "--set distill.temprature=2" in str(info.value)


def test_override_problem_names_the_override_not_a_file_line(tiny_recipe_text):
    # tiny recipe: 'distill:' section with a valid 'epochs: 2'; the bad value comes from --set
    with pytest.raises(RecipeError) as info:
        parse_recipe(tiny_recipe_text, overrides=["distill.epochs=ten"])
    (problem,) = info.value.problems
    assert "expected an integer" in problem.message
    assert not isinstance(problem.line, int)  # no file line: the value came from the command line
    assert "--set distill.epochs=ten" in str(problem)
    assert "line" not in str(problem)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("distill.epochs=ten", "expected an integer"),
        ("prune.rate=abc", "expected a number"),
        ("student.baseline=maybe", "expected true or false"),
        ("distill.temperature=-1", "must be > 0"),
        ("distill.temperature", "expected KEY.PATH=VALUE"),
    ],
)
def test_override_bad_value_rejected(tiny_recipe_text, override, fragment):
    with pytest.raises(RecipeError) as info:
        parse_recipe(tiny_recipe_text, overrides=[override])
    assert fragment in str(info.value)


# --------------------------------------------------------------------------- CLI: kdc validate / run


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("text, path, line, fragment", [c[1:] for c in BAD_RECIPES], ids=BAD_IDS)
def test_cli_bad_recipe_exit_2_no_traceback_nothing_written(
    kdc, write_recipe, tmp_path, monkeypatch, command, text, path, line, fragment
):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe("bad.yaml", text=text)
    result = kdc(command, recipe)
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    assert f"{path} (line {line})" in out
    assert fragment in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["validate", "run"])
def test_cli_yaml_syntax_error(kdc, write_recipe, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe("broken.yaml", text=SYNTAX_ERROR)
    result = kdc(command, recipe)
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    assert "YAML syntax error" in out and "(line 4)" in out
    assert not (tmp_path / "runs").exists()


def test_cli_several_problems_at_once(kdc, write_recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe("multi.yaml", text=MULTI_PROBLEMS)
    result = kdc("validate", recipe)
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    assert "4 problems" in out
    for where in (
        "distill.temperture (line 4)",
        "distill.alpha (line 5)",
        "data.batch_size (line 7)",
        "prune.rate (line 9)",
    ):
        assert where in out


@pytest.mark.parametrize("command", ["validate", "run"])
def test_cli_missing_recipe_file(kdc, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    result = kdc(command, "does-not-exist.yaml")
    kdc.assert_clean_exit(result, 2)
    assert "recipe file not found" in kdc.flat(result)
    assert not (tmp_path / "runs").exists()


def test_cli_validate_ok(kdc, write_recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe()
    result = kdc("validate", recipe)
    kdc.assert_clean_exit(result, 0)
    out = kdc.flat(result)
    assert "is a valid recipe" in out
    assert "T=4.0" in out  # the plan printed by check_recipe
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cli_validate_warns_when_this_machine_lacks_the_device(kdc, write_recipe, tmp_path, monkeypatch, device):
    monkeypatch.chdir(tmp_path)
    result = kdc("validate", write_recipe(), "--set", f"run.device={device}")
    kdc.assert_clean_exit(result, 0)  # valid: it may be meant for another machine
    out = kdc.flat(result)
    assert "is a valid recipe" in out
    assert "warning: on this machine, run.device: cuda was asked for but no CUDA GPU is available" in out
    assert "warning" not in kdc.flat(kdc("validate", write_recipe()))


def test_cli_set_temperature_converted_to_float(kdc, write_recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = kdc("validate", write_recipe(), "--set", "distill.temperature=2")
    kdc.assert_clean_exit(result, 0)
    assert "T=2.0" in kdc.flat(result)


def test_cli_set_name_stays_string(kdc, write_recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = kdc("validate", write_recipe(), "--set", "run.name=007")
    kdc.assert_clean_exit(result, 0)
    assert "run directory: runs/007" in kdc.flat(result)


def test_cli_set_unknown_path_suggests(kdc, write_recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = kdc("validate", write_recipe(), "--set", "distill.temprature=2")
    kdc.assert_clean_exit(result, 2)
    assert "did you mean 'temperature'" in kdc.flat(result)


@pytest.mark.parametrize("command", ["validate", "run"])
def test_cli_set_bad_value_type(kdc, write_recipe, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    result = kdc(command, write_recipe(), "--set", "distill.epochs=ten")
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    assert "distill.epochs" in out and "expected an integer, got text 'ten'" in out
    assert not (tmp_path / "runs").exists()
