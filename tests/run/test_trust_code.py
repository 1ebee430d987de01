"""Code runs only from the recipe (issue 17, row 1): nothing planted in a run directory runs.

The attacker can write to a shared run directory: they replace a stage checkpoint or an artifact with plain
data (it loads with weights_only=True) whose model name is their module, rewrite its manifest with kdc's own
helpers so it verifies, and drop the module beside it (and in the working directory). Every command refuses
with exit 2 naming both names, or, for an artifact in the report, refuses that file; the module is never
imported (its import would create a marker file). A run directory's own recipe.yaml is data too: the code it
names is imported only with --trust-code, and the run directory is never on the import path. A user's own
model beside their recipe still runs, and `kdc report RUN --trust-code` reports it.
"""

from __future__ import annotations

import shutil
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import TINY_RECIPE, _deep_merge, working_copy

from kdcompress import names
from kdcompress.checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint
from kdcompress.errors import ArtifactError
from kdcompress.export import load_artifact, verify_artifact, write_artifact
from kdcompress.export.container import pack, unpack

RUN = Path("runs") / "tiny"
ARTIFACT = RUN / "export" / "pruned-sparse-fp16.kdca"

EVIL = """\
import pathlib
pathlib.Path({marker!r}).touch()  # importing this module is the attack succeeding


def build(**kwargs):
    raise RuntimeError("never reached: the import already ran the payload")
"""

OWN = """\
from kdcompress.models import MLP


def build(num_classes, input_shape, hidden=(32,)):
    return MLP(input_shape, num_classes, hidden)
"""


@pytest.fixture(scope="module")
def exported(fresh_run, tiny_recipe_text, kdc):
    """The tiny run, then `kdc export runs/tiny --format sparse`, once per module."""
    work, _ = fresh_run(tiny_recipe_text, "trust", "run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        kdc.assert_clean_exit(kdc("export", str(RUN), "--format", "sparse"), 0)
    return work


@pytest.fixture(autouse=True)
def fresh_import_path(monkeypatch):
    """Each test starts with no import folders of kdc's and sys.path as it was, and leaves them as they were."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    with names.saved_import_dirs(clear=True):
        yield


@pytest.fixture
def work(exported, tmp_path, monkeypatch):
    """A private copy of the exported run's folder, made the working directory."""
    return working_copy(exported, tmp_path, monkeypatch)


def drop_module(marker: Path, *folders: Path) -> str:
    """Write a module whose import creates ``marker`` into each folder; return its (unique) name."""
    name = f"evil_mod_{uuid.uuid4().hex[:8]}"
    for folder in folders:
        (folder / f"{name}.py").write_text(EVIL.format(marker=str(marker)), encoding="utf-8")
    return name


def plant_checkpoint(path: Path, model: str) -> None:
    """Rewrite a stage checkpoint as plain data naming ``model``, with a manifest that verifies."""
    ckpt = load_checkpoint(path)
    ckpt["arch"] = {**ckpt["arch"], "model": model}
    save_checkpoint(path, ckpt)  # kdc's own writer: the same fingerprint, a matching size and SHA-256
    verify_checkpoint(path)


def plant_artifact(path: Path, model: str) -> None:
    """Rewrite an artifact naming ``model``, with a manifest that verifies."""
    manifest, blob = verify_artifact(path)
    tensors, meta = unpack(blob)
    meta["arch"] = {**meta["arch"], "model": model}
    extra = {"stage": manifest["stage"], "source_fingerprint": manifest["source_fingerprint"]}
    write_artifact(path, pack(tensors, meta), manifest["format"], extra)
    verify_artifact(path)


def edit_run_recipe(changes: dict) -> None:
    path = RUN / "recipe.yaml"
    recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    path.write_text(yaml.safe_dump(_deep_merge(recipe, changes), sort_keys=False), encoding="utf-8")


@pytest.mark.parametrize(
    "stage, command",
    [
        ("pruned", ["export", str(RUN), "--force"]),
        ("distilled", ["run", str(RUN)]),
        ("distilled", ["prune", str(RUN), "--force"]),
        ("pruned", ["report", str(RUN)]),
    ],
    ids=["export", "run", "prune", "report"],
)
def test_a_module_named_in_a_planted_checkpoint_never_runs(work, kdc, stage, command):
    marker = work / "pwned"
    name = drop_module(marker, work / RUN, work)
    plant_checkpoint(RUN / stage / "model.pt", f"{name}:build")
    result = kdc(*command)
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    assert f"names the model '{name}:build' but the recipe says 'mlp'" in out, out
    assert not marker.exists()
    assert name not in sys.modules


def test_a_checkpoint_naming_another_built_in_model_is_refused_too(work, kdc):
    plant_checkpoint(RUN / "distilled" / "model.pt", "cnn")
    result = kdc("prune", str(RUN), "--force")
    kdc.assert_clean_exit(result, 2)
    assert "distilled checkpoint names the model 'cnn' but the recipe says 'mlp'" in kdc.flat(result)


@pytest.mark.parametrize(
    "command", [["export", str(RUN), "--format", "sparse"], ["report", str(RUN)]], ids=["export", "report"]
)
def test_a_module_named_in_a_planted_artifact_never_runs(work, kdc, command):
    """The artifact is refused, like any replaced file: the report says why, names both, and loads nothing."""
    marker = work / "pwned"
    name = drop_module(marker, work / RUN, work / RUN / "export", work)
    plant_artifact(ARTIFACT, f"{name}:build")
    result = kdc(*command)
    kdc.assert_clean_exit(result, 0)
    out = kdc.flat(result)
    assert "refused" in out and "pruned-sparse-fp16.kdca was not loaded" in out, out
    assert f"names the model '{name}:build' but the recipe says 'mlp'" in out, out
    assert not marker.exists()
    assert name not in sys.modules


def test_load_artifact_builds_only_the_expected_model(work):
    name = drop_module(work / "pwned", work)
    plant_artifact(ARTIFACT, f"{name}:build")
    for kwargs in ({}, {"expected": "mlp"}):
        with pytest.raises(ArtifactError, match=f"'{name}:build'"):
            load_artifact(ARTIFACT, **kwargs)
    assert not (work / "pwned").exists()


@pytest.mark.parametrize(
    "changes, command, shown",
    [
        (
            {"teacher": {"model": "os:system", "args": {"command": "touch pwned"}}},
            ["run"],
            "'os:system' (teacher.model)",
        ),
        ({"student": {"model": "EVIL:build"}}, ["prune", "--force"], "'EVIL:build' (student.model)"),
        ({"data": {"dataset": "EVIL:build"}}, ["train-teacher"], "'EVIL:build' (data.dataset)"),
        ({"distill": {"loss": "EVIL:build"}}, ["distill"], "'EVIL:build' (distill.loss)"),
    ],
    ids=["os-system", "student-model", "dataset", "loss"],
)
def test_code_named_by_a_run_directory_recipe_needs_trust_code(work, kdc, changes, command, shown):
    marker = work / "pwned"
    name = drop_module(marker, work / RUN, work)
    changes = yaml.safe_load(yaml.safe_dump(changes).replace("EVIL", name))
    edit_run_recipe(changes)
    result = kdc(command[0], str(RUN), *command[1:])
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    assert f"{RUN / 'recipe.yaml'} names your own code {shown.replace('EVIL', name)}" in out, out
    assert f"pass --trust-code if you trust {RUN}" in out, out
    assert not marker.exists()
    assert name not in sys.modules


def test_a_run_directory_is_never_on_the_import_path(work, kdc):
    """Even trusted, a module that lies only in the run directory is not found: it is not the user's code."""
    marker = work / "pwned"
    name = drop_module(marker, work / RUN)
    edit_run_recipe({"student": {"model": f"{name}:build"}})
    result = kdc("train-student", str(RUN), "--trust-code")
    kdc.assert_clean_exit(result, 2)
    assert f"cannot import '{name}'" in kdc.flat(result)
    assert not marker.exists()


def test_a_supplied_teacher_naming_another_model_is_refused(work, kdc):
    """The teacher stage's checkpoint then always names teacher.model, as every later stage expects."""
    teacher = work / RUN / "teacher" / "model.pt"  # a kdc checkpoint of an mlp
    recipe = _deep_merge(TINY_RECIPE, {"run": {"name": "other"}, "teacher": {"checkpoint": str(teacher)}})
    recipe["teacher"].update(model="cnn", args={})
    (work / "other.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    result = kdc("train-teacher", "other.yaml")
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    assert f"{teacher} names the model 'mlp' but the recipe says 'cnn'" in out, out
    assert "set teacher.model: mlp" in out


def test_your_own_model_beside_your_recipe_runs_and_reports_with_trust_code(in_tmp, kdc):
    name = f"mynets_{uuid.uuid4().hex[:8]}"
    folder = in_tmp / "experiments"
    folder.mkdir()
    (folder / f"{name}.py").write_text(OWN, encoding="utf-8")
    recipe = _deep_merge(TINY_RECIPE, {"student": {"model": f"{name}:build", "args": {"hidden": [32]}}})
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    result = kdc("run", "experiments/recipe.yaml")  # found beside the recipe, not in the working directory
    kdc.assert_clean_exit(result, 0)
    assert load_checkpoint(in_tmp / RUN / "pruned" / "model.pt")["arch"]["model"] == f"{name}:build"

    refused = kdc("report", str(RUN))
    kdc.assert_clean_exit(refused, 2)
    assert f"names your own code '{name}:build' (student.model)" in kdc.flat(refused)
    assert "--trust-code" in kdc.flat(refused)
    assert "give your recipe file" not in kdc.flat(refused)  # kdc report takes run directories only

    shutil.copy(folder / f"{name}.py", in_tmp)  # a new process finds the module in the working directory
    (in_tmp / RUN / "report.json").unlink()
    trusted = kdc("report", str(RUN), "--trust-code")
    kdc.assert_clean_exit(trusted, 0)
    assert (in_tmp / RUN / "report.json").is_file()
    assert f"{name}:build" in (in_tmp / RUN / "report.json").read_text()


def test_a_teacher_file_outside_the_run_named_by_its_recipe_needs_trust_code(work, kdc):
    """A planted teacher.checkpoint would copy the weights of any model of yours into a folder others read."""
    private = work / "private" / "model.pt"  # any weights of yours, outside the run
    private.parent.mkdir()
    shutil.copy(work / RUN / "teacher" / "model.pt", private)
    shutil.copy(work / RUN / "teacher" / "model.pt.manifest.json", private.parent)
    before = (work / RUN / "teacher" / "model.pt").read_bytes()
    edit_run_recipe({"teacher": {"checkpoint": str(private)}})
    result = kdc("train-teacher", str(RUN), "--force")
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    assert f"names {private} (teacher.checkpoint), a file outside the run" in out, out
    assert "--trust-code" in out
    assert (work / RUN / "teacher" / "model.pt").read_bytes() == before  # nothing was read into the run

    trusted = kdc("train-teacher", str(RUN), "--force", "--trust-code")
    kdc.assert_clean_exit(trusted, 0)
    assert f"supplied: {private}" in kdc.flat(trusted)
