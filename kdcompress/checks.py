"""Checks on a recipe that go beyond its schema: names resolve and the models fit the data.

``kdc validate`` runs these without training anything; every stage runs them
too before it starts, so a mismatch is found by a dry forward pass, not an
hour into training.
"""

from __future__ import annotations

import torch

from .data import batches_per_epoch, dataset_summary
from .errors import ModelError, ScheduleError, describe
from .models import build_model, model_spec
from .prune import plan_schedule, prunable_weights
from .recipe import Recipe

__all__ = ["check_recipe"]


@torch.no_grad()
def check_recipe(recipe: Recipe) -> list[str]:
    """Build teacher and student, run one dry forward pass each, plan the pruning; return a short plan of the run.

    Raises one :class:`ModelError` that names every model problem found (the
    teacher's and the student's), not just the first; a :class:`ScheduleError`
    when the pruning steps do not fit in retraining, planned in batches exactly
    as the pruning stage will (:func:`kdcompress.prune.plan_schedule`, on one
    process).
    """
    input_shape, num_classes, train_size = dataset_summary(recipe.data)
    counts = {}
    failures: list[str] = []
    for which in ("teacher", "student"):
        try:
            counts[which] = _check_model(recipe, which, input_shape, num_classes)
        except ModelError as exc:
            failures.append(str(exc))
    if failures:
        if len(failures) == 1:
            raise ModelError(failures[0])
        raise ModelError(f"{len(failures)} problems with the models:\n" + "\n".join(f"  {f}" for f in failures))
    if recipe.export.formats:  # an export that cannot run should stop the run now, not after training
        from .export import check_formats

        check_formats(recipe.export.formats)
    p = recipe.prune
    bpe = batches_per_epoch(train_size, recipe.data.batch_size)
    try:
        schedule = plan_schedule(p, bpe)
    except ScheduleError as exc:
        raise ScheduleError(
            f"{exc} (batches per epoch: {train_size:,} training samples of {recipe.data.dataset} in batches of "
            f"{recipe.data.batch_size})"
        ) from None
    return [
        f"run directory: {recipe.run_dir}",
        f"data: {recipe.data.dataset}, batch {recipe.data.batch_size}, {bpe} batches per epoch",
        (f"teacher: supplied: {recipe.teacher.checkpoint} ({counts['teacher']:,} parameters), not trained"
         if recipe.teacher.checkpoint else
         f"teacher: {recipe.teacher.model} ({counts['teacher']:,} parameters), {recipe.teacher.epochs} epochs"
         + (", from torchvision's pretrained weights" if recipe.teacher.pretrained else "")),
        f"student: {recipe.student.model} ({counts['student']:,} parameters), {recipe.distill.epochs} epochs "
        f"({_loss_words(recipe.distill)})"
        + (", plus a cross-entropy baseline" if recipe.student.baseline else ""),
        (f"prune: structured ({p.scope}, by {p.importance}), removing {p.target_sparsity:.0%} of the prunable "
         f"channels, {p.epochs} epochs of retraining" if p.method == "structured" else
         f"prune: {p.scope} magnitude to sparsity {p.target_sparsity}, {p.epochs} epochs of retraining"),
        f"prune schedule: {schedule.describe()}",
    ] + ([f"export: {', '.join(recipe.export.formats)} of the {recipe.export.stage} stage, to "
          f"{recipe.run_dir / 'export'}"] if recipe.export.formats else [])


def _loss_words(d) -> str:
    """The distillation loss and the settings it reads, for the plan ``kdc validate`` prints."""
    if d.loss == "kd":
        return f"T={d.temperature}, alpha={d.alpha}"
    if d.loss == "dkd":
        return (f"DKD, T={d.temperature}, alpha={d.dkd_alpha}, beta={d.dkd_beta}, warm-up "
                f"{min(d.dkd_warmup, d.epochs)} epochs")
    return f"loss {d.loss}" + (f" with args {d.loss_args}" if d.loss_args else "")


def _check_model(recipe: Recipe, which: str, input_shape, num_classes: int) -> int:
    """Build one model of the recipe and run a dry forward pass; return its parameter count."""
    section = getattr(recipe, which)
    if which == "teacher" and section.checkpoint:  # the weights must load and fit, as the teacher stage will use them
        from .data import preprocess_info
        from .supplied import supplied_teacher

        model = supplied_teacher(recipe, num_classes, input_shape, preprocess_info(recipe.data.dataset, input_shape))[0]
    else:
        model = build_model(model_spec(section.model, section.args, num_classes, input_shape), where=f"{which}.model")
        if which == "teacher" and section.pretrained:  # in the local cache, and fitting: found now, not after hours
            from .supplied import load_pretrained

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
    return sum(p.numel() for p in model.parameters())
