"""Pruning to a budget through the pipeline (issue 21, item 2): `prune.budget.macs` end to end.

* `kdc validate` plans the schedule of a budget recipe before any model is trained and says so.
* `kdc run` on fashion-mnist-mini (a tiny CNN, one epoch a stage, agp in three steps) reaches MACs within
  3 % under the budget, measured on the real pruned model, and records it in the checkpoint and in
  report.json, report.md and report.html.
* Ctrl-C in the middle of the pruning schedule, then a rerun: the stage resumes and ends with the same
  weights as the uninterrupted run.
* allocation: sensitivity, with the sensitivity curves stood in for (the seam the lead wires to
  `kdc sensitivity`): the insensitive conv loses more channels; round_to 4 keeps multiples of 4.
* allocation: sensitivity for real: the pruned stage measures (or reuses) `kdc sensitivity`'s curves, and a
  poisoned test split (labels shuffled, images flipped) changes neither the curves nor the allocation.
* A latency budget on onnxruntime: each candidate is timed in turns with the distilled student, the search
  moves towards less pruning while candidates meet the budget, and the record holds both timings (how near a
  real budget it lands is timing, checked by the acceptance run, not here); one no candidate meets is one
  clear message.
* A budget that cannot be met stops the stage with one clear message.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from kdcompress.checkpoint import load_checkpoint
from kdcompress.measure import count_macs
from kdcompress.models import build_from_checkpoint

RUN = Path("runs") / "budget"
RECIPE = {
    "run": {"name": "budget", "seed": 0, "device": "cpu"},
    "data": {"dataset": "fashion-mnist-mini", "batch_size": 256},
    "teacher": {"model": "mlp", "args": {"hidden": [32]}, "epochs": 1},
    "student": {"model": "cnn", "args": {"channels": [8, 16], "hidden": 32}, "baseline": False},
    "distill": {"epochs": 1},
    # 40 batches an epoch, 120 in all: agp steps at batches 20, 40 and 60, so epoch 2 still prunes
    "prune": {
        "method": "structured",
        "sparsity_schedule": "agp",
        "steps": 3,
        "epochs": 3,
        "budget": {"macs": 0.3},
    },
    "report": {"latency": False},
}


def _text(**prune) -> str:
    recipe = json.loads(json.dumps(RECIPE))
    recipe["prune"].update(prune)
    return yaml.safe_dump(recipe, sort_keys=False)


@pytest.fixture(scope="module")
def budget_run(fresh_run):
    """An uninterrupted `kdc run` of the budget recipe (the reference the resumed run must match)."""
    return fresh_run(_text(), "budget", "run")[0]


def test_validate_plans_a_budget_schedule_before_anything_is_trained(tmp_path, kdc, monkeypatch):
    (tmp_path / "recipe.yaml").write_text(_text(allocation="sensitivity"))
    monkeypatch.chdir(tmp_path)
    result = kdc("validate", "recipe.yaml")
    kdc.assert_clean_exit(result, 0)
    out = kdc.flat(result)
    assert "prune: structured to a budget of macs 0.3 of the distilled student (allocation: sensitivity)" in out
    assert "prune schedule: agp: 3 steps" in out and "estimated from a uniform allocation" in out
    assert not (tmp_path / "runs").exists()


def test_the_pruned_model_reaches_the_macs_budget_within_3_percent_and_records_it(budget_run):
    run = budget_run / RUN
    distilled = build_from_checkpoint(load_checkpoint(run / "distilled" / "model.pt"))
    ckpt = load_checkpoint(run / "pruned" / "model.pt")
    pruned = build_from_checkpoint(ckpt)
    shape = tuple(ckpt["arch"]["input_shape"])
    target = 0.3 * count_macs(distilled, shape)
    reached = count_macs(pruned, shape)
    assert 0.97 * target <= reached <= target
    record = ckpt["metrics"]["budget"]
    assert record["kind"] == "macs" and record["value"] == 0.3 and record["method"] == "uniform"
    assert record["reached"] == reached and record["target"] == pytest.approx(target)
    assert record["reference"] == count_macs(distilled, shape) and not record["over"]
    assert "operator counter" in record["how_measured"]
    # the schedule ramped to the allocation's share of channels, and the stage measured that share
    assert ckpt["metrics"]["channel_sparsity"] == pytest.approx(ckpt["metrics"]["target_sparsity"])
    report = json.loads((run / "report.json").read_text())
    block = report["budget"]
    assert block["reached"] == reached and block["ratio_to_target"] == pytest.approx(reached / target)
    assert set(block["allocation"]) == {"features.0", "features.4", "classifier.1"}
    assert all(0 < share < 1 for share in block["allocation"].values())
    assert "## Budget" in (run / "report.md").read_text()
    html = (run / "report.html").read_text()
    assert '<section id="budget">' in html and "how measured" in html
    assert not report["warnings"]


def test_ctrl_c_mid_schedule_then_rerun_ends_with_the_same_weights(
    budget_run, tmp_path, monkeypatch, kdc, fail_training, checkpoints_equal
):
    work = tmp_path / "work"
    shutil.copytree(budget_run, work)
    shutil.rmtree(work / RUN / "pruned")
    monkeypatch.chdir(work)
    fired = fail_training("pruned", epoch=2, batch=10)  # after the steps at batches 20 and 40, before 60
    first = kdc("prune", "recipe.yaml")
    assert fired["fired"]
    kdc.assert_clean_exit(first, 130)
    import torch

    state = torch.load(work / RUN / "pruned" / "state.pt", weights_only=True)
    assert state["epoch"] == 1 and state["hooks"][0]["pruner"]["allocation"]
    second = kdc("prune", "recipe.yaml")
    kdc.assert_clean_exit(second, 0)
    assert "pruned: resuming after epoch 1/3" in kdc.flat(second)
    checkpoints_equal(work / RUN / "pruned" / "model.pt", budget_run / RUN / "pruned" / "model.pt")
    assert (
        load_checkpoint(work / RUN / "pruned" / "model.pt")["metrics"]["budget"]
        == load_checkpoint(budget_run / RUN / "pruned" / "model.pt")["metrics"]["budget"]
    )


def _prune_again(budget_run, tmp_path, monkeypatch, kdc, **prune):
    """Copy the finished run, change the prune section, rerun `kdc prune`; the pruned checkpoint."""
    work = tmp_path / "work"
    shutil.copytree(budget_run, work)
    shutil.rmtree(work / RUN / "pruned")
    recipe = yaml.safe_load((work / "recipe.yaml").read_text())
    recipe["prune"].update(prune, epochs=1, steps=2)
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(work)
    result = kdc("prune", "recipe.yaml")
    return result, work / RUN / "pruned" / "model.pt"


def test_sensitivity_allocation_through_the_seam_and_round_to_4(budget_run, tmp_path, monkeypatch, kdc):
    import kdcompress.run.bodies as bodies

    asked = []

    def curves(ctx):  # stands in for kdc sensitivity: the second conv is the sensitive one
        asked.append(ctx.stage)
        return {
            "features.0": [(0.5, 0.2), (0.9, 1.0)],
            "features.4": [(0.5, 5.0), (0.9, 30.0)],
            "classifier.1": [(0.5, 0.5), (0.9, 2.0)],
        }

    monkeypatch.setattr(bodies, "sensitivity_curves", curves)
    result, path = _prune_again(
        budget_run, tmp_path, monkeypatch, kdc, allocation="sensitivity", round_to=4, budget={"macs": 0.6}
    )
    kdc.assert_clean_exit(result, 0)
    assert asked == ["pruned"]
    ckpt = load_checkpoint(path)
    record = ckpt["metrics"]["budget"]
    assert record["method"] == "sensitivity" and record["round_to"] == 4
    assert record["allocation"]["features.0"] > record["allocation"]["features.4"]
    assert record["reached"] <= record["target"]
    model = build_from_checkpoint(ckpt)
    widths = [model.features[0].out_channels, model.features[4].out_channels, model.classifier[1].out_features]
    assert all(w % 4 == 0 for w in widths), widths
    assert "allocation (sensitivity)" in kdc.flat(result)


@pytest.mark.parametrize(
    "budget, words",
    [
        ({"macs": 500}, "prune.budget cannot be met"),
        ({"latency_ms": 1e-6}, "prune.budget cannot be met"),
    ],
)
def test_a_budget_that_cannot_be_met_is_one_clear_message(budget_run, tmp_path, monkeypatch, kdc, budget, words):
    result, path = _prune_again(budget_run, tmp_path, monkeypatch, kdc, budget=budget)
    kdc.assert_clean_exit(result, 1)
    assert words in kdc.flat(result)
    assert not path.exists()


def _poisoned_test_split(monkeypatch):
    """Make the run's data loader shuffle the test labels and flip the test images."""
    import torch

    import kdcompress.run.pipeline as pipeline
    from kdcompress.data import TensorData

    real_load = pipeline.load_data

    def poisoned(section, seed=0, console=None):
        data = real_load(section, seed=seed, console=console)
        shuffled = data.test.labels[torch.randperm(len(data.test), generator=torch.Generator().manual_seed(1))]
        data.test = TensorData(data.test.images.flip(-1), shuffled, data.test.mean, data.test.std)
        return data

    monkeypatch.setattr(pipeline, "load_data", poisoned)


def test_sensitivity_allocation_measures_the_curves_and_never_reads_the_test_split(
    budget_run, tmp_path, monkeypatch, kdc
):
    result, path = _prune_again(budget_run, tmp_path, monkeypatch, kdc, allocation="sensitivity")
    kdc.assert_clean_exit(result, 0)
    work = path.parent.parent.parent.parent
    curves = json.loads((work / RUN / "sensitivity.json").read_text())
    clean = load_checkpoint(path)["metrics"]["budget"]
    assert clean["method"] == "sensitivity" and clean["reached"] <= clean["target"]
    assert {g["name"] for g in curves["groups"]} == set(clean["allocation"])

    shutil.rmtree(work / RUN / "pruned")
    (work / RUN / "sensitivity.json").unlink()
    _poisoned_test_split(monkeypatch)
    again = kdc("prune", "recipe.yaml")
    kdc.assert_clean_exit(again, 0)
    poisoned = load_checkpoint(path)["metrics"]["budget"]
    assert json.loads((work / RUN / "sensitivity.json").read_text())["groups"] == curves["groups"]
    assert poisoned["allocation"] == clean["allocation"] and poisoned["reached"] == clean["reached"]


@pytest.mark.slow
def test_a_latency_budget_is_searched_on_the_table_and_checked_on_the_real_models(
    budget_run, tmp_path, monkeypatch, kdc
):
    monkeypatch.setenv("KDC_CACHE", str(tmp_path / "cache"))
    # a budget any structure meets (a tiny model's time is mostly fixed costs): the search keeps the least pruned
    budget = {"latency_ms": 1000.0, "batch": 16, "runtime": "onnxruntime"}
    result, path = _prune_again(budget_run, tmp_path, monkeypatch, kdc, budget=budget)
    kdc.assert_clean_exit(result, 0)
    record = load_checkpoint(path)["metrics"]["budget"]
    assert record["kind"] == "latency_ms" and 0 < record["reached"] <= 1000.0 and record["reference"] > 0
    assert record["target"] == 1000.0 and not record["over"]
    assert set(record["timing"]) == {"distilled", "pruned"}
    assert "onnxruntime" in record["timing"]["pruned"]["method"] and "onnxruntime" in record["how_measured"]
    out = kdc.flat(result)
    assert "try 1: 50.0% of the MACs timed" in out and "try 2: 70.7% of the MACs timed" in out  # bisection upwards


@pytest.mark.slow
def test_a_resumed_latency_budget_keeps_the_allocation_it_timed(budget_run, tmp_path, monkeypatch, kdc, fail_training):
    import torch

    monkeypatch.setenv("KDC_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "work"
    shutil.copytree(budget_run, work)
    shutil.rmtree(work / RUN / "pruned")
    recipe = yaml.safe_load((work / "recipe.yaml").read_text())
    # a budget any structure meets (the search would refuse one none meets before training starts)
    recipe["prune"]["budget"] = {"latency_ms": 1000.0, "batch": 16, "runtime": "onnxruntime"}
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(work)
    fired = fail_training("pruned", epoch=2, batch=10)
    first = kdc("prune", "recipe.yaml")
    assert fired["fired"]
    kdc.assert_clean_exit(first, 130)
    state = torch.load(work / RUN / "pruned" / "state.pt", weights_only=True)
    saved = state["hooks"][0]["pruner"]["allocation"]
    second = kdc("prune", "recipe.yaml")
    kdc.assert_clean_exit(second, 0)
    out = kdc.flat(second)
    assert "resuming towards the allocation the interrupted run timed" in out and "try 1:" not in out
    record = load_checkpoint(work / RUN / "pruned" / "model.pt")["metrics"]["budget"]
    assert record["allocation"] == {k: round(v, 6) for k, v in saved.items()} and record["predicted"] is None
    assert 0 < record["reached"] <= 1000.0 and record["target"] == 1000.0 and record["reference"] > 0
