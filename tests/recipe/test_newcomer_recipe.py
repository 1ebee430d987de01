"""A newcomer's first hour with recipes (issue 8): what people write first should work, or say how to fix it.

Student models without args, run directories named after the recipe file, YAML
numbers like ``5e-2``, every problem (model and dataset names included) in one
``kdc validate``, hints for keys carried over from other tools, and a user's own
module beside the recipe found without ``PYTHONPATH``.
"""

from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from kdcompress import models
from kdcompress.errors import ModelError, RecipeError
from kdcompress.names import model_name_problem, saved_import_dirs
from kdcompress.recipe import StudentSection, builtin_recipe_path, load_recipe, parse_recipe
from kdcompress.run import check_recipe


def _problems(text: str, overrides=None) -> list:
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, source="r.yaml", overrides=overrides)
    return info.value.problems


# --------------------------------------------------------------------------- 1. student args belong to the model


def test_student_section_has_no_model_arguments_of_its_own():
    assert StudentSection().args == {}
    recipe = parse_recipe("student: {model: mlp}\n")  # the MLP's own default stays 784-100-10
    net = models.build_model(models.model_spec(recipe.student.model, recipe.student.args, 10, (1, 28, 28)))
    assert [m.out_features for m in net.modules() if isinstance(m, torch.nn.Linear)] == [100, 10]


@pytest.mark.parametrize("model", ["cnn", "lenet5", "torchvision:resnet18", "torchvision:squeezenet1_1"])
def test_student_model_without_args_validates_with_its_own_defaults(model):
    recipe = parse_recipe(f"student: {{model: '{model}'}}\nreport: {{latency: false}}\n")
    assert recipe.student.args == {}
    plan = check_recipe(recipe)  # builds the student and runs a dry forward pass
    assert any(line.startswith(f"student: {model} (") for line in plan)


# --------------------------------------------------------------------------- 4. run.name from the file name


def test_run_name_defaults_to_the_recipe_file_name(tmp_path):
    path = tmp_path / "cifar-small.yaml"
    path.write_text("distill: {epochs: 1}\n")
    recipe = load_recipe(path)
    assert recipe.run.name == "cifar-small"
    assert recipe.run_dir == Path("runs") / "cifar-small"
    # an explicit run.name, or one from --set, still wins
    assert load_recipe(path, overrides=["run.name=other"]).run.name == "other"
    path.write_text("run: {name: mine}\n")
    assert load_recipe(path).run.name == "mine"
    assert load_recipe(path, overrides=["run.name=other"]).run.name == "other"


def test_builtin_and_text_recipes_keep_quickstart_or_take_a_default_name():
    assert load_recipe(None).run.name == "quickstart"
    assert load_recipe(builtin_recipe_path()).run.name == "quickstart"
    assert parse_recipe("distill: {epochs: 1}\n").run.name == "quickstart"
    assert parse_recipe("distill: {epochs: 1}\n", default_name="exp1").run.name == "exp1"
    assert parse_recipe("run: {name: a}\n", default_name="exp1").run.name == "a"


@pytest.mark.parametrize(
    "file_name, run_name",
    [("my recipe (v2).yaml", "my-recipe-v2"), ("..yaml", "run"), ("-x-.yml", "x"), ("a.b.yaml", "a.b")],
)
def test_a_file_name_that_is_no_plain_folder_name_is_made_one(tmp_path, file_name, run_name):
    path = tmp_path / file_name
    path.write_text("distill: {epochs: 1}\n")
    assert load_recipe(path).run.name == run_name


def test_validate_shows_the_run_directory_named_after_the_file(kdc, in_tmp, write_recipe):
    write_recipe("fashion-small.yaml", text="teacher: {model: mlp, epochs: 1}\nreport: {latency: false}\n")
    result = kdc("validate", "fashion-small.yaml")
    kdc.assert_clean_exit(result, 0)
    assert "run directory: runs/fashion-small" in kdc.flat(result)


def test_report_message_says_where_runs_go(kdc, in_tmp):
    result = kdc("report", "runs/nothing-here")
    kdc.assert_clean_exit(result, 2)  # a path that names nothing: bad input, as other usage errors
    out = kdc.flat(result)
    assert "<recipe name>" not in out
    assert "run.name" in out and "recipe file's name without .yaml" in out


# --------------------------------------------------------------------------- 5. YAML numbers in exponent form


@pytest.mark.parametrize(
    "text, section, key, value",
    [
        ("teacher: {lr: 5e-2}", "teacher", "lr", 0.05),
        ("distill: {lr: 1e3}", "distill", "lr", 1000.0),
        ("distill: {lr: 1.0e3}", "distill", "lr", 1000.0),
        ("prune: {lr: 2.5E4}", "prune", "lr", 25000.0),
        ("prune: {lr: 1E-2}", "prune", "lr", 0.01),
        ("teacher: {epochs: 1e1}", "teacher", "epochs", 10),
        ("distill: {alpha: .5, lr: +1e-1}", "distill", "alpha", 0.5),
    ],
)
def test_exponent_floats_in_yaml_are_numbers(text, section, key, value):
    recipe = parse_recipe(text + "\n")
    assert getattr(getattr(recipe, section), key) == value


def test_negative_exponent_float_is_read_as_a_number_then_range_checked():
    (problem,) = _problems("distill:\n  weight_decay: -2.5E-4\n")
    assert problem.path == "distill.weight_decay" and problem.line == 2
    assert "must be >= 0.0, got -0.00025" in problem.message
    (problem,) = _problems("distill:\n  weight_decay: -.5\n")
    assert "got -0.5" in problem.message


def test_exponent_floats_inside_model_args_and_set_values_are_numbers():
    recipe = parse_recipe("teacher: {args: {dropout: 1e-1}}\n")
    assert recipe.teacher.args == {"dropout": 0.1}
    recipe = parse_recipe("", overrides=["teacher.args={dropout: 1e-1}", "teacher.lr=1e-3"])
    assert recipe.teacher.args == {"dropout": 0.1} and recipe.teacher.lr == 0.001


def test_exponent_floats_through_kdc_validate(kdc, in_tmp, write_recipe):
    import yaml

    write_recipe(text="run: {name: t}\nteacher: {model: mlp, lr: 5e-2, epochs: 1}\nreport: {latency: false}\n")
    kdc.assert_clean_exit(kdc("validate", "recipe.yaml"), 0)
    assert yaml.safe_load("x: 5e-2") == {"x": "5e-2"}  # kdc's loader is a subclass: PyYAML's own is left alone


# --------------------------------------------------------------------------- 6. every problem in one pass

SIX_PROBLEMS = textwrap.dedent(
    """\
    run:
      name: six
    teacher:
      model: cnnn
      epoch: 3
    student:
      model: mpl
      hiden: [32]
    distill:
      temperture: 4
    prune:
      rate: 1.5
    """
)


def test_key_problems_and_model_name_typos_in_one_validate(kdc, in_tmp, write_recipe):
    write_recipe("six.yaml", text=SIX_PROBLEMS)
    result = kdc("validate", "six.yaml")
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    assert "6 problems" in out
    for where, what in [
        ("teacher.model (line 4)", "unknown model 'cnnn'; did you mean 'cnn'?"),
        ("teacher.epoch (line 5)", "unknown key; did you mean 'epochs'?"),
        ("student.model (line 7)", "unknown model 'mpl'; did you mean 'mlp'?"),
        ("student.hiden (line 8)", "unknown key"),
        ("distill.temperture (line 10)", "unknown key; did you mean 'temperature'?"),
        ("prune.rate (line 12)", "must be > 0.0 and < 1.0"),
    ]:
        assert f"{where}: {what}" in out, (where, out)
    assert out.index("(line 4)") < out.index("(line 5)") < out.index("(line 12)")  # in file order
    assert not (in_tmp / "runs").exists()


def test_dataset_and_import_path_problems_come_with_their_lines(tmp_path):
    text = textwrap.dedent(
        f"""\
        data:
          dataset: imagefolder:{tmp_path / "no-such-folder"}
          batch_size: 0
        teacher:
          model: os.path:nosuchfactory
        student:
          model: torchvision:resnet1800
        """
    )
    got = {p.path: p for p in _problems(text)}
    assert set(got) == {"data.dataset", "data.batch_size", "teacher.model", "student.model"}
    assert got["data.dataset"].line == 2 and "needs" in got["data.dataset"].message
    assert got["teacher.model"].line == 5 and "has no attribute 'nosuchfactory'" in got["teacher.model"].message
    assert got["student.model"].line == 7 and "no classification model 'resnet1800'" in got["student.model"].message
    (problem,) = _problems("data: {dataset: fashion-mnst}\n")
    assert problem.line == 1 and "did you mean 'fashion-mnist'" in problem.message


def test_model_name_from_set_names_the_override():
    (problem,) = _problems("", overrides=["student.model=mpl"])
    assert problem.path == "student.model" and problem.line == "--set student.model=mpl"
    assert "did you mean 'mlp'" in problem.message


def test_name_checks_share_the_messages_of_building():
    with pytest.raises(ModelError) as info:
        models.build_model(models.model_spec("mpl", {}, 10, (1, 28, 28)), where="student.model")
    assert str(info.value) == f"student.model: {model_name_problem('mpl')}"


def test_check_recipe_reports_teacher_and_student_failures_together():
    recipe = parse_recipe(
        "teacher: {model: mlp, args: {hidden: [many]}}\nstudent: {model: cnn, args: {chanels: [8]}}\n"
    )
    with pytest.raises(ModelError) as info:
        check_recipe(recipe)
    message = str(info.value)
    assert "2 problems with the models" in message
    assert "teacher.model: building 'mlp'" in message
    assert "student.model.args: cnn does not take 'chanels'; did you mean 'channels'" in message


# --------------------------------------------------------------------------- 7. hints for what people write

TRAINING_HINT = ["teacher.epochs", "distill.epochs (which also trains the student baseline)", "prune.epochs"]


HINT_CASES = [
    ("teacher", "learning_rate", ["did you mean 'lr'?", "known keys: epochs, optimizer, lr"]),
    ("run", "epochs", TRAINING_HINT),
    ("student", "epochs", TRAINING_HINT),
    ("teacher", "lr_schedule", ["did you mean 'schedule'?"]),
    ("distill", "num_epochs", ["did you mean 'epochs'?"]),
    ("distill", "T", ["did you mean 'temperature'?"]),
    ("distill", "temp", ["did you mean 'temperature'?"]),
    ("teacher", "wd", ["did you mean 'weight_decay'?"]),
    ("prune", "amount", ["did you mean 'rate'?"]),
    ("teacher", "batch_size", ["'batch_size' belongs in data.batch_size"]),
    ("distill", "bs", ["did you mean 'batch_size'?", "data.batch_size"]),
    ("teacher", "arch", ["did you mean 'model'?"]),
    ("student", "temperature", ["'temperature' belongs in distill.temperature"]),
]
HAD_A_HINT_IN_FILES = {("teacher", "lr_schedule"), ("distill", "num_epochs")}  # difflib found these; --set did not


@pytest.mark.parametrize(
    "section, key, fragments, via",
    [
        pytest.param(*case, via, id=f"{via}-{case[0]}.{case[1]}")
        for via in ("file", "set")
        for case in HINT_CASES
        if not (via == "file" and case[:2] in HAD_A_HINT_IN_FILES)
    ],
)
def test_keys_people_write_get_a_hint(section, key, fragments, via):
    if via == "file":
        (problem,) = _problems(f"{section}:\n  {key}: 3\n")
        assert problem.path == f"{section}.{key}" and problem.line == 2
        message = problem.message
    else:
        (problem,) = _problems("", overrides=[f"{section}.{key}=3"])
        message = problem.message
        assert f"unknown key '{section}.{key}'" in message
        assert "known keys: " in message
    for fragment in fragments:
        assert fragment in message, message


def test_top_level_training_setting_says_where_it_belongs():
    (problem,) = _problems("epochs: 3\n")
    assert all(fragment in problem.message for fragment in TRAINING_HINT)


@pytest.mark.parametrize("via", ["file", "set"])
def test_misspelt_torchvision_prefix_is_suggested(via):
    if via == "file":
        (problem,) = _problems("teacher:\n  model: torchvison:resnet18\n")
        assert problem.line == 2
    else:
        (problem,) = _problems("", overrides=["student.model=torchvison:resnet18"])
    assert "did you mean 'torchvision:resnet18'?" in problem.message


def test_misspelt_local_module_and_imagefolder_prefix_are_suggested(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kdc_test_networks.py").write_text("def build(): pass\n")
    (problem,) = _problems("teacher: {model: 'kdc_test_network:build'}\n")
    assert "did you mean 'kdc_test_networks:build'?" in problem.message
    (problem,) = _problems("data: {dataset: 'imagefoldr:/data/pets'}\n")
    assert "did you mean 'imagefolder:/data/pets'?" in problem.message


def test_hints_through_kdc_validate(kdc, in_tmp, write_recipe):
    write_recipe(text="teacher:\n  learning_rate: 0.1\n")
    result = kdc("validate", "recipe.yaml", "--set", "teacher.learning_rate=0.1")
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    assert "teacher.learning_rate (line 2): unknown key; did you mean 'lr'?" in out
    assert (
        "--set teacher.learning_rate=0.1: unknown key 'teacher.learning_rate'; did you mean 'lr'? (known keys:" in out
    )


# --------------------------------------------------------------------------- 10. own modules without PYTHONPATH

NETS = textwrap.dedent(
    """\
    from torch import nn


    def build(num_classes=10, input_shape=(1, 28, 28), width=16):
        n = 1
        for d in input_shape:
            n *= d
        return nn.Sequential(nn.Flatten(), nn.Linear(n, width), nn.ReLU(), nn.Linear(width, num_classes))
    """
)
DATA = textwrap.dedent(
    """\
    import torch
    from torch.utils.data import TensorDataset


    def build():
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(40, 1, 8, 8, generator=g), torch.arange(40) % 3
        return {"train": TensorDataset(x, y), "test": TensorDataset(x[:12], y[:12]), "num_classes": 3}
    """
)


@pytest.fixture
def own_modules(monkeypatch):
    """Unique module names, and sys.path, sys.modules and kdc's import folders as they were afterwards."""
    names = {"nets": f"mynets_{uuid.uuid4().hex[:8]}", "data": f"mydata_{uuid.uuid4().hex[:8]}"}
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    with saved_import_dirs():
        yield names
    for name in names.values():
        sys.modules.pop(name, None)


def _recipe_with_own_modules(folder: Path, names: dict, module_folder: Path) -> Path:
    (module_folder / f"{names['nets']}.py").write_text(NETS)
    (module_folder / f"{names['data']}.py").write_text(DATA)
    path = folder / "mine.yaml"
    path.write_text(
        f"data: {{dataset: '{names['data']}:build', workers: 0}}\n"
        f"teacher: {{model: '{names['nets']}:build', args: {{width: 8}}, epochs: 1}}\n"
        f"student: {{model: '{names['nets']}:build', args: {{width: 4}}}}\n"
        "report: {latency: false}\n"
    )
    return path


def test_module_beside_the_recipe_is_found_from_another_directory(tmp_path, monkeypatch, own_modules):
    (tmp_path / "exp").mkdir()
    (tmp_path / "elsewhere").mkdir()
    recipe_path = _recipe_with_own_modules(tmp_path / "exp", own_modules, tmp_path / "exp")
    monkeypatch.chdir(tmp_path / "elsewhere")
    front = list(sys.path[:3])
    recipe = load_recipe(recipe_path)
    plan = check_recipe(recipe)  # builds both models on the user's own data
    assert any("teacher: " + own_modules["nets"] in line for line in plan)
    assert sys.path[:3] == front  # nothing was left in front of what is installed
    assert str((tmp_path / "exp").resolve()) in sys.path  # at the end, for factories that import later


def test_module_in_the_current_directory_is_found(tmp_path, monkeypatch, own_modules):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "work").mkdir()
    recipe_path = _recipe_with_own_modules(tmp_path / "recipes", own_modules, tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    recipe = load_recipe(recipe_path)
    net = models.build_model(models.model_spec(recipe.teacher.model, recipe.teacher.args, 3, (1, 8, 8)))
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 3)
    check_recipe(recipe)


def test_kdc_validate_finds_the_module_beside_the_recipe(kdc, tmp_path, monkeypatch, own_modules):
    (tmp_path / "exp").mkdir()
    (tmp_path / "elsewhere").mkdir()
    recipe_path = _recipe_with_own_modules(tmp_path / "exp", own_modules, tmp_path / "exp")
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = kdc("validate", recipe_path)
    kdc.assert_clean_exit(result, 0)
    assert "run directory: runs/mine" in kdc.flat(result)


def test_module_missing_everywhere_names_where_it_was_looked_for(tmp_path, monkeypatch, own_modules):
    monkeypatch.chdir(tmp_path)
    (problem,) = _problems(f"teacher: {{model: '{own_modules['nets']}:build'}}\n")
    assert "in the current directory or the recipe's" in problem.message
