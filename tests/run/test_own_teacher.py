"""Your own teacher (issue 11, part 3): ``teacher.checkpoint`` and ``teacher.pretrained``.

A teacher trained elsewhere and given as ``teacher.checkpoint`` is not trained again, is marked as
supplied, and distils exactly the student the in-run teacher distils. The file is read with
``weights_only=True``; its content (SHA-256) is a teacher input, so changing it reruns the teacher and
every later stage. ``teacher.pretrained`` reads torchvision's weights from the local hub cache only.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_RECIPE, _deep_merge

from kdcompress.checkpoint import load_checkpoint
from kdcompress.models import build_from_checkpoint
from kdcompress.recipe import load_recipe

RUN = Path("runs") / "tiny"


def _text(changes: dict) -> str:
    recipe = _deep_merge(TINY_RECIPE, changes)
    if "args" in changes.get("teacher", {}):  # replaced, not merged: another model takes other arguments
        recipe["teacher"]["args"] = changes["teacher"]["args"]
    return yaml.safe_dump(recipe, sort_keys=False)


@pytest.fixture(scope="module")
def in_run(fresh_run):
    """A tiny run whose teacher was trained in it: the reference, and the source of supplied teachers."""
    work, _ = fresh_run(_text({}), "own-teacher-reference", "run")
    return work


def _state_dict_file(in_run: Path, where: Path) -> Path:
    """The reference teacher's weights saved as a plain state_dict, as a user would save their own."""
    model = build_from_checkpoint(load_checkpoint(in_run / RUN / "teacher" / "model.pt"))
    path = where / "my-teacher.pt"
    torch.save(model.state_dict(), path)
    return path


# --------------------------------------------------------------------------- acceptance


def test_a_teacher_from_another_run_is_not_retrained_and_distils_the_same_student(
    in_run, fresh_run, kdc, checkpoints_equal
):
    supplied = in_run / RUN / "teacher" / "model.pt"
    work, result = fresh_run(_text({"teacher": {"checkpoint": str(supplied)}}), "own-teacher-kdc", "run")
    out = kdc.flat(result)
    assert "teacher epoch" not in out  # no training epoch of the teacher
    assert f"teacher: supplied: {supplied}, not trained" in out
    checkpoints_equal(work / RUN / "distilled" / "model.pt", in_run / RUN / "distilled" / "model.pt")
    checkpoints_equal(work / RUN / "pruned" / "model.pt", in_run / RUN / "pruned" / "model.pt")
    teacher = load_checkpoint(work / RUN / "teacher" / "model.pt")
    reference = load_checkpoint(supplied)
    assert teacher["metrics"]["epochs"] == 0 and teacher["history"] == []
    assert teacher["metrics"]["supplied_from"] == str(supplied)
    assert teacher["metrics"]["supplied_format"] == "kdc checkpoint"
    assert teacher["metrics"]["test_accuracy"] == reference["metrics"]["test_accuracy"]
    report = json.loads((work / RUN / "report.json").read_text())
    row = next(r for r in report["stages"] if r["stage"] == "teacher")
    assert row["settings"]["supplied_from"] == str(supplied) and row["epochs"] == 0
    assert f"supplied: {supplied}" in (work / RUN / "report.md").read_text()
    assert f"supplied: {supplied}" in out  # the terminal table's settings line too


def test_a_plain_state_dict_found_beside_the_recipe_is_the_teacher(
    in_run, tmp_path, monkeypatch, kdc, checkpoints_equal
):
    folder = tmp_path / "experiments"
    folder.mkdir()
    _state_dict_file(in_run, folder)
    (folder / "recipe.yaml").write_text(_text({"teacher": {"checkpoint": "my-teacher.pt"}}), encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # not the recipe's folder: the relative path is found beside the recipe
    for command in ("train-teacher", "distill"):
        result = kdc(command, "experiments/recipe.yaml")
        kdc.assert_clean_exit(result, 0)
    teacher = load_checkpoint(tmp_path / RUN / "teacher" / "model.pt")
    assert teacher["metrics"]["supplied_from"] == str(folder / "my-teacher.pt")
    assert teacher["metrics"]["supplied_format"] == "state_dict"
    checkpoints_equal(tmp_path / RUN / "distilled" / "model.pt", in_run / RUN / "distilled" / "model.pt")


def test_a_relative_path_is_looked_up_in_the_current_directory_first(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    for folder in (tmp_path, tmp_path / "sub"):
        torch.save({"w": torch.zeros(1)}, folder / "t.pt")
    recipe = tmp_path / "sub" / "r.yaml"
    recipe.write_text(_text({"teacher": {"checkpoint": "t.pt"}}), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert load_recipe(recipe).teacher.checkpoint == str(tmp_path / "t.pt")
    (tmp_path / "t.pt").unlink()
    assert load_recipe(recipe).teacher.checkpoint == str(tmp_path / "sub" / "t.pt")


def test_changing_the_file_reruns_teacher_distilled_and_pruned_and_nothing_else(in_run, in_tmp, kdc):
    path = _state_dict_file(in_run, in_tmp)
    (in_tmp / "recipe.yaml").write_text(_text({"teacher": {"checkpoint": "my-teacher.pt"}}), encoding="utf-8")
    kdc.assert_clean_exit(kdc("run", "recipe.yaml"), 0)
    again = kdc.flat(kdc("run", "recipe.yaml", "--set", "teacher.epochs=9", "--set", "teacher.lr=0.5"))
    for stage in ("teacher", "student", "distilled", "pruned"):  # a supplied teacher has no schedule to change
        assert f"{stage}: up to date, skipped" in again, again
    weights = torch.load(path, weights_only=True)
    weights["net.1.bias"] += 0.5
    torch.save(weights, path)
    result = kdc("run", "recipe.yaml")
    kdc.assert_clean_exit(result, 0)
    out = kdc.flat(result)
    assert "teacher: rerunning (changed since" in out and "teacher.checkpoint_sha256" in out, out
    for stage in ("distilled", "pruned"):
        assert f"{stage}: rerunning" in out, out
    assert "student: up to date, skipped" in out
    assert "teacher epoch" not in out


# --------------------------------------------------------------------------- bad input


def test_a_pickle_that_holds_code_is_refused_and_never_runs(tmp_path, in_tmp, kdc, file_snapshot):
    class Payload:
        def __init__(self, marker):
            self.marker = str(marker)

        def __reduce__(self):  # unpickled, this opens (creates) the marker file
            return open, (self.marker, "w")

    proof = tmp_path / "proof"
    with open(tmp_path / "proof.pkl", "wb") as fh:
        pickle.dump(Payload(proof), fh)
    with open(tmp_path / "proof.pkl", "rb") as fh:
        pickle.load(fh).close()
    assert proof.exists()  # the payload really runs code when unpickled without weights_only

    marker = tmp_path / "marker"
    torch.save({"net.1.weight": Payload(marker)}, in_tmp / "evil.pt")
    (in_tmp / "recipe.yaml").write_text(_text({"teacher": {"checkpoint": "evil.pt"}}), encoding="utf-8")
    before = file_snapshot(in_tmp)
    for command in ("validate", "run"):
        result = kdc(command, "recipe.yaml")
        kdc.assert_clean_exit(result, 2)
        out = kdc.flat(result)
        assert "teacher.checkpoint" in out and "evil.pt was refused" in out and "could run code" in out, out
        assert not marker.exists()
    assert file_snapshot(in_tmp) == before  # nothing written


def test_a_missing_file_is_a_recipe_error_naming_where_it_looked(in_tmp, kdc, file_snapshot):
    (in_tmp / "recipe.yaml").write_text(_text({"teacher": {"checkpoint": "nowhere/teacher.pt"}}), encoding="utf-8")
    before = file_snapshot(in_tmp)
    for command in ("validate", "run", "train-teacher"):
        result = kdc(command, "recipe.yaml")
        kdc.assert_clean_exit(result, 2)
        out = kdc.flat(result)
        assert (
            "teacher.checkpoint (line" in out
            and f"file not found: looked for {in_tmp / 'nowhere' / 'teacher.pt'}" in out
        ), out
    assert file_snapshot(in_tmp) == before


def test_weights_of_another_shape_name_the_first_mismatching_key(in_run, in_tmp, kdc, file_snapshot):
    _state_dict_file(in_run, in_tmp)  # hidden [64]; the recipe says [32]
    changes = {"teacher": {"checkpoint": "my-teacher.pt", "args": {"hidden": [32]}}}
    (in_tmp / "recipe.yaml").write_text(_text(changes), encoding="utf-8")
    before = file_snapshot(in_tmp)
    for command in ("validate", "run"):
        result = kdc(command, "recipe.yaml")
        kdc.assert_clean_exit(result, 2)
        out = kdc.flat(result)
        assert "'net.1.weight' is [64, 784] in the file, [32, 784] in the model" in out, out
        assert "set teacher.model and teacher.args to the architecture the weights were saved from" in out
    assert file_snapshot(in_tmp) == before


def test_a_file_that_is_not_a_state_dict_says_how_to_save_one(in_tmp, kdc):
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, in_tmp / "trainer.pt")
    (in_tmp / "recipe.yaml").write_text(_text({"teacher": {"checkpoint": "trainer.pt"}}), encoding="utf-8")
    result = kdc("validate", "recipe.yaml")
    kdc.assert_clean_exit(result, 2)
    assert "neither a state_dict" in kdc.flat(result) and "torch.save(model.state_dict(), PATH)" in kdc.flat(result)


def test_pretrained_and_checkpoint_together_or_pretrained_without_torchvision_are_recipe_errors(in_tmp, kdc):
    torch.save({"w": torch.zeros(1)}, in_tmp / "t.pt")
    for changes, expected in (
        ({"teacher": {"checkpoint": "t.pt", "pretrained": True}}, "keep one"),
        ({"teacher": {"pretrained": True}}, "needs a torchvision model"),
    ):
        (in_tmp / "recipe.yaml").write_text(_text(changes), encoding="utf-8")
        result = kdc("validate", "recipe.yaml")
        kdc.assert_clean_exit(result, 2)
        assert "teacher.pretrained" in result.output and expected in kdc.flat(result)


# --------------------------------------------------------------------------- torchvision pretrained weights


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty torch hub cache of our own; any download attempt fails the test."""
    from torch import hub

    folder = tmp_path / "hub"
    monkeypatch.setattr(hub, "_hub_dir", str(folder))

    def no_download(*args, **kwargs):
        raise AssertionError("kdc tried to download")

    monkeypatch.setattr(hub, "download_url_to_file", no_download)
    monkeypatch.setattr(hub, "load_state_dict_from_url", no_download)
    return folder


PRETRAINED = {"teacher": {"model": "torchvision:squeezenet1_1", "args": {}, "pretrained": True, "epochs": 0}}


def test_pretrained_weights_come_from_the_hub_cache_with_a_new_head_and_grey_first_conv(hub_cache, in_tmp, kdc):
    from torchvision import models as tvm

    torch.manual_seed(1)
    imagenet = tvm.squeezenet1_1(weights=None).state_dict()  # stands in for torchvision's file: 1000 classes, RGB
    path = hub_cache / "checkpoints" / "squeezenet1_1-b8a52dc0.pth"
    path.parent.mkdir(parents=True)
    torch.save(imagenet, path)
    (in_tmp / "recipe.yaml").write_text(_text(PRETRAINED), encoding="utf-8")
    result = kdc("train-teacher", "recipe.yaml")
    kdc.assert_clean_exit(result, 0)
    assert f"starting from the pretrained weights in {path}" in kdc.flat(result)
    teacher = load_checkpoint(in_tmp / RUN / "teacher" / "model.pt")
    weights = teacher["state_dict"]
    head = ["classifier.1.weight", "classifier.1.bias"]  # squeezenet's classifier: a 1x1 conv to the classes
    assert teacher["metrics"]["pretrained_new_head"] == head
    assert weights["classifier.1.weight"].shape[0] == 10
    assert torch.equal(weights["features.0.weight"], imagenet["features.0.weight"].sum(dim=1, keepdim=True))
    for key, tensor in imagenet.items():
        if key not in head and key != "features.0.weight":
            assert torch.equal(weights[key], tensor), key


def test_pretrained_weights_absent_from_the_cache_are_an_offline_error_naming_the_file(
    hub_cache, in_tmp, kdc, file_snapshot
):
    (in_tmp / "recipe.yaml").write_text(_text(PRETRAINED), encoding="utf-8")
    before = file_snapshot(in_tmp)
    for command in ("validate", "run"):
        result = kdc(command, "recipe.yaml")
        kdc.assert_clean_exit(result, 2)
        out = kdc.flat(result)
        assert f"looked for {hub_cache / 'checkpoints' / 'squeezenet1_1-b8a52dc0.pth'}" in out, out
        assert "kdc never downloads" in out and "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth" in out
    assert file_snapshot(in_tmp) == before
