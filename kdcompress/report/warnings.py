"""The report's warnings: results that should not be trusted or shipped as they stand, one sentence each."""

from __future__ import annotations

import math
from pathlib import Path

from ..recipe import Recipe
from ..run.layout import recipe_path
from ..stats import NOISE_Z, accuracy_se
from .budget import budget_warnings
from .text import standard_errors

__all__ = ["report_warnings"]


def _near_chance(row: dict) -> bool:
    """Test accuracy within three standard errors of guessing (at least 2 points, for large test sets)."""
    chance, n = row["chance_accuracy"], row["test_samples"]
    margin = max(0.02, 3 * accuracy_se(chance, n)) if n else 0.02
    return row["accuracy"] <= chance + margin


# A training loss this many times its first batch's: training diverged, whatever the epochs' means show.
LOSS_GROWTH_LIMIT = 1e6
TRAIN_SECTIONS = {"teacher": "teacher", "pruned": "prune"}  # the recipe section a stage trains with; else distill


def _untrained_warnings(row: dict, where: str) -> list[str]:
    """A stage whose result means nothing: trained 0 epochs, a teacher at chance, a loss that exploded."""
    stage, settings, accuracy = row["stage"], row.get("settings") or {}, row.get("accuracy")
    section = TRAIN_SECTIONS.get(stage, "distill")
    supplied = settings.get("supplied_from")  # teacher.checkpoint: trained elsewhere, 0 epochs here is right
    scored = f" ({accuracy:.1%})" if accuracy is not None else ""
    warnings = []
    if row.get("epochs") == 0 and not supplied:
        what = {
            "teacher": "its random initial weights and every stage distilled from it learned from noise",
            "pruned": "the distilled model as it was, with no retraining after pruning",
        }.get(stage, "its random initial weights")
        warnings.append(
            f"{stage}: trained 0 epochs ({section}.epochs: 0), so it is {what}; its test accuracy{scored} measures "
            f"no training. `kdc run {where} --set {section}.epochs={getattr(Recipe(), section).epochs}` trains it."
        )
    elif (
        stage == "teacher"
        and accuracy is not None
        and row.get("chance_accuracy") is not None
        and _near_chance(row)
        and not _chance_after_training(row)
    ):
        fix = (
            f"check that teacher.checkpoint ({supplied}) holds a trained model for this dataset, prepared like "
            f"this data"
            if supplied
            else f"check teacher.lr ({settings.get('lr')}) and teacher.epochs ({settings.get('epochs')}), and that the "
            f"data's labels match its images"
        )
        warnings.append(
            f"teacher: test accuracy {accuracy:.1%} is at chance (1/{row['num_classes']} = "
            f"{row['chance_accuracy']:.1%}, within noise of guessing): it has nothing to teach, so the distilled "
            f"and pruned rows say nothing about distillation; {fix}."
        )
    curve = row.get("curve") or []
    # per-batch values where recorded; a checkpoint from before they were has the epochs' means only
    first = (curve[0].get("first_batch_loss") or curve[0].get("train_loss")) if curve else None
    peak = max((p.get("max_batch_loss") or p.get("train_loss") or 0.0 for p in curve), default=None)
    if first is not None and peak is not None and first > 0 and peak > LOSS_GROWTH_LIMIT * first:
        lr = settings.get("lr")
        lr = f"{lr:g}" if isinstance(lr, (int, float)) else lr
        warnings.append(
            f"{stage}: its training loss grew from {first:.3g} (first batch) to {peak:.3g}, more than a million "
            f"times: training diverged, and its test accuracy{scored} comes from broken weights. Lower "
            f"{section}.lr ({lr} with {settings.get('optimizer')}; adam and adamw usually train near 0.001, sgd "
            f"near 0.05) with `kdc run {where} --set {section}.lr=VALUE`."
        )
    return warnings


def _chance_after_training(row: dict) -> bool:
    """At chance on the test set while the last training epoch was good: a mismatch, not an untrained model."""
    chance, train = row.get("chance_accuracy"), row.get("train_accuracy")
    # "good": at least halfway from guessing to perfect
    return chance is not None and train is not None and _near_chance(row) and train >= chance + 0.5 * (1.0 - chance)


def report_warnings(report: dict, run_dir: str | Path | None = None) -> list[str]:
    """Results in ``report`` that should not be trusted or shipped as they stand, one sentence each.

    Commands in them name the run directory ``run_dir``; without it, ``RUN_DIR`` (report.json does not
    depend on where the run directory is, so the warnings it holds say RUN_DIR).
    """
    where = str(run_dir if run_dir is not None else report.get("run_dir") or "RUN_DIR")  # run_dir: reports before v1
    warnings = _stale_warnings(report, where)
    for row in report["stages"]:
        warnings.extend(_untrained_warnings(row, where))
        warnings.extend(_chance_warnings(row))
    for art in report.get("artifacts", []):
        warnings.extend(_artifact_warnings(art, where))
    by_stage = {r["stage"]: r for r in report["stages"]}
    # a teacher with nothing to teach (its own warning above says why): tuning distillation would not help
    teacher = by_stage.get("teacher")
    hopeless = teacher is not None and bool(_untrained_warnings(teacher, where))
    for comp in report.get("comparisons", []):
        warnings.extend(_distillation_warnings(comp, by_stage, hopeless))
    for comp in report.get("comparisons", []):
        warnings.extend(_seed_distillation_warnings(comp, by_stage, hopeless))
    warnings.extend(budget_warnings(report))
    return warnings


def _stale_warnings(report: dict, where: str) -> list[str]:
    """A stage whose checkpoint is not what the run's recipe.yaml now describes, or why that is not known."""
    warnings = []
    recipe_file = recipe_path(where)
    for row in report["stages"]:
        if row.get("stale"):
            warnings.append(
                f"{row['stage']} is stale: its checkpoint is not what {recipe_file} now describes ({row['stale']}); "
                f"its row shows that older checkpoint. `kdc run {where}` reruns what is out of date."
            )
    if report.get("stale_check_problem"):
        warnings.append(
            f"cannot tell whether the stages are up to date: {report['stale_check_problem']}; the rows show the "
            f"checkpoints as they are."
        )
    return warnings


def _chance_warnings(row: dict) -> list[str]:
    """A stage at chance on the test set after a good last training epoch: why that may be, and what to do."""
    chance, train = row.get("chance_accuracy"), row.get("train_accuracy")
    if not _chance_after_training(row):
        return []
    message = (
        f"{row['stage']}: test accuracy {row['accuracy']:.1%} is at chance (1/{row['num_classes']} = "
        f"{chance:.1%}) while its last training epoch reached {train:.1%}. "
    )
    used = row["settings"].get("bn_recalibrate_batches")
    if row.get("has_batchnorm") and not used:
        message += (
            "Its BatchNorm running statistics have probably not settled (a slow momentum such as "
            "torchvision:mobilenet_v3_small's 0.01, few epochs); recompute them after training with "
            "`--set run.bn_recalibrate=100` (or `run: {bn_recalibrate: 100}` in the recipe) and rerun, "
            "or train longer."
        )
    elif row.get("has_batchnorm"):
        message += (
            f"Its BatchNorm statistics were already recomputed from {used} training batches; check that "
            f"the test data is prepared like the training data."
        )
    else:
        message += "Check that the test data is prepared like the training data, and the learning rate."
    return [message]


def _artifact_warnings(art: dict, where: str) -> list[str]:
    """An exported file refused, stale, not timed, or scoring below the checkpoint it was made from."""
    if art.get("refused"):
        return [f"artifact {art['path']} was not loaded: {art['refused']}"]
    warnings = []
    if art.get("stale"):
        warnings.append(
            f"artifact {art['path']} is stale: {art['stale']}; `kdc export {where} --force` writes it again."
        )
    if art.get("latency_problem"):
        warnings.append(f"artifact {art['path']}: latency not measured ({art['latency_problem']})")
    change, se = art.get("accuracy_change_vs_stage"), art.get("accuracy_se")
    if change is not None and se is not None and change < -max(0.005, NOISE_Z * math.sqrt(2) * se):
        warnings.append(
            f"artifact {art['path']} scores {-change * 100:.2f} points below the {art['stage']} checkpoint it was "
            f"made from ({art['accuracy']:.2%} against {art['stage_accuracy']:.2%}); ship it only if that loss "
            f"is acceptable" + (", or export with more --bits" if art.get("format") == "shared" else "") + "."
        )
    return warnings


def _distillation_warnings(comp: dict, by_stage: dict, hopeless: bool) -> list[str]:
    """Distilled below the student trained alone in a run of one seed: within noise or beyond it."""
    if (comp["stage"], comp["against"]) != ("distilled", "student") or comp["difference"] >= 0:
        return []
    d, s = by_stage["distilled"], by_stage["student"]
    seeded = comp.get("seeds") or {}
    if seeded.get("n", 0) > 1:  # several seeds: their mean decides, not the first seed's run alone
        return []
    message = (
        f"distillation came out worse than the baseline: distilled {d['accuracy']:.2%} against the student "
        f"trained alone {s['accuracy']:.2%}, {-comp['difference'] * 100:.2f} points lower"
    )
    if comp["se"] is None:
        message += (
            "; its noise is unknown (the checkpoints predate the recorded test-set size: rerun the stages with "
            "--force to record it)."
        )
    elif comp["within_noise"]:
        message += (
            f", within noise (standard error of the difference {comp['se'] * 100:.2f} points, "
            f"{standard_errors(comp)}): this run shows no gain from distillation, and no loss either."
        )
    else:
        message += (
            f", beyond noise ({standard_errors(comp, 'standard errors')} of {comp['se'] * 100:.2f} points): "
            + _retry_hint((d.get("settings") or {}).get("distill_loss", "kd"), hopeless)
        )
    return [message]


def _seed_distillation_warnings(comp: dict, by_stage: dict, hopeless: bool) -> list[str]:
    """Distilled below the student trained alone on average over several seeds: within seed noise or beyond."""
    seeded = comp.get("seeds") or {}
    if (comp["stage"], comp["against"]) != ("distilled", "student") or seeded.get("n", 0) < 2:
        return []
    if seeded["mean"] >= 0:
        return []
    d, s = by_stage["distilled"], by_stage["student"]
    message = (
        f"distillation came out worse than the baseline over {seeded['n']} seeds: distilled "
        f"{d['accuracy_mean']:.2%} against the student trained alone {s['accuracy_mean']:.2%} on average, "
        f"{-seeded['mean'] * 100:.2f} points lower (std {seeded['std'] * 100:.2f}, standard error of the mean "
        f"{seeded['se'] * 100:.2f} points)"
    )
    if -seeded["mean"] <= NOISE_Z * seeded["se"]:
        message += f", within seed noise (at most {NOISE_Z:g} SE): no gain from distillation, and no loss either."
    else:
        message += f", beyond seed noise (more than {NOISE_Z:g} SE): " + _retry_hint(
            (d.get("settings") or {}).get("distill_loss", "kd"), hopeless
        )
    return [message]


def _retry_hint(loss: str, hopeless_teacher: bool = False) -> str:
    """What to change when the distilled student came out worse, for each kind of ``distill.loss``.

    ``hopeless_teacher``: the teacher itself is untrained or diverged, so the fix is there, not in the loss.
    """
    if hopeless_teacher:
        return "fix the teacher first (see its warning): a student distilled from it learns nothing to gain."
    if loss == "dkd":
        # beta T^2 makes DKD's gradient some beta*T times KD's: a small student without BatchNorm can diverge
        return "try a lower distill.dkd_beta or distill.lr, another distill.temperature, or more distill.epochs."
    if loss != "kd":
        return "try other distill.loss_args, or more distill.epochs."
    return "try another distill.temperature or distill.alpha, or more distill.epochs."
