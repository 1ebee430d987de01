"""One declaration per stage (issue 9, "one place per stage").

The fingerprint is derived from what a stage declares it reads, so a recipe
value a stage does not read can never make it rerun, and every value it
reads does. The CLI, the order and the report come from the same list.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdcompress.recipe import parse_recipe, recipe_to_dict
from kdcompress.run import COMMAND_OF, STAGE_NAMES, STAGES, stage_fingerprint, stage_named

RUN = Path("runs") / "tiny"

# A different valid value for every leaf key of the recipe (a change must keep the recipe valid).
CHANGED = {
    "run.name": "other",
    "run.seed": 7,
    "run.device": "auto",
    "run.out_dir": "elsewhere",
    "run.threads": 1,
    "run.precision": "bf16",
    "run.channels_last": True,
    "run.compile": True,
    "run.bn_recalibrate": 5,
    "data.dataset": "mnist",
    "data.root": "/tmp/x",
    "data.batch_size": 64,
    "data.eval_batch_size": 500,
    "data.val_split": 0.1,
    "data.crop_padding": 2,
    "data.hflip": True,
    "data.workers": 0,
    "student.baseline": False,
    "student.model": "lenet5",
    "student.args": {},
    "teacher.checkpoint": None,
    "teacher.pretrained": None,  # need a file and a torchvision model: test_own_teacher
    "distill.temperature": 2.0,
    "distill.alpha": 0.3,
    "distill.loss": "dkd",
    # read by dkd or a user's loss only: setting them with kd is refused (tests/test_dkd.py changes them under dkd)
    "distill.dkd_alpha": None,
    "distill.dkd_beta": None,
    "distill.dkd_warmup": None,
    "distill.loss_args": None,
    "distill.features": [{"teacher": "features.3", "student": "features.3", "loss": "at", "weight": 1.0}],
    "prune.rate": 0.6,
    "prune.target_sparsity": 0.5,
    "prune.every": "auto",
    "prune.method": "structured",
    "prune.importance": "l2",
    "prune.sparsity_schedule": "one-shot",
    "prune.steps": None,
    "prune.initial_sparsity": None,  # read by agp only: setting them with iterative is refused
    "prune.sensitivity_ratios": [0.5],
    "prune.allocation": None,  # sensitivity without a prune.budget is refused
    "report.latency": True,
    "report.latency_batches": [1],
    "report.threads": 1,
    "report.latency_batch": None,  # a deprecated alias of latency_batches: setting both is refused
    # what kdc export writes is made after the stages: no stage reads it
    "export.formats": ["sparse"],
    "export.stage": "distilled",
    "export.dtype": "fp32",
    "export.codec": "zlib",
    # kdc run --seeds: which run directories to make, not what a stage is made from. teacher.seed stands in for
    # run.seed in the teacher's inputs (tests/test_seeds.py): pinned to the run's own seed, it changes nothing
    "run.seeds": [0, 1],
    "teacher.seed": 0,
}


def _changed_value(key: str, value):
    if key in CHANGED:
        return CHANGED[key]
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return value + [max(value) + 1]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if 0 < value < 1 else value + 0.5
    if isinstance(value, list):
        return value + ["x*"]
    if key.endswith(".optimizer"):
        return "adam" if value != "adam" else "sgd"
    if key.endswith(".schedule") and value in ("constant", "step", "cosine"):
        return "step" if value != "step" else "cosine"
    if key.endswith(".model"):
        return "lenet5"
    if key.endswith(".args"):
        return {"dropout": 0.1}
    return None


def _leaves(recipe: dict):
    for section, values in recipe.items():
        for key, value in values.items():
            yield f"{section}.{key}", value


def _fingerprints(recipe) -> dict[str, str]:
    fake_upstream = {name: "u" * 16 for name in STAGE_NAMES}
    return {
        s.name: stage_fingerprint(recipe, s.name, {d: fake_upstream[d] for d in s.upstream(recipe)}) for s in STAGES
    }


def test_every_recipe_value_changes_exactly_the_stages_that_declare_it(tiny_recipe_text):
    base = parse_recipe(tiny_recipe_text)
    before = _fingerprints(base)
    resolved = recipe_to_dict(base)
    checked = 0
    for key, value in _leaves(resolved):
        new = _changed_value(key, value)
        if new is None:
            continue
        changed = parse_recipe(
            tiny_recipe_text, overrides=[f"{key}={json.dumps(new) if not isinstance(new, str) else new}"]
        )
        assert getattr(getattr(changed, key.split(".")[0]), key.split(".")[1]) != value, key
        after = _fingerprints(changed)
        for stage in STAGES:
            # a key marked omit_default is an input only once it leaves its default
            reads = key in stage.inputs(resolved) or key in stage.inputs(recipe_to_dict(changed))
            assert (after[stage.name] != before[stage.name]) == reads, (key, stage.name, reads)
        checked += 1
    assert checked >= 40  # nearly every leaf of the recipe was tried


def test_values_that_do_not_change_what_a_stage_makes_are_not_its_inputs(tiny_recipe_text):
    resolved = recipe_to_dict(parse_recipe(tiny_recipe_text))
    for stage in STAGES:
        inputs = stage.inputs(resolved)
        for key in ("data.workers", "student.baseline", "run.name", "run.out_dir", "report.latency"):
            assert key not in inputs, (stage.name, key)


def test_switching_the_baseline_off_reruns_neither_distilled_nor_pruned(in_tmp, write_recipe, kdc):
    write_recipe()
    kdc.assert_clean_exit(kdc("run", "recipe.yaml"), 0)
    digests = {s: (in_tmp / RUN / s / "model.pt").read_bytes() for s in ("teacher", "distilled", "pruned")}
    result = kdc("run", "recipe.yaml", "--set", "student.baseline=false")
    kdc.assert_clean_exit(result, 0)
    out = kdc.flat(result)
    for stage in ("teacher", "distilled", "pruned"):
        assert f"{stage}: up to date, skipped" in out
        assert (in_tmp / RUN / stage / "model.pt").read_bytes() == digests[stage]
    assert "student: training" not in out


def test_cli_order_and_report_come_from_the_declarations(kdc):
    from kdcompress.report import collect

    assert collect.STAGE_ORDER == STAGE_NAMES == ("teacher", "student", "distilled", "pruned")
    assert collect.DESCRIPTIONS == {s.name: s.description for s in STAGES}
    for stage in STAGES:
        result = kdc(stage.command, "--help")
        assert result.exit_code == 0, result.output
        assert stage.summary.split(":")[0] in " ".join(result.output.split())
        assert COMMAND_OF[stage.name] == f"kdc {stage.command}"
    prune_help = " ".join(kdc("prune", "--help").output.split())
    assert "--rate" in prune_help and "--target" in prune_help
    assert stage_named("pruned").upstream(parse_recipe("prune: {distill: false}")) == ("distilled",)
    with pytest.raises(KeyError):
        stage_named("nope")


def test_a_checkpoint_with_old_fingerprints_says_why_it_reruns(in_tmp, write_recipe, kdc):
    from kdcompress.files import manifest_path

    write_recipe()
    kdc.assert_clean_exit(kdc("train-teacher", "recipe.yaml"), 0)
    manifest = manifest_path(in_tmp / RUN / "teacher" / "model.pt")
    data = json.loads(manifest.read_text())
    data["fingerprint"], data["fingerprint_version"] = "0123456789abcdef", None  # as an earlier kdc wrote it
    manifest.write_text(json.dumps(data))
    result = kdc("train-teacher", "recipe.yaml")
    kdc.assert_clean_exit(result, 0)
    assert "written by an earlier kdc" in kdc.flat(result)
