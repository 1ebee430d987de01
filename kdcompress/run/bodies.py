"""The stage bodies: what each stage trains (or, for a supplied teacher, loads), with which loss and hooks,
through :func:`fit_stage`; :data:`RUNNERS` gives each declared stage its body."""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from .. import distributed
from ..data import DataSplits, batches_per_epoch
from ..errors import KdcError
from ..models import build_model, model_spec
from ..prune import MagnitudePruner, plan_schedule
from ..recipe import Recipe, TrainSettings
from ..supplied import load_pretrained, supplied_teacher
from ..train import Runtime, fit
from ..views import augment_of
from .budget import (
    LATENCY_KINDS,
    allocate_budget,
    budget_record,
    latency_target,
    measure_model,
    resumed_allocation,
    sensitivity_curves,
    timed_pair,
)
from .context import StageContext, load_stage_model
from .hooks import Pruning, TensorBoard
from .layout import tensorboard_dir
from .losses import distill_loss, feature_distill
from .stages import STAGE_NAMES
from .state import stage_seed

if TYPE_CHECKING:
    from ..prune.allocate import Allocation

__all__ = [
    "RUNNERS",
    "fit_stage",
    "make_pruner",
    "stage_teacher",
    "stage_student",
    "stage_distilled",
    "stage_pruned",
]


def _new_model(recipe: Recipe, which: str, data: DataSplits, device: torch.device):
    section = getattr(recipe, which)
    spec = model_spec(section.model, section.args, data.num_classes, data.input_shape)
    return build_model(spec, where=f"{which}.model").to(device), spec


def _ce(logits, y, idx, x):
    return F.cross_entropy(logits, y)


def fit_stage(ctx: StageContext, model, loss, settings: TrainSettings, hooks=(), augment=None):
    """Train ``model`` for the stage of ``ctx`` with :func:`kdcompress.train.fit`; return its epochs' history.

    Every stage body trains through here (the tests wrap it to inject faults), with the stage's seed, resume
    state and running log, and TensorBoard scalars when ``report.tensorboard`` is on. ``augment``: the training
    augmentation, when not the recipe's own random one (the teacher-view table's, from :func:`distill_loss`).
    """
    recipe = ctx.recipe
    # last: resume states list the hooks in order, and this one keeps no state
    board = (
        [TensorBoard(tensorboard_dir(recipe.run_dir, ctx.stage))]
        if (recipe.report.tensorboard and distributed.is_main())
        else []
    )
    try:
        return fit(
            model,
            loss,
            ctx.data,
            settings,
            batch_size=recipe.data.batch_size,
            eval_batch_size=recipe.data.eval_batch_size,
            device=ctx.device,
            seed=stage_seed(recipe, ctx.stage),
            stage=ctx.stage,
            metrics_path=ctx.log_path,
            hooks=[*hooks, *board],
            console=ctx.console,
            state_path=ctx.state_path,
            state_tag=ctx.tag,
            runtime=Runtime(
                precision=recipe.run.precision,
                channels_last=recipe.run.channels_last,
                compile=recipe.run.compile,
                augment=augment or augment_of(recipe),
            ),
            progress=ctx.progress,
        )
    finally:
        for writer in board:
            writer.close()


def stage_teacher(ctx: StageContext):
    t = ctx.recipe.teacher
    if t.checkpoint:  # the user's own teacher: evaluated and saved as this run's, never trained
        model, spec, info = supplied_teacher(
            ctx.recipe, ctx.data.num_classes, ctx.data.input_shape, ctx.data.preprocess
        )
        return model.to(ctx.device), spec, [], info  # no epochs: its metrics.jsonl is written empty
    model, spec = _new_model(ctx.recipe, "teacher", ctx.data, ctx.device)
    extra = {}
    if t.pretrained:
        extra = load_pretrained(model, t.model.split(":", 1)[1])
        ctx.console.print(f"teacher: starting from the pretrained weights in {extra['pretrained_from']}")
    return model, spec, fit_stage(ctx, model, _ce, t), extra


def stage_student(ctx: StageContext):
    model, spec = _new_model(ctx.recipe, "student", ctx.data, ctx.device)
    return model, spec, fit_stage(ctx, model, _ce, ctx.recipe.distill), {}


def stage_distilled(ctx: StageContext):
    model, spec = _new_model(ctx.recipe, "student", ctx.data, ctx.device)  # same seed and init as the baseline
    if ctx.recipe.distill.features:
        # the student and its hint adapters train as one module, so fit's optimiser and resume state hold both;
        # the stage returns the bare student, whose checkpoint has no adapter weights
        trained, loss, hooks = feature_distill(ctx, model, warm_up=True)
        return model, spec, fit_stage(ctx, trained, loss, ctx.recipe.distill, hooks=hooks), {}
    loss, hooks, augment = distill_loss(ctx, warm_up=True)
    return model, spec, fit_stage(ctx, model, loss, ctx.recipe.distill, hooks=hooks, augment=augment), {}


def stage_pruned(ctx: StageContext):
    model, spec = load_stage_model(ctx.recipe, "distilled", ctx.device)
    p = ctx.recipe.prune
    allocation = None
    if p.budget.is_set():  # the shares per group that meet the budget; the schedule ramps towards them
        allocation = allocate_for_stage(ctx, model, spec["input_shape"])
        p = dataclasses.replace(p, target_sparsity=allocation.sparsity)
    # check_recipe, run at the start of every stage, has made sure include/exclude leave weights to prune and
    # planned this schedule on one process; this is the plan for the batches each process really trains on
    bpe = batches_per_epoch(len(ctx.data.train), ctx.recipe.data.batch_size, distributed.world_size())
    schedule = plan_schedule(p, bpe)
    pruner = make_pruner(model, p, spec["input_shape"], allocation=allocation.shares if allocation else None)
    # no DKD warm-up here: the distilled student it starts from has learnt from the full term already
    loss, loss_hooks, augment = distill_loss(ctx) if p.distill else (_ce, [], None)
    hook = Pruning(pruner, schedule)
    # the pruning hook first: resume states list it so
    history = fit_stage(ctx, model, loss, p, hooks=[hook, *loss_hooks], augment=augment)
    if hook.steps_taken < len(schedule.at):  # the plan fits in retraining, so only a kdc bug gets here
        raise KdcError(
            f"prune: retraining ended after {hook.steps_taken} of {len(schedule.at)} pruning steps, at sparsity "
            f"{pruner.sparsity():.3f}, short of the target {p.target_sparsity}"
        )
    extra = {"target_sparsity": p.target_sparsity, "pruning_steps": hook.steps_taken, "method": p.method}
    if p.method == "structured":
        # the share of prunable channels removed (the weights left hold no zeros: the channels are gone)
        extra.update(channel_sparsity=pruner.sparsity(), structure=pruner.history())
    if allocation is not None:
        extra["budget"] = budget_reached(ctx, model, spec["input_shape"], allocation)
    return model, spec, history, extra


def allocate_for_stage(ctx: StageContext, model, input_shape) -> "Allocation":
    """The allocation of ``prune.budget`` over the distilled ``model``'s groups (sensitivity curves if asked).

    A latency budget's search times candidates, so it would not find the same shares twice: a stage resumed
    from its resume state keeps the shares that state was pruned towards (:func:`saved_shares`)."""
    p = ctx.recipe.prune
    saved = saved_shares(ctx.state_path, ctx.tag) if p.budget.kind() in LATENCY_KINDS else None
    if saved is not None:
        ctx.console.print("pruned: resuming towards the allocation the interrupted run timed (not searched again)")
        return resumed_allocation(model, input_shape, p, saved)
    curves = sensitivity_curves(ctx) if p.allocation == "sensitivity" else None
    return allocate_budget(
        model, input_shape, p, curves=curves, console=ctx.console, threads=timing_threads(ctx.recipe)
    )


def saved_shares(state_path, tag: str) -> dict[str, float] | None:
    """The per-group shares an unfinished pruned stage's resume state was pruning towards, or None (no state, a
    state made for other inputs, or none that reads as shares: the stage then allocates afresh)."""
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception:  # no resume state, or one that fit itself will refuse with its own message
        return None
    if not isinstance(state, dict) or state.get("tag") != tag or not isinstance(state.get("hooks"), list):
        return None
    for hook in state["hooks"]:
        shares = hook.get("pruner", {}).get("allocation") if isinstance(hook, dict) else None
        if (
            isinstance(shares, dict)
            and shares
            and all(isinstance(k, str) and isinstance(v, float) and 0.0 <= v < 1.0 for k, v in shares.items())
        ):
            return dict(shares)
    return None


def budget_reached(ctx: StageContext, model, input_shape, allocation: "Allocation") -> dict:
    """Measure the pruned ``model`` in the budget's unit; the stage's ``budget`` record, said aloud if over.

    A latency budget is checked on the real models: the pruned one timed in turns with the distilled one
    (:func:`kdcompress.run.budget.timed_pair`), the target taken from the same rounds.
    """
    p = ctx.recipe.prune
    if allocation.kind in LATENCY_KINDS:
        distilled, _ = load_stage_model(ctx.recipe, "distilled", torch.device("cpu"))
        timing = timed_pair(distilled, model, input_shape, p, timing_threads(ctx.recipe))
        reference, reached = timing["distilled"]["median_ms"], timing["pruned"]["median_ms"]
        allocation = dataclasses.replace(allocation, target=latency_target(p, reference), reference=reference)
        record = budget_record(allocation, reached, p)
        record["timing"] = {
            name: {k: t.get(k) for k in ("median_ms", "iqr_ms", "method")} for name, t in timing.items()
        }
        unit = " ms"
    else:
        record, unit = budget_record(allocation, measure_model(allocation.kind, model, input_shape, p), p), ""
    words = (
        f"pruned: {allocation.kind} reached {record['reached']:,.2f}{unit} against the target "
        f"{allocation.target:,.2f}{unit} ({record['ratio_to_target']:.1%} of it, {record['ratio_to_reference']:.1%} "
        f"of the distilled student)"
    )
    if record["over"]:
        ctx.console.print(f"[bold red]warning[/]: {words}: more than {record['tolerance']:.0%} over the budget")
    else:
        ctx.console.print(words)
    return record


def timing_threads(recipe: Recipe) -> int:
    """Threads a latency budget is timed with: ``report.threads``, at most the cores this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(int(recipe.report.threads), cores))


def make_pruner(model: torch.nn.Module, p, input_shape, allocation: dict[str, float] | None = None):
    """The pruner a recipe's ``prune`` section asks for, on ``model`` (structured: channels; else weights).

    ``allocation`` (structured only): per-group shares the pruner ramps towards (a budget's allocation).
    """
    if p.method == "structured":
        from ..prune.structured import StructuredPruner  # torch-pruning is imported only when it is used

        return StructuredPruner(
            model,
            input_shape,
            importance=p.importance,
            scope=p.scope,
            include=p.include,
            exclude=p.exclude,
            round_to=p.round_to,
            allocation=allocation,
        )
    return MagnitudePruner(model, p.rate, p.target_sparsity, p.scope, p.include, p.exclude)


# each declared stage's body, by name (kdcompress.run.stages declares them without it, so declaring stages
# imports no torch)
RUNNERS: dict[str, Callable[[StageContext], tuple]] = {
    "teacher": stage_teacher,
    "student": stage_student,
    "distilled": stage_distilled,
    "pruned": stage_pruned,
}
if tuple(RUNNERS) != STAGE_NAMES:  # a stage declared without a body (or the reverse): a kdc bug
    raise RuntimeError(f"stage bodies {tuple(RUNNERS)} do not match the declared stages {STAGE_NAMES}")
