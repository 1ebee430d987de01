"""`kdc sensitivity` (issue 21) on a distilled CNN student trained one epoch on fashion-mnist-mini.

* It exits 0, prints a table, writes sensitivity.json; the same command again reuses it, a changed setting
  measures again; `kdc report` then charts every group.
* Without a distilled stage: one clear error naming `kdc distill`, exit 2, no traceback.
* The test split is never read: with the test labels shuffled (and with a test split that fails on any
  use), the numbers are exactly those of the clean data.
* A damaged sensitivity.json is refused by load_sensitivity with a clear message, measured again by the
  command, and shown as a problem by the report.
* Without a validation split the note says training images were scored; with one, the validation split is.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import kdcompress.run.sensitivity as sensitivity_run
from kdcompress.data import TensorData, load_data
from kdcompress.errors import CheckpointError
from kdcompress.recipe import recipe_from_dict
from kdcompress.run.sensitivity import load_sensitivity, search_split

RECIPE = {
    "run": {"name": "sens", "seed": 0, "device": "cpu"},
    "data": {"dataset": "fashion-mnist-mini", "batch_size": 128},
    "teacher": {"model": "mlp", "args": {"hidden": [32]}, "epochs": 1},
    "student": {"model": "cnn", "args": {"channels": [8, 16], "hidden": 32}, "baseline": False},
    "distill": {"epochs": 1},
    "prune": {"method": "structured", "scope": "layer", "sensitivity_ratios": [0.3, 0.9], "sensitivity_samples": 400},
    "report": {"latency": False},
}
RUN = Path("runs") / "sens"


@pytest.fixture(scope="module")
def distilled(fresh_run):
    """A folder with recipe.yaml and runs/sens holding the teacher and distilled stages."""
    return fresh_run(yaml.safe_dump(RECIPE), "sensitivity", "train-teacher", "distill")[0]


@pytest.fixture
def work(distilled, tmp_path, monkeypatch):
    """A private copy of the distilled run, made the working directory."""
    folder = tmp_path / "work"
    shutil.copytree(distilled, folder)
    monkeypatch.chdir(folder)
    return folder


def numbers(path: Path) -> dict:
    """What sensitivity.json measured: the baseline and the curves (not the time it took)."""
    data = json.loads(path.read_text())
    return {"baseline": data["baseline"], "groups": data["groups"], "samples": data["samples"]}


def test_it_writes_the_file_prints_a_table_and_reuses_it_until_a_setting_changes(work, kdc):
    result = kdc("sensitivity", "recipe.yaml")
    kdc.assert_clean_exit(result, 0)
    path = work / RUN / "sensitivity.json"
    written = json.loads(path.read_text())
    assert [g["name"] for g in written["groups"]] == ["features.0", "features.4", "classifier.1"]
    assert written["ratios"] == [0.3, 0.9] and written["samples"] == 400 and written["split"] == "train"
    assert "training images" in written["note"]
    flat = kdc.flat(result)
    assert "features.0" in result.stdout and "classifier.1" in result.stdout and "wrote" in flat
    stamp = path.stat().st_mtime_ns

    again = kdc("sensitivity", str(RUN))  # the run directory, as `kdc report` and `kdc export` take
    kdc.assert_clean_exit(again, 0)
    assert "reused" in kdc.flat(again) and path.stat().st_mtime_ns == stamp

    changed = kdc("sensitivity", "recipe.yaml", "--samples", "200", "--ratios", "0.5")
    kdc.assert_clean_exit(changed, 0)
    assert "another checkpoint or settings" in kdc.flat(changed)
    rewritten = json.loads(path.read_text())
    assert rewritten["samples"] == 200 and rewritten["ratios"] == [0.5] and rewritten["key"] != written["key"]

    report = kdc("report", str(RUN))
    kdc.assert_clean_exit(report, 0)
    block = json.loads((work / RUN / "report.json").read_text())["sensitivity"]
    assert block["stale"] is False and len(block["groups"]) == 3
    documented = set(
        re.findall(r"`([A-Za-z_0-9]+)`", Path(__file__).parents[2].joinpath("docs/report-json.md").read_text())
    )
    keys = set(block) | set(block["baseline"]) | {k for g in block["groups"] for k in g}
    assert keys <= documented, sorted(keys - documented)
    html = (work / RUN / "report.html").read_text()
    section = html[html.index('<section id="sensitivity">') :]
    section = section[: section.index("</section>")]
    assert section.count("<svg") == 3  # one chart per group
    assert "## Sensitivity" in (work / RUN / "report.md").read_text()


def test_without_a_distilled_stage_one_clear_error(tmp_path, monkeypatch, kdc):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    result = kdc("sensitivity", "recipe.yaml")
    kdc.assert_clean_exit(result, 2)
    flat = kdc.flat(result)
    assert flat.count("error:") == 1 and "kdc distill recipe.yaml" in flat and "distilled" in flat
    assert not (tmp_path / RUN / "sensitivity.json").exists()


def test_bad_ratios_are_a_usage_error(work, kdc):
    for ratios in ("0.5,abc", "1.5"):
        result = kdc("sensitivity", "recipe.yaml", "--ratios", ratios)
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert "ratios" in kdc.flat(result)


class FailsOnUse:
    """A test split that fails the moment anything reads it."""

    def __getattr__(self, name):
        raise AssertionError(f"the test split was read ({name})")

    def __len__(self):
        raise AssertionError("the test split was read (len)")


def test_the_test_split_is_never_read(work, kdc, monkeypatch):
    kdc.assert_clean_exit(kdc("sensitivity", "recipe.yaml"), 0)
    clean = numbers(work / RUN / "sensitivity.json")
    real_load = sensitivity_run.load_data

    def poisoned(section, seed=0, console=None):
        data = real_load(section, seed=seed, console=console)
        shuffled = data.test.labels[torch.randperm(len(data.test), generator=torch.Generator().manual_seed(1))]
        assert (shuffled != data.test.labels).float().mean() > 0.5
        data.test = TensorData(data.test.images.flip(-1), shuffled, data.test.mean, data.test.std)
        return data

    monkeypatch.setattr(sensitivity_run, "load_data", poisoned)
    kdc.assert_clean_exit(kdc("sensitivity", "recipe.yaml", "--force"), 0)
    assert numbers(work / RUN / "sensitivity.json") == clean

    def unreadable(section, seed=0, console=None):
        data = real_load(section, seed=seed, console=console)
        data.test = FailsOnUse()
        return data

    monkeypatch.setattr(sensitivity_run, "load_data", unreadable)
    kdc.assert_clean_exit(kdc("sensitivity", "recipe.yaml", "--force"), 0)
    assert numbers(work / RUN / "sensitivity.json") == clean


def test_a_damaged_file_is_refused_then_measured_again(work, kdc):
    kdc.assert_clean_exit(kdc("sensitivity", "recipe.yaml"), 0)
    path = work / RUN / "sensitivity.json"
    data = json.loads(path.read_text())
    data["groups"][0]["drop"] = [1.0]
    path.write_text(json.dumps(data))
    with pytest.raises(
        CheckpointError, match=r"is damaged: groups\[0\] \(features.0\).drop has 1 entries.*kdc sensitivity runs/sens"
    ):
        load_sensitivity(RUN, None)
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="is damaged"):
        load_sensitivity(RUN, None)
    result = kdc("sensitivity", "recipe.yaml")
    kdc.assert_clean_exit(result, 0)
    assert "measuring again" in kdc.flat(result)
    assert load_sensitivity(RUN, None) is not None


def test_the_search_split_is_validation_when_held_out_else_a_fixed_training_subset():
    recipe = recipe_from_dict({**RECIPE, "data": {**RECIPE["data"], "val_split": 0.1}})
    data = load_data(recipe.data, seed=0)
    name, split, note = search_split(data, recipe)
    assert name == "val" and len(split) == 400 and "validation images" in note
    assert torch.equal(split.labels, search_split(data, recipe)[1].labels)  # the same images every time
    rows = {tuple(r.flatten().tolist()[:200:7]) for r in data.val.images}
    assert all(tuple(r.flatten().tolist()[:200:7]) in rows for r in split.images[:50])

    recipe = recipe_from_dict({**RECIPE, "prune": {**RECIPE["prune"], "sensitivity_samples": 50_000}})
    data = load_data(recipe.data, seed=0)
    name, split, note = search_split(data, recipe)
    assert name == "train" and len(split) == len(data.train)
    assert "no validation split" in note and "training images" in note


def test_each_pruned_copy_has_its_batchnorm_recomputed_from_training_batches_before_it_is_scored(
    work, kdc, monkeypatch
):
    calls = []
    real = sensitivity_run.recalibrate_batchnorm

    def counting(model, data, batches, batch_size, device, seed=0):
        calls.append((id(model), data, batches))
        return real(model, data, batches, batch_size, device, seed=seed)

    monkeypatch.setattr(sensitivity_run, "recalibrate_batchnorm", counting)
    kdc.assert_clean_exit(kdc("sensitivity", "recipe.yaml", "--ratios", "0.3,0.6"), 0)
    record = json.loads((work / RUN / "sensitivity.json").read_text())
    assert len(calls) == 1 + len(record["groups"]) * 2  # the baseline, then every group at every ratio
    assert {batches for _, _, batches in calls} == {20}
    train = load_data(recipe_from_dict(yaml.safe_load((work / "recipe.yaml").read_text())).data).train
    assert all(len(data) == len(train) for _, data, _ in calls)  # the training split, never the test split
    assert "BatchNorm statistics of each pruned copy recomputed from 20 training batches" in record["note"]

    calls.clear()
    off = kdc("sensitivity", "recipe.yaml", "--ratios", "0.3,0.6", "--set", "prune.sensitivity_bn_batches=0")
    kdc.assert_clean_exit(off, 0)
    assert calls == [] and "measured" in kdc.flat(off)  # another setting: measured again, scored as pruned
