"""Bad input through the `kdc` CLI: one clear message, the right exit code, no traceback, nothing written.

Every row of ``BAD_INPUT_CASES`` runs in a fresh working directory (CliRunner,
in-process). It checks the exit code (2 for recipe, data, model, stage-order
and usage errors; 1 for a run directory kdc cannot use or a device that does
not exist, which are plain KdcErrors), that each message fragment is in the
output, that there is no traceback or "internal error", and that no file was
created or changed. Every KdcError row runs a second time with ``kdc --debug``,
where the error must propagate as the KdcError subclass (with its traceback).
"""

from __future__ import annotations

import copy
import gzip
import json
import shutil
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from kdcompress.errors import KdcError

USERNETS = textwrap.dedent(
    '''
    """Model factories for the bad-input tests (written into tmp_path, put on sys.path)."""
    from torch import nn


    def seven_outputs(num_classes=10, input_shape=(1, 28, 28)):
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 7))  # ignores num_classes


    def wants_100_inputs():
        return nn.Sequential(nn.Flatten(), nn.Linear(100, 10))  # another input shape


    def not_a_module():
        return "a string"


    def broken(num_classes=10):
        raise ValueError("cannot build this net")


    class _Picky(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 28 * 28, 10)

        def forward(self, x):
            assert x.shape[1] == 3  # a bare assert: its exception has an empty message
            return self.fc(x.flatten(1))


    def picky():
        return _Picky()
    '''
)


@dataclass
class Case:
    id: str
    argv: list[str]
    code: int
    fragments: list[str]
    edits: dict[str, Any] = field(default_factory=dict)  # dotted key -> value, replacing the tiny recipe's
    text: str | bytes | None = None  # the recipe file's exact content instead
    setup: Callable[[Path], None] | None = None  # extra files, called with the working directory
    usage: bool = False  # a click/typer usage error (no KdcError behind it)
    needs_distilled: bool = False  # start from a run whose teacher and distilled stages are done
    marks: tuple = ()


def _mnist_raw(root: Path) -> Path:
    raw = root / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    return raw


def _empty_data_root(work: Path) -> None:
    (work / "data").mkdir()


def _truncated_mnist(work: Path) -> None:
    """The four idx files torchvision reads, each cut in half (taken from the shipped mini set)."""
    from kdcompress.data import IDX_FILES, mini_dir

    raw = _mnist_raw(work)
    for name in IDX_FILES:
        with gzip.open(mini_dir() / f"{name}.gz", "rb") as fh:
            data = fh.read()
        (raw / name).write_bytes(data[: len(data) // 2])


def _run_marker(content: str) -> Callable[[Path], None]:
    def setup(work: Path) -> None:
        run_dir = work / "runs" / "tiny"
        run_dir.mkdir(parents=True)
        (run_dir / "kdc-run.json").write_text(content)

    return setup


def _foreign_run_dir(work: Path) -> None:
    run_dir = work / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "notes.txt").write_text("my own files")


def _folder(work: Path) -> None:
    (work / "a-folder").mkdir()


V = ["validate", "recipe.yaml"]
T = ["train-teacher", "recipe.yaml"]

BAD_INPUT_CASES: list[Case] = [
    # --- the recipe file itself
    Case("missing-file-validate", ["validate", "nosuch.yaml"], 2, ["nosuch.yaml", "recipe file not found"], text=None),
    Case("missing-file-run", ["run", "nosuch.yaml"], 2, ["nosuch.yaml", "recipe file not found"]),
    Case("recipe-is-a-folder", ["validate", "a-folder"], 2, ["it is a folder"], setup=_folder),
    Case(
        "yaml-syntax-error",
        V,
        2,
        ["YAML syntax error", "line 3", "column 10"],
        text="run:\n  name: tiny\n  seed: 0: 1\n",
    ),
    Case(
        "yaml-unclosed-quote",
        V,
        2,
        ["YAML syntax error", "line 2", "column"],
        text='run:\n  name: "tiny\n  seed: 0\nteacher:\n  epochs: 2\n',
    ),
    Case("yaml-tab-indent", V, 2, ["YAML syntax error", "line"], text="run:\n\tname: tiny\n"),
    Case("not-a-mapping", V, 2, ["a recipe is a mapping of sections", "a list"], text="- run\n- data\n"),
    Case("not-utf8", V, 2, ["cannot read the recipe"], text=b"run:\n  name: \xff\xfe\n"),
    Case("duplicate-key", V, 2, ["distill.alpha", "duplicate key"], text="distill:\n  alpha: 0.5\n  alpha: 0.7\n"),
    # --- unknown keys, with suggestions
    Case("unknown-key", V, 2, ["distill.temprature", "did you mean 'temperature'"], edits={"distill.temprature": 2}),
    Case("unknown-section", V, 2, ["distil", "did you mean 'distill'"], edits={"distil": {"epochs": 2}}),
    # --- wrong types
    Case("wrong-type-int", V, 2, ["teacher.epochs", "expected an integer", "'many'"], edits={"teacher.epochs": "many"}),
    Case("wrong-type-float", V, 2, ["distill.temperature", "expected a number"], edits={"distill.temperature": "hot"}),
    Case("wrong-type-bool", V, 2, ["student.baseline", "expected true or false"], edits={"student.baseline": "often"}),
    Case("wrong-type-section", V, 2, ["prune", "expected a mapping of settings"], edits={"prune": 5}),
    Case("wrong-type-list", V, 2, ["prune.include", "expected a list"], edits={"prune.include": "net.*"}),
    Case(
        "wrong-choice",
        V,
        2,
        ["teacher.optimizer", "must be one of", "did you mean 'adam'"],
        edits={"teacher.optimizer": "adamm"},
    ),
    Case("not-finite", V, 2, ["teacher.lr", "finite"], edits={"teacher.lr": float("nan")}),
    # --- out of range
    Case("temperature-zero", V, 2, ["distill.temperature", "must be > 0.0"], edits={"distill.temperature": 0}),
    Case("temperature-negative", V, 2, ["distill.temperature", "must be > 0.0"], edits={"distill.temperature": -2.0}),
    Case("alpha-above-1", V, 2, ["distill.alpha", "<= 1.0"], edits={"distill.alpha": 1.5}),
    Case("alpha-below-0", V, 2, ["distill.alpha", ">= 0.0"], edits={"distill.alpha": -0.1}),
    Case("rate-zero", V, 2, ["prune.rate", "> 0.0"], edits={"prune.rate": 0.0}),
    Case("rate-one", V, 2, ["prune.rate", "< 1.0"], edits={"prune.rate": 1.0}),
    Case("target-one", V, 2, ["prune.target_sparsity", "< 1.0"], edits={"prune.target_sparsity": 1.0}),
    Case("target-negative", V, 2, ["prune.target_sparsity", ">= 0.0"], edits={"prune.target_sparsity": -0.1}),
    Case("epochs-negative", V, 2, ["teacher.epochs", ">= 0"], edits={"teacher.epochs": -1}),
    Case("batch-size-zero", V, 2, ["data.batch_size", ">= 1"], edits={"data.batch_size": 0}),
    Case(
        "several-problems-at-once",
        V,
        2,
        ["2 problems", "distill.temperature", "distill.alpha"],
        edits={"distill.temperature": 0, "distill.alpha": 2},
    ),
    Case(
        "schedule-cannot-reach-target",
        V,
        2,
        ["prune.epochs", "too few epochs"],
        edits={"prune.rate": 0.1, "prune.epochs": 1},
    ),
    # --- --set and option overrides
    Case(
        "set-unknown-key",
        V + ["--set", "distill.temprature=2"],
        2,
        ["--set distill.temprature=2", "did you mean 'temperature'"],
    ),
    Case("set-without-equals", V + ["--set", "distill.temperature"], 2, ["expected KEY.PATH=VALUE"]),
    Case("set-out-of-range", V + ["--set", "distill.alpha=3"], 2, ["distill.alpha", "from --set distill.alpha=3"]),
    Case(
        "prune-rate-option-out-of-range",
        ["prune", "recipe.yaml", "--rate", "2"],
        2,
        ["prune.rate", "--set prune.rate=2.0", "< 1.0"],
    ),
    # --- models
    Case(
        "unknown-model",
        V,
        2,
        ["teacher.model", "unknown model 'resnet'", "mlp, cnn, lenet5"],
        edits={"teacher.model": "resnet"},
    ),
    Case("unknown-model-suggestion", V, 2, ["student.model", "did you mean 'mlp'"], edits={"student.model": "mpl"}),
    Case(
        "import-path-no-module",
        V,
        2,
        ["teacher.model", "cannot import 'nosuchpkg.mod'"],
        edits={"teacher.model": "nosuchpkg.mod:build", "teacher.args": {}},
    ),
    Case(
        "import-path-no-attribute",
        V,
        2,
        ["teacher.model", "'os.path' has no attribute 'nosuchfactory'"],
        edits={"teacher.model": "os.path:nosuchfactory", "teacher.args": {}},
    ),
    Case(
        "import-path-malformed",
        V,
        2,
        ["teacher.model", "not an import path"],
        edits={"teacher.model": "os.path:", "teacher.args": {}},
    ),
    Case(
        "unknown-model-argument",
        V,
        2,
        ["teacher.model.args", "'hiden'", "did you mean 'hidden'"],
        edits={"teacher.args": {"hiden": [8]}},
    ),
    Case(
        "torchvision-unknown",
        V,
        2,
        ["torchvision has no classification model 'resnet1800'"],
        edits={"teacher.model": "torchvision:resnet1800", "teacher.args": {}},
    ),
    Case(
        "teacher-wrong-number-of-classes",
        V,
        2,
        ["teacher.model", "[2, 7]", "10 classes"],
        edits={"teacher.model": "kdc_bad_input_nets:seven_outputs", "teacher.args": {}},
    ),
    Case(
        "student-wrong-input-shape",
        V,
        2,
        ["student.model", "fails on fashion-mnist-mini inputs of shape [1, 28, 28]"],
        edits={"student.model": "kdc_bad_input_nets:wants_100_inputs", "student.args": {}},
    ),
    Case(
        "wrong-input-shape-found-before-training",
        T,
        2,
        ["student.model", "fails on"],
        edits={"student.model": "kdc_bad_input_nets:wants_100_inputs", "student.args": {}},
    ),
    Case(
        "factory-returns-no-module",
        V,
        2,
        ["not a torch.nn.Module"],
        edits={"teacher.model": "kdc_bad_input_nets:not_a_module", "teacher.args": {}},
    ),
    Case(
        "factory-raises",
        V,
        2,
        ["teacher.model", "failed", "cannot build this net"],
        edits={"teacher.model": "kdc_bad_input_nets:broken", "teacher.args": {}},
    ),
    Case(
        "forward-fails-on-bare-assert",
        V,
        2,
        ["student.model", "fails on"],
        edits={"student.model": "kdc_bad_input_nets:picky", "student.args": {}},
    ),
    # --- nothing left to prune
    Case(
        "exclude-everything",
        V + ["--set", "prune.exclude=['*']"],
        2,
        ["prune.include/prune.exclude", "no Conv or Linear weights", "net.1"],
    ),
    Case(
        "exclude-every-module-name",
        V + ["--set", "prune.exclude=['net.1', 'net.3']"],
        2,
        ["no Conv or Linear weights", "net.0, net.1, net.2, net.3"],
    ),
    Case("include-nothing", V, 2, ["no Conv or Linear weights"], edits={"prune.include": ["conv*"]}),
    Case(
        "prune-command-exclude-everything",
        ["prune", "recipe.yaml", "--rate", "0.1", "--set", "prune.exclude=['*']", "--set", "prune.every=0.1"],
        2,
        ["no Conv or Linear weights"],
        needs_distilled=True,
    ),
    # --- data
    Case(
        "unknown-dataset",
        V,
        2,
        ["unknown dataset 'cifar10'", "fashion-mnist-mini, fashion-mnist, mnist"],
        edits={"data.dataset": "cifar10"},
    ),
    Case("unknown-dataset-suggestion", V, 2, ["did you mean 'fashion-mnist'"], edits={"data.dataset": "fashion-mnst"}),
    Case(
        "dataset-files-missing",
        T,
        2,
        ["dataset 'mnist' not found", "{work}/data/MNIST/raw"],
        edits={"data.dataset": "mnist", "data.root": "{work}/data"},
        setup=_empty_data_root,
    ),
    Case(
        "dataset-files-corrupt",
        T,
        2,
        ["cannot read the MNIST files", "{work}/data/MNIST/raw", "fetch them again"],
        edits={"data.dataset": "mnist", "data.root": "{work}/data"},
        setup=_truncated_mnist,
    ),
    Case(
        "validation-split-leaves-no-training-data",
        T,
        2,
        ["data.val_split", "leaves no training data"],
        edits={"data.val_split": 0.99999},
    ),
    # --- stages and run directories
    Case(
        "prune-before-distill",
        ["prune", "recipe.yaml"],
        2,
        ["'pruned' stage needs the 'distilled' stage", "kdc distill recipe.yaml"],
    ),
    Case("distill-before-teacher", ["distill", "recipe.yaml"], 2, ["kdc train-teacher recipe.yaml"]),
    Case(
        "run-dir-from-another-version",
        ["run", "recipe.yaml"],
        1,
        ["runs/tiny was written by kdc 9.9 (run format 999)", "reads run format 1"],
        setup=_run_marker(json.dumps({"format": 999, "kdc_version": "9.9"})),
    ),
    Case("run-dir-marker-damaged", T, 1, ["kdc-run.json is damaged"], setup=_run_marker("{oops")),
    Case("run-dir-not-from-kdc", T, 1, ["not written by kdc", "kdc-run.json"], setup=_foreign_run_dir),
    Case(
        "no-such-device",
        T,
        2,
        ["run.device", "must be auto, cpu, cuda or cuda:N", "'banana'"],
        edits={"run.device": "banana"},
    ),
    # --- command-line usage
    Case(
        "usage-missing-argument",
        ["validate"],
        2,
        ["error: missing argument 'RECIPE'", "usage: kdc validate"],
        usage=True,
    ),
    Case(
        "usage-bad-option-value",
        ["prune", "recipe.yaml", "--rate", "lots"],
        2,
        ["error: invalid value for '--rate'"],
        usage=True,
    ),
    Case(
        "usage-nproc-zero",
        ["run", "recipe.yaml", "--nproc", "0"],
        2,
        ["error: invalid value for '--nproc'"],
        usage=True,
    ),
    Case(
        "usage-unknown-option",
        ["run", "recipe.yaml", "--frobnicate"],
        2,
        ["error: no such option: --frobnicate"],
        usage=True,
    ),
]

NO_RECIPE = {"missing-file-validate", "missing-file-run", "recipe-is-a-folder"}


def _recipe_dict(base: dict, edits: dict[str, Any], work: Path) -> dict:
    recipe = copy.deepcopy(base)
    for dotted, value in edits.items():
        node = recipe
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = _fill(copy.deepcopy(value), work)
    return recipe


def _fill(value, work: Path):
    if isinstance(value, str):
        return value.replace("{work}", str(work))
    return value


@pytest.fixture(scope="module")
def distilled_template(fresh_run, tiny_recipe_text):
    return fresh_run(tiny_recipe_text, "distilled-template", "train-teacher", "distill")[0]


def _prepare(case: Case, tmp_path: Path, monkeypatch, request) -> Path:
    work = tmp_path / "work"
    if case.needs_distilled:
        shutil.copytree(request.getfixturevalue("distilled_template"), work)
    else:
        work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # importing a user's module must not add files here
    (tmp_path / "nets").mkdir()
    (tmp_path / "nets" / "kdc_bad_input_nets.py").write_text(USERNETS)
    monkeypatch.syspath_prepend(str(tmp_path / "nets"))
    if case.id not in NO_RECIPE:
        recipe = work / "recipe.yaml"
        if isinstance(case.text, bytes):
            recipe.write_bytes(case.text)
        elif case.text is not None:
            recipe.write_text(case.text, encoding="utf-8")
        else:
            data = _recipe_dict(request.getfixturevalue("tiny_recipe_dict"), case.edits, work)
            recipe.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    if case.setup is not None:
        case.setup(work)
    return work


def _params(cases, only_kdc_errors=False):
    return [pytest.param(c, id=c.id, marks=c.marks) for c in cases if not (only_kdc_errors and c.usage)]


@pytest.mark.parametrize("case", _params(BAD_INPUT_CASES))
def test_bad_input_is_one_clear_message(case: Case, tmp_path, monkeypatch, request, kdc, file_snapshot):
    work = _prepare(case, tmp_path, monkeypatch, request)
    had_runs = (work / "runs").exists()
    before = file_snapshot(work)
    result = kdc(*case.argv)
    kdc.assert_clean_exit(result, case.code)
    out = kdc.flat(result)
    for fragment in case.fragments:
        assert _fill(fragment, work) in out, f"{fragment!r} not in:\n{out}"
    assert file_snapshot(work) == before, "files were written or changed"
    if not had_runs:
        assert not (work / "runs").exists()


@pytest.mark.parametrize("case", _params(BAD_INPUT_CASES, only_kdc_errors=True))
def test_debug_raises_the_kdc_error_with_its_traceback(case: Case, tmp_path, monkeypatch, request, kdc):
    _prepare(case, tmp_path, monkeypatch, request)
    result = kdc("--debug", *case.argv)
    assert isinstance(result.exception, KdcError), repr(result.exception)
    assert not isinstance(result.exception, SystemExit)
    assert result.exception.exit_code == case.code
    assert result.exc_info is not None and result.exc_info[2] is not None  # the traceback is there


def test_the_case_list_is_what_the_report_quotes():
    ids = [c.id for c in BAD_INPUT_CASES]
    assert len(ids) == len(set(ids))
    assert len(BAD_INPUT_CASES) == 66


# --------------------------------------------------------------------------- bugs outside the table


def test_prune_rate_option_with_a_small_float_is_read_as_a_number(in_tmp, write_recipe, kdc):
    write_recipe()
    result = kdc("prune", "recipe.yaml", "--rate", "0.00001")
    out = kdc.flat(result)
    assert "expected a number" not in out, out
    assert "too few epochs" in out  # the value is understood; this schedule then needs far more epochs


def test_set_with_scientific_notation_is_a_number(in_tmp, write_recipe, kdc):
    write_recipe()
    result = kdc("validate", "recipe.yaml", "--set", "teacher.lr=1e-3")
    kdc.assert_clean_exit(result, 0)


def test_gzipped_idx_files_are_accepted_as_the_message_says(tmp_path):
    from kdcompress.data import IDX_FILES, load_data, mini_dir
    from kdcompress.recipe import DataSection

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in IDX_FILES:
        shutil.copy(mini_dir() / f"{name}.gz", raw / f"{name}.gz")
    data = load_data(DataSection(dataset="mnist", root=str(tmp_path)))
    assert len(data.train) == 10000
