"""The logit-loss registry (issue 11, part 2): DKD, a user's own loss by import path, and their recipe keys.

DKD (Zhao et al. 2022) is checked against the paper's definitions written out
in float64 with plain exp/log/sum: TCKD, the KL divergence of the binary
(target, not target) distributions; NCKD, the KL divergence among the
non-target classes; both scaled by T^2 and averaged over the batch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdcompress.distill import LOSSES, dkd_loss, dkd_warmup_factor, get_loss, kd_loss
from kdcompress.errors import RecipeError
from kdcompress.names import loss_name_problem
from kdcompress.recipe import DistillSection, parse_recipe, recipe_to_dict
from kdcompress.run import STAGES, stage_named
from kdcompress.run.losses import make_logit_loss

RUN = Path("runs") / "tiny"


def hand_parts(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, T: float) -> tuple[float, float]:
    """(TCKD, NCKD) from the paper's definitions, float64, batch mean, without T^2."""
    tckd = nckd = 0.0
    for si, ti, yi in zip(s.double().tolist(), t.double().tolist(), y.tolist()):

        def probs(z):
            m = max(z)
            e = [math.exp((v - m) / T) for v in z]
            total = sum(e)
            return [v / total for v in e]

        ps, pt = probs(si), probs(ti)
        bs, bt = [ps[yi], 1 - ps[yi]], [pt[yi], 1 - pt[yi]]
        tckd += sum(a * (math.log(a) - math.log(b)) for a, b in zip(bt, bs))
        qs = [p / (1 - ps[yi]) for k, p in enumerate(ps) if k != yi]
        qt = [p / (1 - pt[yi]) for k, p in enumerate(pt) if k != yi]
        nckd += sum(a * (math.log(a) - math.log(b)) for a, b in zip(qt, qs))
    return tckd / len(y), nckd / len(y)


def batch(seed: int, n: int = 12, c: int = 10, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    t = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    return s, t, torch.randint(0, c, (n,), generator=g)


# --------------------------------------------------------------------------- the loss itself


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("T, alpha, beta", [(4.0, 1.0, 8.0), (1.0, 0.5, 2.0), (2.0, 2.0, 0.5), (8.0, 1.0, 1.0)])
def test_dkd_matches_the_papers_definitions_in_float64(seed, T, alpha, beta):
    s, t, y = batch(seed)
    tckd, nckd = hand_parts(s, t, y, T)
    got = dkd_loss(s, t, y, alpha=alpha, beta=beta, temperature=T)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(T * T * (alpha * tckd + beta * nckd), rel=1e-9, abs=1e-12)


def test_dkd_with_beta_0_and_alpha_1_is_tckd_alone():
    s, t, y = batch(7)
    tckd, nckd = hand_parts(s, t, y, 4.0)
    assert nckd > 1e-3  # so leaving NCKD out shows
    got = dkd_loss(s, t, y, alpha=1.0, beta=0.0, temperature=4.0)
    assert got.item() == pytest.approx(16.0 * tckd, rel=1e-9)


def test_dkd_matches_the_papers_reference_code_on_moderate_logits():
    """mdistiller's dkd_loss (softmax, the target masked with -1000), written out: the same value, T^2 included."""
    s, t, y = batch(3)
    T, alpha, beta = 4.0, 1.0, 8.0
    gt = F.one_hot(y, s.shape[1]).bool()
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    cat = lambda p: torch.stack([(p * gt).sum(1), (p * ~gt).sum(1)], 1)  # noqa: E731
    tckd = F.kl_div(torch.log(cat(ps)), cat(pt), reduction="sum") * T**2 / len(y)
    nckd = (
        F.kl_div(F.log_softmax(s / T - 1000.0 * gt, 1), F.softmax(t / T - 1000.0 * gt, 1), reduction="sum")
        * T**2
        / len(y)
    )
    expected = alpha * tckd + beta * nckd
    assert dkd_loss(s, t, y, alpha, beta, T).item() == pytest.approx(expected.item(), rel=1e-9)


def test_dkd_gradcheck_float64():
    s, t, y = batch(1, n=5, c=6)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: dkd_loss(x, t, y, alpha=1.0, beta=8.0, temperature=4.0), (s,))
    assert torch.autograd.gradgradcheck(lambda x: dkd_loss(x, t, y, alpha=0.7, beta=2.0, temperature=2.0), (s,))


def test_dkd_stays_finite_where_one_minus_p_underflows():
    """A student sure of the target (p = 1 in float32): log(1 - p) would be -inf; the logsumexp form is finite."""
    s = torch.tensor([[400.0, 0.0, -3.0, 1.0]], requires_grad=True)
    t = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    y = torch.tensor([0])
    loss = dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 1.0  # the teacher gives the other classes a real share
    assert torch.isfinite(s.grad).all()


def test_dkd_refuses_mismatched_shapes_and_float_targets():
    s, t, y = batch(0)
    with pytest.raises(ValueError, match="same"):
        dkd_loss(s, t[:, :5], y)
    with pytest.raises(ValueError, match="class indices"):
        dkd_loss(s, t, y.double())


@pytest.mark.parametrize(
    "epoch, warmup, factor",
    [
        (0, 20, 1 / 20),
        (9, 20, 10 / 20),
        (19, 20, 1.0),
        (30, 20, 1.0),
        (0, 2, 0.5),
        (1, 2, 1.0),
        (0, 0, 1.0),
    ],
)
def test_warmup_factor_rises_linearly_then_stays_at_one(epoch, warmup, factor):
    assert dkd_warmup_factor(epoch, warmup) == pytest.approx(factor)


def test_the_pipelines_dkd_loss_is_ce_plus_the_warmed_up_term_at_each_epoch():
    """The epoch comes from the hook fit calls before every batch: first, middle and after the warm-up."""
    s, t, y = batch(5)
    d = DistillSection(loss="dkd", dkd_alpha=1.0, dkd_beta=8.0, temperature=4.0)
    loss, hooks = make_logit_loss(d, warmup=4)
    (clock,) = hooks
    term = dkd_loss(s, t, y, 1.0, 8.0, 4.0)
    ce = F.cross_entropy(s, y)
    batches_per_epoch = 10
    for epoch, factor in ((0, 0.25), (1, 0.5), (3, 1.0), (7, 1.0)):
        clock.on_batch_start(epoch * batches_per_epoch + 3, batches_per_epoch)
        assert loss(s, t, y).item() == pytest.approx((ce + factor * term).item(), rel=1e-12), epoch


def test_the_registry_names_kd_and_dkd_and_suggests_a_close_name():
    assert LOSSES == {"kd": kd_loss, "dkd": dkd_loss}
    assert get_loss("dkd") is dkd_loss
    assert "did you mean 'dkd'" in loss_name_problem("dkdd")
    with pytest.raises(RecipeError, match="distill.loss: unknown loss 'kdd'"):
        get_loss("kdd")


# --------------------------------------------------------------------------- recipe keys and fingerprints


def test_the_new_keys_at_their_defaults_leave_every_fingerprint_as_it_was(tiny_recipe_text):
    """Run directories made before distill.loss existed stay up to date: no new key is an input at its default."""
    resolved = recipe_to_dict(parse_recipe(tiny_recipe_text))
    for stage in STAGES:
        inputs = stage.inputs(resolved)
        assert not {
            "distill.loss",
            "distill.dkd_alpha",
            "distill.dkd_beta",
            "distill.dkd_warmup",
            "distill.loss_args",
        } & set(inputs), stage.name


def test_dkd_keys_retrain_the_stages_that_use_them(tiny_recipe_text):
    base = recipe_to_dict(parse_recipe(tiny_recipe_text, overrides=["distill.loss=dkd"]))
    inputs = lambda overrides, stage: stage_named(stage).inputs(  # noqa: E731
        recipe_to_dict(parse_recipe(tiny_recipe_text, overrides=["distill.loss=dkd", *overrides]))
    )
    assert stage_named("distilled").inputs(base)["distill.loss"] == "dkd"
    assert stage_named("pruned").inputs(base)["distill.loss"] == "dkd"
    assert inputs(["distill.dkd_beta=2"], "distilled") != stage_named("distilled").inputs(base)
    assert inputs(["distill.dkd_beta=2"], "pruned") != stage_named("pruned").inputs(base)
    # the warm-up belongs to the distilled stage: pruning retrains an already distilled student at full weight
    assert inputs(["distill.dkd_warmup=3"], "distilled") != stage_named("distilled").inputs(base)
    assert inputs(["distill.dkd_warmup=3"], "pruned") == stage_named("pruned").inputs(base)


@pytest.mark.parametrize(
    "changes, key, words",
    [
        ({"dkd_beta": 4.0}, "distill.dkd_beta", "set distill.loss: dkd"),
        ({"dkd_warmup": 5}, "distill.dkd_warmup", "set distill.loss: dkd"),
        ({"loss": "dkd", "alpha": 0.9}, "distill.alpha", "cross-entropy keeps weight 1"),
        ({"loss_args": {"w": 1}}, "distill.loss_args", "package.module:function"),
        ({"loss": "dkdd"}, "distill.loss", "did you mean 'dkd'"),
        ({"loss": "no_such_losses_mod:fn"}, "distill.loss", "cannot import 'no_such_losses_mod'"),
        ({"loss": "no colon"}, "distill.loss", "unknown loss"),
    ],
)
def test_bad_loss_settings_are_one_clear_recipe_error(in_tmp, write_recipe, kdc, changes, key, words):
    path = write_recipe(changes={"distill": changes})
    result = kdc("run", path)
    kdc.assert_clean_exit(result, 2)
    text = kdc.flat(result)
    assert key in text and words in text, text
    assert "line" in text  # where in the file
    assert not (in_tmp / "runs").exists()


def test_a_user_loss_with_a_misspelt_function_gets_a_suggestion(in_tmp, write_recipe, kdc):
    (in_tmp / "kdc_test_losses_b.py").write_text("def my_loss(s, t, y, args):\n    return s.sum()\n")
    path = write_recipe(changes={"distill": {"loss": "kdc_test_losses_b:my_los"}})
    result = kdc("validate", path)
    kdc.assert_clean_exit(result, 2)
    assert "did you mean 'my_loss'" in kdc.flat(result)


# --------------------------------------------------------------------------- end to end


def test_kdc_run_with_dkd_trains_from_the_teacher_cache(in_tmp, write_recipe, kdc):
    # lr 0.01: beta T^2 makes DKD's gradient ~beta*T times KD's, too strong at lr 0.05 for this MLP without BatchNorm
    path = write_recipe(changes={"distill": {"loss": "dkd", "lr": 0.01}, "prune": {"distill": True}})
    result = kdc("run", path)
    kdc.assert_clean_exit(result, 0)
    report = json.loads((in_tmp / RUN / "report.json").read_text())
    rows = {r["stage"]: r for r in report["stages"]}
    settings = rows["distilled"]["settings"]
    assert settings["distill_loss"] == "dkd" and settings["dkd_beta"] == 8.0
    assert settings["dkd_warmup"] == 2  # 20 epochs of warm-up, clipped to the 2 distill epochs
    assert rows["pruned"]["settings"]["dkd_warmup"] == 0
    assert rows["distilled"]["accuracy"] > 0.6  # it learnt (chance is 0.1)
    assert list((in_tmp / RUN / "cache").glob("teacher-logits-*.pt"))
    assert "DKD T=4.0 alpha=1.0 beta=8.0, warm-up 2 epochs" in kdc.flat(result)


USER_LOSS = """
import json
import torch.nn.functional as F

CALLS = []


def soft_mse(student_logits, teacher_logits, targets, args):
    if not CALLS:  # the first call shows what the loss is given
        with open("loss-call.json", "w") as f:
            json.dump({"student": list(student_logits.shape), "teacher": list(teacher_logits.shape),
                       "targets": list(targets.shape), "args": args}, f)
    CALLS.append(1)
    return F.cross_entropy(student_logits, targets) + args["w"] * F.mse_loss(student_logits, teacher_logits)


def not_scalar(student_logits, teacher_logits, targets, args):
    return (student_logits - teacher_logits) ** 2
"""


@pytest.mark.parametrize("crop", [0, 2], ids=["cached-teacher", "online-teacher"])
def test_a_users_loss_beside_the_recipe_runs_end_to_end(tmp_path, monkeypatch, write_recipe, kdc, crop):
    module = f"kdc_test_losses_{crop}"  # a new module name per case: Python caches imports
    folder = tmp_path / "experiment"
    write_recipe(
        where=folder,
        changes={
            "data": {"crop_padding": crop},
            "distill": {"loss": f"{module}:soft_mse", "loss_args": {"w": 0.5}},
        },
    )
    (folder / f"{module}.py").write_text(USER_LOSS)
    monkeypatch.chdir(tmp_path)  # the module is found beside the recipe, not in the working directory
    kdc.assert_clean_exit(kdc("train-teacher", "experiment/recipe.yaml"), 0)
    result = kdc("distill", "experiment/recipe.yaml")
    kdc.assert_clean_exit(result, 0)
    call = json.loads((tmp_path / "loss-call.json").read_text())
    assert call == {"student": [128, 10], "teacher": [128, 10], "targets": [128], "args": {"w": 0.5}}
    metrics = [json.loads(line) for line in (tmp_path / RUN / "distilled" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["test_accuracy"] > 0.6
    assert bool(list((tmp_path / RUN / "cache").glob("teacher-logits-*.pt"))) == (crop == 0)
    assert f"distillation {module}:soft_mse args {{'w': 0.5}}" in kdc.flat(kdc("report", RUN))


def test_a_user_loss_that_returns_no_scalar_is_a_clear_error(in_tmp, write_recipe, kdc):
    (in_tmp / "kdc_test_losses_c.py").write_text(USER_LOSS)
    path = write_recipe(changes={"distill": {"loss": "kdc_test_losses_c:not_scalar"}})
    kdc.assert_clean_exit(kdc("train-teacher", path), 0)
    result = kdc("distill", path)
    kdc.assert_clean_exit(result, 1)
    text = kdc.flat(result)
    assert "distill.loss: kdc_test_losses_c:not_scalar returned a tensor of shape (128, 10)" in text, text
    assert "scalar tensor" in text


def test_validate_names_the_loss_and_its_settings(in_tmp, write_recipe, kdc):
    result = kdc("validate", write_recipe(changes={"distill": {"loss": "dkd", "dkd_beta": 2.0}}))
    kdc.assert_clean_exit(result, 0)
    assert "(DKD, T=4.0, alpha=1.0, beta=2.0, warm-up 2 epochs)" in kdc.flat(result)
