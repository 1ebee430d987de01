"""Checks on a recipe that go beyond its schema: names resolve and the models fit the data.

``kdc validate`` runs these without training anything; every stage runs them
too before it starts, so a mismatch is found by a dry forward pass, not an
hour into training.
"""

from __future__ import annotations

import dataclasses

import torch

from ..data import batches_per_epoch, dataset_summary, plan_imagefolder, preprocess_info
from ..errors import ModelError, ScheduleError, describe
from ..export import check_formats
from ..features import FeatureTaps, at_loss, make_adapter, module_named
from ..measure import count_macs
from ..models import build_model, model_spec
from ..progress import tensorboard_writer_class
from ..prune import plan_schedule, prunable_weights
from ..recipe import Recipe
from ..supplied import load_pretrained, supplied_teacher
from ..views import teacher_path
from .budget import budget_words, planned_sparsity
from .layout import export_dir, tensorboard_dir
from .teacher_views import check_table_size

__all__ = ["check_recipe", "check_feature_terms"]


@torch.no_grad()
def check_recipe(recipe: Recipe) -> list[str]:
    """Build teacher and student, run one dry forward pass each, plan the pruning; return a short plan of the run.

    Raises one :class:`ModelError` that names every model problem found (the
    teacher's and the student's), not just the first; a :class:`ScheduleError`
    when the pruning steps do not fit in retraining, planned in batches exactly
    as the pruning stage will (:func:`kdcompress.prune.plan_schedule`, on one
    process); a :class:`~kdcompress.errors.MissingPackageError` when
    ``report.tensorboard`` is on and tensorboard is not installed.
    """
    folder = plan_imagefolder(recipe.data) if recipe.data.dataset.startswith("imagefolder:") else None
    input_shape, num_classes, train_size = dataset_summary(recipe.data, folder)
    # a supplied teacher is checked against the inputs the run feeds: measured statistics are known only once
    # the data is loaded, so the teacher stage checks those
    feeds = preprocess_info(recipe.data.dataset, input_shape)
    if folder is not None:
        known = folder.mean is not None
        feeds = preprocess_info(recipe.data.dataset, input_shape, folder.scan.classes, folder=folder) if known else None
    counts, built = _check_models(recipe, input_shape, num_classes, feeds)
    if recipe.distill.features:
        check_feature_terms(recipe.distill.features, built["teacher"], built["student"], input_shape)
    if recipe.export.formats:  # an export that cannot run should stop the run now, not after training
        check_formats(recipe.export.formats)
    if recipe.report.tensorboard:  # likewise: stop before training, not at the end of the first epoch
        tensorboard_writer_class()
    p = _schedule_section(recipe, built["student"], input_shape, num_classes)
    bpe = batches_per_epoch(train_size, recipe.data.batch_size)
    try:
        schedule = plan_schedule(p, bpe)
    except ScheduleError as exc:
        raise ScheduleError(
            f"{exc} (batches per epoch: {train_size:,} training samples of {recipe.data.dataset} in batches of "
            f"{recipe.data.batch_size})"
        ) from None
    lines = _plan_lines(
        recipe, counts, bpe, schedule, _targets_line(recipe, built, input_shape, train_size, num_classes)
    )
    if folder is not None:  # what kdc makes of the images, under the data line
        lines[2:2] = [f"  {line}" for line in folder.lines(recipe.data.val_split)]
    return lines


def _targets_line(recipe: Recipe, built: dict, input_shape, train_size: int, num_classes: int) -> str:
    """Where distillation gets the teacher's targets (:func:`kdcompress.views.teacher_path`) and what that costs,
    in MACs: a training step costs about 3 forward passes of the student (forward, then backward for inputs and
    weights), the online teacher one forward pass of its own on top."""
    path = teacher_path(recipe)
    if path == "cache":
        return "teacher targets: its logits on the training data, computed once and cached (no augmentation)"
    teacher = count_macs(built["teacher"], input_shape)
    step = 3 * count_macs(built["student"], input_shape)
    if path == "online":
        why = "feature terms need its activations" if recipe.distill.features else "augmentation, no teacher_cache"
        return (
            f"teacher targets: the teacher runs on every batch ({why}): a distillation epoch costs about "
            f"{(step + teacher) / step:.1f}x the MACs of a cross-entropy epoch"
            + ("" if recipe.distill.features else "; distill.teacher_cache: {views: K} runs it K times, once")
        )
    c = recipe.distill.teacher_cache
    size = check_table_size(c, train_size, num_classes)  # too large: refused now, not after the teacher trained
    return (
        f"teacher targets: {c.views} stored views per image (distill.teacher_cache): {c.views} teacher passes over "
        f"the training data before training ({c.views * teacher / step:.1f} cross-entropy epochs' MACs), a "
        f"{size / 2**20:,.0f} MiB table ({c.dtype}); a distillation epoch then costs what a cross-entropy one does"
    )


def _schedule_section(recipe: Recipe, student: torch.nn.Module, input_shape, num_classes: int):
    """The prune section the schedule is planned from: with a budget, its target_sparsity is the share of
    channels a uniform allocation on the fresh student removes (:func:`kdcompress.run.budget.planned_sparsity`)."""
    p = recipe.prune
    if not p.budget.is_set():
        return p
    spec = model_spec(recipe.student.model, recipe.student.args, num_classes, input_shape)
    return dataclasses.replace(p, target_sparsity=planned_sparsity(p, student, input_shape, spec))


def _check_models(recipe: Recipe, input_shape, num_classes: int, feeds: dict | None) -> tuple[dict, dict]:
    """``({teacher/student: parameter count}, {teacher/student: model})``; one ModelError naming every problem."""
    counts = {}
    built: dict = {}
    failures: list[str] = []
    for which in ("teacher", "student"):
        try:
            counts[which] = _check_model(recipe, which, input_shape, num_classes, built, feeds)
        except ModelError as exc:
            failures.append(str(exc))
    if failures:
        if len(failures) == 1:
            raise ModelError(failures[0])
        raise ModelError(f"{len(failures)} problems with the models:\n" + "\n".join(f"  {f}" for f in failures))
    return counts, built


def _plan_lines(recipe: Recipe, counts: dict, bpe: int, schedule, targets: str) -> list[str]:
    """The short plan of the run ``kdc validate`` prints, one line per part (``targets``: :func:`_targets_line`)."""
    p = recipe.prune
    return (
        [
            f"run directory: {recipe.run_dir}",
            f"data: {recipe.data.dataset}, batch {recipe.data.batch_size}, {bpe} batches per epoch",
            (
                f"teacher: supplied: {recipe.teacher.checkpoint} ({counts['teacher']:,} parameters), not trained"
                if recipe.teacher.checkpoint
                else f"teacher: {recipe.teacher.model} ({counts['teacher']:,} parameters), {recipe.teacher.epochs} epochs"
                + (", from torchvision's pretrained weights" if recipe.teacher.pretrained else "")
            ),
            f"student: {recipe.student.model} ({counts['student']:,} parameters), {recipe.distill.epochs} epochs "
            f"({_loss_words(recipe.distill)})" + (", plus a cross-entropy baseline" if recipe.student.baseline else ""),
            targets,
            (
                f"prune: structured to a budget of {budget_words(p)} (allocation: {p.allocation}), "
                f"{p.epochs} epochs of retraining"
                if p.budget.is_set()
                else f"prune: structured ({p.scope}, by {p.importance}), removing {p.target_sparsity:.0%} of the "
                f"prunable channels, {p.epochs} epochs of retraining"
                if p.method == "structured"
                else f"prune: {p.scope} magnitude to sparsity {p.target_sparsity}, {p.epochs} epochs of retraining"
            ),
            f"prune schedule: {schedule.describe()}"
            + (
                " (channel shares estimated from a uniform allocation on the untrained student; the pruned stage "
                "plans again on its allocation)"
                if p.budget.is_set()
                else ""
            ),
        ]
        + (
            [
                f"export: {', '.join(recipe.export.formats)} of the {recipe.export.stage} stage, to "
                f"{export_dir(recipe.run_dir)}"
            ]
            if recipe.export.formats
            else []
        )
        + (
            [f"tensorboard: scalars every epoch in {tensorboard_dir(recipe.run_dir)}/<stage>"]
            if recipe.report.tensorboard
            else []
        )
    )


def _loss_words(d) -> str:
    """The distillation loss and the settings it reads, for the plan ``kdc validate`` prints."""
    if d.loss == "kd":
        return f"T={d.temperature}, alpha={d.alpha}" + _feature_words(d)
    if d.loss == "dkd":
        return (
            f"DKD, T={d.temperature}, alpha={d.dkd_alpha}, beta={d.dkd_beta}, warm-up "
            f"{min(d.dkd_warmup, d.epochs)} epochs"
        ) + _feature_words(d)
    return f"loss {d.loss}" + (f" with args {d.loss_args}" if d.loss_args else "") + _feature_words(d)


def _feature_words(d) -> str:
    terms = ", ".join(f"{t.loss} {t.student}->{t.teacher} x{t.weight}" for t in d.features)
    return f"; feature terms: {terms}, teacher online" if terms else ""


def check_feature_terms(terms, teacher: torch.nn.Module, student: torch.nn.Module, input_shape, device="cpu") -> list:
    """Check ``distill.features`` on a dry forward pass of both models; return the (student, teacher) taps' outputs.

    Every module path must exist (a suggestion otherwise) and each pair's outputs must suit its loss
    (``at``: feature maps of the same height and width; ``hint``: an adapter can map the student's to the
    teacher's shape). All problems are reported at once, in one :class:`ModelError`.
    """
    problems = []
    for i, term in enumerate(terms):
        for side, model in (("teacher", teacher), ("student", student)):
            try:
                module_named(model, getattr(term, side), where=f"the {side}")
            except ModelError as exc:
                problems.append(f"distill.features.{i}.{side}: {exc}")
    if problems:
        raise ModelError(
            problems[0]
            if len(problems) == 1
            else f"{len(problems)} problems with distill.features:\n" + "\n".join(f"  {p}" for p in problems)
        )
    x = torch.zeros(2, *input_shape, device=device)
    with torch.no_grad():
        with FeatureTaps(teacher.eval(), {t.teacher for t in terms}, "the teacher") as t_taps:
            teacher(x)
        with FeatureTaps(student.eval(), {t.student for t in terms}, "the student") as s_taps:
            student(x)
    pairs = []
    for i, term in enumerate(terms):
        s, t = s_taps[term.student], t_taps[term.teacher]
        try:
            if not isinstance(s, torch.Tensor) or not isinstance(t, torch.Tensor):
                raise ValueError("both modules must output one tensor")
            if term.loss == "at":
                at_loss(s, t)
            else:
                make_adapter(s, t)
        except ValueError as exc:
            problems.append(
                f"distill.features.{i} ({term.loss}, student {term.student} -> teacher {term.teacher}): {exc}"
            )
        pairs.append((s, t))
    if problems:
        raise ModelError(
            problems[0]
            if len(problems) == 1
            else f"{len(problems)} problems with distill.features:\n" + "\n".join(f"  {p}" for p in problems)
        )
    return pairs


def _check_model(
    recipe: Recipe, which: str, input_shape, num_classes: int, built: dict | None = None, feeds: dict | None = None
) -> int:
    """Build one model of the recipe and run a dry forward pass; return its parameter count (``built[which]``: the
    model). A supplied teacher must have been fed as ``feeds`` says the run feeds it (None: not checked here)."""
    section = getattr(recipe, which)
    if which == "teacher" and section.checkpoint:  # the weights must load and fit, as the teacher stage will use them
        model = supplied_teacher(recipe, num_classes, input_shape, feeds)[0]
    else:
        model = build_model(model_spec(section.model, section.args, num_classes, input_shape), where=f"{which}.model")
        if which == "teacher" and section.pretrained:  # in the local cache, and fitting: found now, not after hours
            load_pretrained(model, section.model.split(":", 1)[1])
    model.eval()
    try:
        out = model(torch.zeros(2, *input_shape))
    except Exception as exc:
        raise ModelError(
            f"{which}.model: {section.model} fails on {recipe.data.dataset} inputs of shape {list(input_shape)}: "
            f"{type(exc).__name__}: {describe(exc)}"
        ) from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != num_classes:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(
            f"{which}.model: {section.model} gives outputs of shape {shape} on {recipe.data.dataset}, which has "
            f"{num_classes} classes; it must return logits of shape [batch, {num_classes}]"
        )
    if which == "student" and not prunable_weights(model, recipe.prune.include, recipe.prune.exclude):
        names = [n for n, _ in model.named_modules() if n]
        raise ModelError(
            f"prune.include/prune.exclude: they leave no Conv or Linear weights of the student ({section.model}) "
            f"to prune (include {recipe.prune.include}, exclude {recipe.prune.exclude}); its module names are: "
            f"{', '.join(names[:20])}"
        )
    if built is not None:
        built[which] = model
    return sum(p.numel() for p in model.parameters())
