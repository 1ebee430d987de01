"""Pruning schedules (issue 9, part 1): one plan in batches for `kdc validate` and the run.

* agp follows Zhu & Gupta's formula at every step, on a real pruner and in a real run;
* iterative reproduces the old step targets and step positions for a numeric ``every``;
* one-shot prunes to the target at batch 0;
* ``every: auto`` spaces the steps evenly over the first two thirds of retraining, first at batch 0;
* what validates runs, and what would fail fails at validation (the 3-batch ``every: 0.5`` case);
* a target that even one step per batch cannot reach is one clear message, given promptly;
* ``kdc prune --rate 0.05`` works on the shipped quickstart recipe;
* an interrupted agp stage resumes to the same weights;
* the report names the pruning schedule, apart from the learning-rate schedule.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kdcompress.checkpoint import load_checkpoint
from kdcompress.data import DATASETS, batches_per_epoch, dataset_summary, load_data
from kdcompress.errors import ScheduleError
from kdcompress.prune import MagnitudePruner, plan_schedule
from kdcompress.recipe import DataSection, PruneSection, parse_recipe, pruning_steps_needed


def merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 10))  # the quickstart student: 79,400 weights


def agp_formula(t: int, t0: int, n: int, dt: int, s_i: float, s_f: float) -> float:
    return s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3


def gaps(at) -> set[int]:
    return {b - a for a, b in zip(at, at[1:])}


# --------------------------------------------------------------------------- agp


@pytest.mark.parametrize(
    "s_i, n, target, scope", [(0.0, 10, 0.9, "global"), (0.2, 7, 0.8, "layer"), (0.0, 45, 0.95, "global")]
)
def test_agp_sparsity_at_every_step_is_the_formula_and_the_pruner_reaches_the_target(s_i, n, target, scope):
    prune = PruneSection(
        sparsity_schedule="agp", steps=n, initial_sparsity=s_i, target_sparsity=target, epochs=8, scope=scope
    )
    plan = plan_schedule(prune, batches_per_epoch=79)
    dt = (math.ceil(2 / 3 * 8 * 79)) // (n + 1)
    t0 = 0
    # t0 itself is a step only when it prunes something (s_i > 0)
    assert len(plan.at) == (n + 1 if s_i > 0 else n)
    assert plan.at[-1] == t0 + n * dt and gaps(plan.at) == {dt}
    pruner = MagnitudePruner(net(), rate=0.3, target_sparsity=target, scope=scope)
    for t, s in zip(plan.at, plan.sparsity):
        assert s == pytest.approx(agp_formula(t, t0, n, dt, s_i, target), abs=1e-12)
        assert plan.due(t) == s
        pruner.prune_to(s)
        # measured on the weights: the formula, to within rounding to whole weights (one per layer)
        assert pruner.sparsity() == pytest.approx(s, abs=2 / 1000)
    assert abs(pruner.sparsity() - target) <= 0.005
    assert plan.sparsity[-1] == target
    # the cubic ramp: big steps first, small ones last
    increments = [b - a for a, b in zip(plan.sparsity, plan.sparsity[1:])]
    assert increments == sorted(increments, reverse=True)


def test_agp_steps_auto_take_as_many_steps_as_iterative_at_rate():
    prune = PruneSection(sparsity_schedule="agp", rate=0.05, target_sparsity=0.9)
    assert len(plan_schedule(prune, 79).at) == pruning_steps_needed(0.05, 0.9) == 45


# --------------------------------------------------------------------------- iterative


def old_hook_steps(rate: float, target: float, every: float, bpe: int, batches: int, seed: int = 0):
    """What the pruning stage did before schedules: step() every round(every * bpe) batches until done."""
    pruner = MagnitudePruner(net(seed), rate=rate, target_sparsity=target)
    interval = max(1, int(round(every * bpe)))
    steps = []
    for step in range(batches):
        if step % interval == 0 and not pruner.done:
            pruner.step()
            steps.append((step, pruner.mask_sparsity()))
    return steps


@pytest.mark.parametrize(
    "rate, target, every, bpe, epochs",
    [(0.3, 0.9, 0.5, 79, 8), (0.2, 0.9, 1.0, 469, 20), (0.5, 0.75, 0.5, 79, 2), (0.05, 0.9, 0.1, 79, 8)],
)
def test_iterative_reproduces_the_old_step_positions_and_targets(rate, target, every, bpe, epochs):
    prune = PruneSection(rate=rate, target_sparsity=target, every=every, epochs=epochs)
    plan = plan_schedule(prune, bpe)
    old = old_hook_steps(rate, target, every, bpe, epochs * bpe)
    assert plan.at == tuple(step for step, _ in old)
    expected = [min(target, 1 - (1 - rate) ** k) for k in range(1, len(old) + 1)]
    assert plan.sparsity == pytest.approx(expected, abs=1e-12)
    pruner = MagnitudePruner(net(), rate=rate, target_sparsity=target)
    for (step, old_sparsity), s in zip(old, plan.sparsity):
        pruner.prune_to(s)
        # the old step() rounded what each step removes, prune_to rounds the running total: a few weights apart
        assert abs(pruner.mask_sparsity() - old_sparsity) * 79_400 <= 3, step
    assert pruner.mask_sparsity() == pytest.approx(target, abs=1 / 79_400)


# --------------------------------------------------------------------------- one-shot


def test_one_shot_prunes_to_the_target_at_batch_0_then_only_fine_tunes():
    plan = plan_schedule(PruneSection(sparsity_schedule="one-shot", target_sparsity=0.8, every=0.3), 79)
    assert plan.at == (0,) and plan.sparsity == (0.8,)
    assert [step for step in range(8 * 79) if plan.due(step) is not None] == [0]
    pruner = MagnitudePruner(net(), rate=0.3, target_sparsity=0.8)
    pruner.prune_to(plan.due(0))
    assert abs(pruner.sparsity() - 0.8) <= 0.005


def test_a_target_of_zero_plans_no_steps():
    plan = plan_schedule(PruneSection(target_sparsity=0.0, epochs=0), 79)
    assert plan.at == () and plan.due(0) is None


# --------------------------------------------------------------------------- every: auto


@pytest.mark.parametrize("schedule", ["iterative", "agp"])
@pytest.mark.parametrize("rate, epochs, bpe", [(0.05, 8, 79), (0.3, 8, 79), (0.2, 20, 469), (0.5, 2, 3), (0.3, 2, 7)])
def test_every_auto_spaces_steps_evenly_over_the_first_two_thirds(schedule, rate, epochs, bpe):
    prune = PruneSection(rate=rate, target_sparsity=0.9, epochs=epochs, sparsity_schedule=schedule)
    assert prune.every == "auto"  # the default
    plan = plan_schedule(prune, bpe)
    batches = epochs * bpe
    window = math.ceil(2 / 3 * batches)
    slots = pruning_steps_needed(rate, 0.9) + (schedule == "agp")
    interval = max(1, window // slots)
    assert gaps(plan.at) <= {interval}  # evenly spaced, whole batches
    if schedule == "iterative":
        assert plan.at[0] == 0
    else:  # agp starts at t0 = 0 with s_i = 0: its first pruning step is one interval later
        assert plan.at[0] == interval
    if slots <= window:
        assert plan.at[-1] < window  # the last third recovers at the target
    assert plan.at[-1] < batches
    assert plan.sparsity[-1] == 0.9


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.01, 0.95),
    target=st.floats(0.01, 0.99),
    epochs=st.integers(1, 30),
    bpe=st.integers(1, 500),
    schedule=st.sampled_from(["iterative", "agp", "one-shot"]),
    every=st.one_of(st.just("auto"), st.floats(0.01, 3.0)),
)
def test_a_planned_schedule_fits_in_retraining_and_ends_at_the_target(rate, target, epochs, bpe, schedule, every):
    prune = PruneSection(rate=rate, target_sparsity=target, epochs=epochs, sparsity_schedule=schedule, every=every)
    try:
        plan = plan_schedule(prune, bpe)
    except ScheduleError as exc:
        assert str(exc).startswith(("prune.epochs: too few epochs", "prune.every: too few epochs")), exc
        return
    assert 0 <= plan.at[0] and plan.at[-1] < epochs * bpe
    assert plan.sparsity[-1] == target and all(0 < s <= target for s in plan.sparsity)
    if every == "auto" and schedule != "one-shot" and len(plan.at) <= math.ceil(2 / 3 * epochs * bpe) // 2:
        assert plan.at[-1] < math.ceil(2 / 3 * epochs * bpe)


# --------------------------------------------------------------------------- validate and run agree


def test_validation_counts_the_batches_the_run_trains_on():
    for section in (
        DataSection(),
        DataSection(val_split=0.1, batch_size=100),
        DataSection(batch_size=3334),
        DataSection(val_split=0.37, batch_size=7),
    ):
        size = dataset_summary(section)[2]
        data = load_data(section)
        assert size == len(data.train)
        assert batches_per_epoch(size, section.batch_size) == data.train.num_batches(section.batch_size)


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file(),
    reason="full Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_the_full_fashion_mnist_size_in_DATASETS_is_its_training_split():
    assert DATASETS["fashion-mnist"][5] == len(load_data(DataSection(dataset="fashion-mnist")).train) == 60_000


# About 3 batches per epoch (10,000 images in batches of 3334) and every: 0.5: 1.5 batches in epochs, 2 when
# rounded to whole batches. Rate 0.5 needs 4 steps to 90 %: in epochs they end at 1.5 of 2 (it validated),
# in batches at batch 7 of 6 (the run failed, after all of its retraining).
THREE_BATCHES = {
    "data": {"batch_size": 3334},
    "prune": {"rate": 0.5, "target_sparsity": 0.9, "every": 0.5, "epochs": 2},
}


def test_validate_rejects_what_the_run_could_not_do_the_three_batch_case(in_tmp, write_recipe, kdc):
    write_recipe(changes=THREE_BATCHES)
    result = kdc("validate", "recipe.yaml")
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    assert "prune.every: too few epochs" in out
    assert "0.5 epoch(s) is 2 batch(es) at 3 batches per epoch" in out
    assert "last step would come at batch 7" in out and "6 batches of retraining" in out
    assert "prune.every: auto" in out and "raise prune.epochs to 3" in out


def test_the_three_batch_case_fails_before_retraining_and_runs_with_every_auto(in_tmp, write_recipe, kdc):
    write_recipe(changes=merged(THREE_BATCHES, {"student": {"baseline": False}}))
    # every stage checks the whole recipe first, so the earlier ones need a prune schedule that fits; prune.every
    # is not one of their inputs, so they stay up to date below
    for command in ("train-teacher", "distill"):
        kdc.assert_clean_exit(kdc(command, "recipe.yaml", "--set", "prune.every=auto"), 0)
    refused = kdc("prune", "recipe.yaml")
    kdc.assert_clean_exit(refused, 2)
    assert "prune.every: too few epochs" in kdc.flat(refused)
    assert "pruned epoch" not in refused.output  # not one batch of retraining spent
    assert not (in_tmp / "runs" / "tiny" / "pruned").exists()

    # the fixes it names work, and what validates runs
    for fix in (["--set", "prune.every=auto"], ["--set", "prune.every=0.333"], ["--set", "prune.epochs=3"]):
        kdc.assert_clean_exit(kdc("validate", "recipe.yaml", *fix), 0)
    result = kdc("prune", "recipe.yaml", "--set", "prune.every=auto")
    kdc.assert_clean_exit(result, 0)
    metrics = load_checkpoint(in_tmp / "runs" / "tiny" / "pruned" / "model.pt")["metrics"]
    assert metrics["pruning_steps"] == 4
    assert abs(metrics["sparsity"] - 0.9) <= 0.005


# --------------------------------------------------------------------------- impossible targets


def test_a_target_that_one_step_per_batch_cannot_reach_is_one_clear_message(in_tmp, write_recipe, kdc):
    write_recipe(changes={"data": {"batch_size": 5000}, "prune": {"rate": 0.001, "every": "auto", "epochs": 1}})
    result = kdc("validate", "recipe.yaml")
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    assert "prune.epochs: too few epochs to reach the target even at one pruning step per batch" in out
    assert "rate 0.001 needs 1386 pruning steps" in out
    assert "only 2 batches of retraining (1 epoch x 2 batches per epoch)" in out
    assert "raise prune.rate or prune.epochs" in out
    assert "10,000 training samples of fashion-mnist-mini in batches of 5000" in out


def test_a_tiny_rate_is_refused_promptly():
    with pytest.raises(ScheduleError, match=r"rate 1e-20 needs \d+ pruning steps .* only 632 batches"):
        plan_schedule(PruneSection(rate=1e-20), 79)


def test_keys_only_agp_reads_are_refused_with_another_schedule():
    with pytest.raises(Exception, match=r"prune\.steps .*sets the number of agp steps.*sparsity_schedule: agp"):
        parse_recipe("prune: {steps: 20}")
    with pytest.raises(Exception, match=r"prune\.initial_sparsity .*starting sparsity of agp"):
        parse_recipe("prune: {sparsity_schedule: one-shot, initial_sparsity: 0.3}")
    with pytest.raises(Exception, match=r"agp is a pruning schedule: set prune\.sparsity_schedule"):
        parse_recipe("prune: {schedule: agp}")


def test_every_auto_or_a_number_through_yaml_set_and_the_resolved_recipe(in_tmp, write_recipe, kdc):
    assert parse_recipe("prune: {every: auto}").prune.every == "auto"
    assert parse_recipe("prune: {every: 2}").prune.every == 2.0
    assert parse_recipe("", overrides=["prune.every=0.25"]).prune.every == 0.25
    assert parse_recipe("prune: {every: 1}", overrides=["prune.every=auto"]).prune.every == "auto"
    with pytest.raises(Exception, match=r"prune\.every .*expected auto or a number, got text 'sometimes'"):
        parse_recipe("prune: {every: sometimes}")
    with pytest.raises(Exception, match=r"prune\.every .*must be > 0"):
        parse_recipe("prune: {every: 0}")
    # the resolved recipe a run writes reads back the same
    write_recipe(changes={"prune": {"every": "auto", "sparsity_schedule": "agp", "steps": 3}})
    kdc.assert_clean_exit(kdc("train-teacher", "recipe.yaml"), 0)
    resolved = yaml.safe_load((in_tmp / "runs" / "tiny" / "recipe.yaml").read_text())
    assert resolved["prune"]["every"] == "auto" and resolved["prune"]["steps"] == 3
    again = kdc("validate", str(in_tmp / "runs" / "tiny" / "recipe.yaml"))
    kdc.assert_clean_exit(again, 0)
    assert "agp: 3 steps" in kdc.flat(again)


# --------------------------------------------------------------------------- the product's own command


def test_kdc_prune_rate_0_05_works_on_the_shipped_quickstart(in_tmp, kdc):
    """`kdc prune --rate 0.05` on the built-in quickstart (its prune section as shipped, every: auto), with the
    epochs shortened for test time: before schedules it exited 2 ('rate 0.05 needs 45 pruning steps')."""
    shorter = [
        "--set",
        "teacher.model=mlp",
        "--set",
        "teacher.args={hidden: [32]}",
        "--set",
        "teacher.epochs=1",
        "--set",
        "distill.epochs=1",
        "--set",
        "student.baseline=false",
        "--set",
        "prune.epochs=2",
        "--set",
        "report.latency=false",
    ]
    for command in ("train-teacher", "distill"):
        kdc.assert_clean_exit(kdc(command, *shorter), 0)
    result = kdc("prune", "--rate", "0.05", *shorter)
    kdc.assert_clean_exit(result, 0)
    ckpt = load_checkpoint(in_tmp / "runs" / "quickstart" / "pruned" / "model.pt")
    assert ckpt["recipe"]["prune"]["every"] == "auto" and ckpt["recipe"]["prune"]["rate"] == 0.05
    assert ckpt["metrics"]["pruning_steps"] == 45
    assert ckpt["metrics"]["target_sparsity"] == 0.9
    assert abs(ckpt["metrics"]["sparsity"] - 0.9) <= 0.005


def test_kdc_validate_accepts_rate_0_05_on_every_shipped_recipe(kdc):
    from kdcompress.cli import shipped_recipes
    from kdcompress.recipe import load_recipe

    for name, path in shipped_recipes().items():
        result = kdc("validate", str(path), "--set", "prune.rate=0.05")
        kdc.assert_clean_exit(result, 0)
        prune = load_recipe(path).prune
        if prune.sparsity_schedule == "iterative" and prune.target_sparsity == 0.9:
            assert "prune schedule: iterative: 45 steps" in kdc.flat(result), name
        else:  # the CNN recipe: agp in a fixed number of steps, which --rate does not change
            assert f"prune schedule: {prune.sparsity_schedule}:" in kdc.flat(result), name


# --------------------------------------------------------------------------- a real agp run, and its resume

AGP = {
    "prune": {
        "sparsity_schedule": "agp",
        "steps": 6,
        "every": "auto",
        "rate": 0.5,
        "target_sparsity": 0.75,
        "epochs": 2,
    }
}


@pytest.fixture(scope="module")
def agp_run(fresh_run, tiny_recipe_text):
    text = yaml.safe_dump(merged(yaml.safe_load(tiny_recipe_text), AGP), sort_keys=False)
    return fresh_run(text, "agp", "run")[0]


def test_an_agp_run_follows_its_plan_epoch_by_epoch(agp_run):
    plan = plan_schedule(PruneSection(**AGP["prune"]), 79)  # 10,000 images in batches of 128
    assert plan.at == (15, 30, 45, 60, 75, 90)
    rows = [json.loads(line) for line in (agp_run / "runs/tiny/pruned/metrics.jsonl").read_text().splitlines()]
    for row in rows:
        last = max(t for t in plan.at if t < row["epoch"] * 79)
        assert row["sparsity"] == pytest.approx(plan.due(last), abs=1e-3), row
        assert row["pruning_steps"] == plan.at.index(last) + 1
    metrics = load_checkpoint(agp_run / "runs/tiny/pruned/model.pt")["metrics"]
    assert abs(metrics["sparsity"] - 0.75) <= 0.005 and metrics["pruning_steps"] == 6


def test_an_interrupted_agp_stage_resumes_mid_schedule_to_the_same_weights(
    agp_run, in_tmp, write_recipe, kdc, fail_training, checkpoints_equal
):
    write_recipe(changes=AGP)
    fired = fail_training("pruned", epoch=2, batch=5)  # after 5 of the 6 steps; the 6th comes after the resume
    kdc.assert_clean_exit(kdc("run", "recipe.yaml"), 130)
    assert fired["fired"]
    result = kdc("run", "recipe.yaml")
    kdc.assert_clean_exit(result, 0)
    assert "pruned: resuming after epoch 1/2" in kdc.flat(result)
    for stage in ("teacher", "student", "distilled", "pruned"):
        checkpoints_equal(in_tmp / "runs/tiny" / stage / "model.pt", agp_run / "runs/tiny" / stage / "model.pt")


@pytest.mark.parametrize(
    "prune, words",
    [
        ({}, "iterative, rate 0.3, steps spaced automatically to target 90% in 7 steps"),
        ({"sparsity_schedule": "agp", "every": 0.5}, "agp, a step every 0.5 epochs to target 90% in 7 steps"),
        ({"sparsity_schedule": "one-shot"}, "one-shot to target 90% in 7 steps"),
    ],
)
def test_the_report_names_the_pruning_schedule_beside_the_learning_rate_schedule(prune, words):
    from kdcompress.recipe import recipe_to_dict
    from kdcompress.report.collect import stage_settings
    from kdcompress.report.text import settings_text

    recipe = recipe_to_dict(parse_recipe(yaml.safe_dump({"prune": prune})))
    text = settings_text(stage_settings("pruned", recipe, {"target_sparsity": 0.9, "pruning_steps": 7}))
    assert words in text
    assert "lr 0.01 cosine" in text  # prune.schedule: the learning-rate schedule, as before
