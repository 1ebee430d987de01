"""Feature terms in the distilled stage (``distill.features``): hint and attention transfer, end to end.

Small CNNs on the shipped mini set, a one-epoch teacher and a two-epoch distilled stage, so each run
takes seconds. The hint run's adapters bridge a width gap (teacher channels 16/32, student 8/16).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import TINY_RECIPE, _deep_merge

from kdcompress.checkpoint import load_checkpoint

RUN = "runs/tiny"
CNNS = {
    "teacher": {"model": "cnn", "args": {"channels": [16, 32], "hidden": 32}, "epochs": 1},
    "student": {"model": "cnn", "args": {"channels": [8, 16], "hidden": 16}, "baseline": False},
    "prune": {"epochs": 1},
}
HINT = [{"teacher": "features.3", "student": "features.3", "loss": "hint", "weight": 1.0}]
AT = [
    {"teacher": "features.3", "student": "features.3", "loss": "at", "weight": 100.0},
    {"teacher": "features.7", "student": "features.7", "loss": "at", "weight": 100.0},
]


def recipe_text(features=None, **changes) -> str:
    recipe = _deep_merge(TINY_RECIPE, _deep_merge(CNNS, changes))
    if features is not None:
        recipe["distill"]["features"] = features
    return yaml.safe_dump(recipe, sort_keys=False)


def feature_losses(run_dir) -> list[float]:
    lines = (run_dir / RUN / "distilled" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["feature_loss"] for line in lines]


@pytest.fixture(scope="module")
def hint_run(fresh_run):
    """An uninterrupted `kdc run` with a hint term between mismatched widths."""
    work, _ = fresh_run(recipe_text(HINT), "hint", "run")
    return work


@pytest.fixture(scope="module")
def at_run(fresh_run):
    work, _ = fresh_run(recipe_text(AT), "at", "run")
    return work


def test_at_between_two_cnns_runs_end_to_end_and_its_feature_loss_falls(at_run):
    for stage in ("teacher", "distilled", "pruned"):
        assert (at_run / RUN / stage / "model.pt").is_file()
    losses = feature_losses(at_run)
    assert len(losses) == 2 and losses[0] > 0
    assert losses[1] < losses[0], losses


def test_hint_between_mismatched_widths_runs_and_saves_no_adapter(hint_run):
    from kdcompress import load_model
    from kdcompress.models import SmallCNN

    ckpt = load_checkpoint(hint_run / RUN / "distilled" / "model.pt")
    own = set(SmallCNN(channels=(8, 16), hidden=16).state_dict())
    assert set(ckpt["state_dict"]) == own  # no "adapters.*", no "student." prefix
    model, _ = load_model(hint_run / RUN / "distilled" / "model.pt")
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    losses = feature_losses(hint_run)
    assert losses[1] < losses[0], losses


def test_feature_terms_change_the_distilled_student(at_run, kdc, monkeypatch):
    """The same recipe without feature terms reruns only the distilled stage and gives other weights."""
    with_features = load_checkpoint(at_run / RUN / "distilled" / "model.pt")["state_dict"]
    teacher_bytes = (at_run / RUN / "teacher" / "model.pt").read_bytes()
    (at_run / "plain.yaml").write_text(recipe_text(), encoding="utf-8")
    monkeypatch.chdir(at_run)
    result = kdc("distill", "plain.yaml")
    kdc.assert_clean_exit(result, 0)
    assert "distilled: rerunning" in kdc.flat(result) and "distill.features" in kdc.flat(result)
    assert (at_run / RUN / "teacher" / "model.pt").read_bytes() == teacher_bytes  # not retrained
    plain = load_checkpoint(at_run / RUN / "distilled" / "model.pt")["state_dict"]
    assert set(plain) == set(with_features)
    assert not torch.equal(plain["features.0.weight"], with_features["features.0.weight"])


def test_interrupted_hint_distillation_resumes_to_the_same_weights(
    hint_run, in_tmp, kdc, fail_training, checkpoints_equal
):
    (in_tmp / "recipe.yaml").write_text(recipe_text(HINT), encoding="utf-8")
    fired = fail_training("distilled", epoch=2, batch=5)
    first = kdc("run", "recipe.yaml")
    assert fired["fired"]
    kdc.assert_clean_exit(first, 130)
    state = torch.load(in_tmp / RUN / "distilled" / "state.pt", weights_only=True)
    assert any(k.startswith("adapters.") for k in state["model"]), "the adapters must be part of the resume state"
    second = kdc("run", "recipe.yaml")
    kdc.assert_clean_exit(second, 0)
    assert "distilled: resuming after epoch 1/2" in kdc.flat(second)
    checkpoints_equal(in_tmp / RUN / "distilled" / "model.pt", hint_run / RUN / "distilled" / "model.pt")


def test_unknown_module_name_is_a_validate_error_with_a_suggestion(in_tmp, kdc, file_snapshot):
    bad = [{"teacher": "features.3", "student": "feature.3", "loss": "hint"}]
    (in_tmp / "recipe.yaml").write_text(recipe_text(bad), encoding="utf-8")
    before = file_snapshot(in_tmp)
    for command in ("validate", "run"):
        result = kdc(command, "recipe.yaml")
        kdc.assert_clean_exit(result, 2)
        out = kdc.flat(result)
        assert "distill.features.0.student" in out and "did you mean 'features.3'" in out, out
    assert file_snapshot(in_tmp) == before


def test_at_between_different_resolutions_is_a_validate_error(in_tmp, kdc):
    bad = [{"teacher": "features.3", "student": "features.7", "loss": "at"}]  # 14x14 against 7x7
    (in_tmp / "recipe.yaml").write_text(recipe_text(bad), encoding="utf-8")
    result = kdc("validate", "recipe.yaml")
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    assert "distill.features.0" in out and "same height and width" in out, out


def test_hint_between_maps_and_vectors_is_a_validate_error(in_tmp, kdc):
    bad = [{"teacher": "classifier.1", "student": "features.3", "loss": "hint"}]
    (in_tmp / "recipe.yaml").write_text(recipe_text(bad), encoding="utf-8")
    result = kdc("validate", "recipe.yaml")
    kdc.assert_clean_exit(result, 2)
    assert "hint adapter" in kdc.flat(result)


def test_a_term_without_a_module_path_is_a_recipe_error(in_tmp, kdc):
    (in_tmp / "recipe.yaml").write_text(recipe_text([{"teacher": "features.3", "loss": "at"}]), encoding="utf-8")
    result = kdc("validate", "recipe.yaml")
    kdc.assert_clean_exit(result, 2)
    assert "distill.features.0.student" in kdc.flat(result) and "is missing" in kdc.flat(result)


def test_no_feature_terms_keeps_the_distilled_fingerprint_inputs():
    """Recipes written before distill.features existed keep their fingerprints (the key is left out at [])."""
    from kdcompress.recipe import recipe_from_dict, recipe_to_dict
    from kdcompress.run import stage_inputs

    plain = stage_inputs(recipe_to_dict(recipe_from_dict(TINY_RECIPE)), "distilled")
    assert not any("features" in key for key in plain)
    with_terms = stage_inputs(
        recipe_to_dict(recipe_from_dict(_deep_merge(TINY_RECIPE, {"distill": {"features": HINT}}))), "distilled"
    )
    assert with_terms["distill.features"] == [dict(HINT[0])]


def test_the_report_names_the_feature_terms_of_the_distilled_stage_only(at_run):
    report = json.loads((at_run / RUN / "report.json").read_text())
    by_stage = {row["stage"]: row for row in report["stages"]}
    terms = by_stage["distilled"]["settings"]["features"]
    assert terms == [{k: term[k] for k in ("loss", "teacher", "student", "weight")} for term in AT]
    assert "features" not in by_stage["pruned"]["settings"]
    md = (at_run / RUN / "report.md").read_text()
    assert f"+ at {terms[0]['student']} <- teacher {terms[0]['teacher']}" in md
