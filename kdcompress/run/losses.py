"""Loss assembly: the distillation loss a recipe's ``distill`` section asks for (kd, dkd or the user's,
from cached or online teacher logits), with feature terms when ``distill.features`` lists some, and the
hooks each loss needs."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import distributed
from ..checkpoint import read_manifest, save_state
from ..distill import dkd_warmup_factor, get_loss, kd_loss, kd_loss_from_log_probs, teacher_log_probs, teacher_logits
from ..errors import CheckpointError, KdcError
from ..features import FeatureTaps, at_loss, make_adapter
from ..views import ViewAugment, augment_of, teacher_path
from .checks import check_feature_terms
from .context import StageContext, load_stage_model
from .hooks import EpochClock, FeatureMeter
from .layout import checkpoint_path, teacher_logits_path
from .teacher_views import teacher_view_table

__all__ = [
    "cached_teacher_logits",
    "distill_loss",
    "make_logit_loss",
    "online_kd_loss",
    "FeatureStudent",
    "feature_distill",
]


def _teacher_cache_path(ctx: StageContext) -> tuple[Path, str]:
    """Where the teacher's training-split logits live, keyed by the teacher checkpoint and the data."""
    teacher_sha = read_manifest(checkpoint_path(ctx.recipe.run_dir, "teacher"))["sha256"]
    key = hashlib.sha256(f"{teacher_sha}|{ctx.data.identity}".encode()).hexdigest()[:16]
    return teacher_logits_path(ctx.recipe.run_dir, key), key


def cached_teacher_logits(ctx: StageContext, teacher: torch.nn.Module) -> torch.Tensor:
    """The teacher's logits for the training split, computed once and reused across stages and runs.

    Rank 0 computes and stores them; a changed teacher checkpoint or dataset gives a new key.
    """
    path, key = _teacher_cache_path(ctx)
    if distributed.is_main() and not path.is_file():
        started = time.perf_counter()
        logits = teacher_logits(teacher, ctx.data.train, ctx.recipe.data.eval_batch_size, ctx.device)
        save_state(path, {"key": key, "logits": logits.cpu()})
        ctx.console.print(f"{ctx.stage}: cached the teacher's logits in {path} ({time.perf_counter() - started:.1f} s)")
        distributed.barrier()  # the other ranks read the file once it is there
        return logits
    distributed.barrier()
    try:
        cache = torch.load(path, map_location="cpu", weights_only=True)
        logits = cache["logits"]
        if cache.get("key") != key or logits.shape[0] != len(ctx.data.train):
            raise ValueError("key or size mismatch")
    except Exception as exc:
        raise CheckpointError(
            f"the teacher-logit cache {path} is damaged ({type(exc).__name__}); delete it and rerun"
        ) from None
    return logits.to(ctx.device)


def distill_loss(ctx: StageContext, warm_up: bool = False) -> tuple:
    """The distillation loss of ``distill.loss``, the hooks it needs and the training augmentation, as
    ``(loss, hooks, augment)`` for :func:`kdcompress.run.bodies.fit_stage`.

    Where the teacher's targets come from (:func:`teacher_path` names it): without augmentation, the logit
    cache; with augmentation and ``distill.teacher_cache.views``, the teacher-view table, whose views the
    returned augmentation shows; with augmentation alone, the teacher run online on every batch.
    ``warm_up``: DKD's term rises over ``distill.dkd_warmup`` epochs (for a student trained from scratch).
    """
    recipe = ctx.recipe
    teacher = load_stage_model(recipe, "teacher", ctx.device)[0].eval()
    d = recipe.distill
    augment = augment_of(recipe)
    if d.loss != "kd":
        logit_loss, hooks = make_logit_loss(d, min(d.dkd_warmup, d.epochs) if warm_up else 0)
    else:
        temperature, alpha = d.temperature, d.alpha
        logit_loss, hooks = (lambda s, t, y: kd_loss(s, t, y, temperature, alpha)), []
    path = teacher_path(recipe)
    if path == "views":
        views = ViewAugment(augment, teacher_view_table(ctx, teacher, augment))

        def from_views(logits, y, idx, x):
            return logit_loss(logits, views.targets(idx), y)

        return from_views, hooks, views
    if path == "online":
        return online_kd_loss(teacher, logit_loss), hooks, augment
    cached = cached_teacher_logits(ctx, teacher)
    if d.loss != "kd":

        def from_cache(logits, y, idx, x):
            return logit_loss(logits, cached.index_select(0, idx.to(cached.device)), y)

        return from_cache, hooks, None
    log_p = teacher_log_probs(cached, temperature)  # once per stage, not per batch

    def kd_from_cache(logits, y, idx, x):
        return kd_loss_from_log_probs(logits, log_p.index_select(0, idx.to(log_p.device)), y, temperature, alpha)

    return kd_from_cache, [], None


def make_logit_loss(d, warmup: int):
    """``(loss(student_logits, teacher_logits, targets), hooks)`` for dkd or a user's loss (``d``: the distill section).

    dkd follows the paper: ``CE + warm-up factor * (dkd_alpha TCKD + dkd_beta NCKD)``, the factor rising
    over ``warmup`` epochs.
    """
    fn = get_loss(d.loss)
    if d.loss == "dkd":
        clock = EpochClock()

        def dkd(s, t, y):
            factor = dkd_warmup_factor(clock.epoch, warmup)
            return F.cross_entropy(s, y) + factor * fn(s, t, y, d.dkd_alpha, d.dkd_beta, d.temperature)

        return dkd, [clock]
    args = dict(d.loss_args)

    def user(s, t, y):
        value = fn(s, t, y, args)
        if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.requires_grad:
            what = (
                type(value).__name__
                if not isinstance(value, torch.Tensor)
                else (
                    f"a tensor of shape {tuple(value.shape)}" if value.numel() != 1 else "a tensor without a gradient"
                )
            )
            raise KdcError(
                f"distill.loss: {d.loss} returned {what}; it must return a scalar tensor computed from the "
                f"student's logits (its first argument)"
            )
        return value.reshape(())

    return user, []


def online_kd_loss(teacher: torch.nn.Module, logit_loss):
    """A loss that runs the teacher on every (augmented) batch, in eval mode without gradients."""

    def loss(logits, y, idx, x):
        with torch.inference_mode():
            target = teacher(x).float()
        return logit_loss(logits, target.clone(), y)

    return loss


class FeatureStudent(torch.nn.Module):
    """The student plus one adapter per feature term (nn.Identity for ``at``), trained together.

    Its forward returns the student's logits and keeps, in ``features``, each term's student output passed
    through its adapter; the adapters run inside forward so that DDP sees them used.
    """

    def __init__(self, student: torch.nn.Module, names: list[str], adapters: list[torch.nn.Module]):
        super().__init__()
        self.student = student
        self.adapters = torch.nn.ModuleList(adapters)
        self.names = names
        self.features: list[torch.Tensor] = []

    def forward(self, x):
        with FeatureTaps(self.student, set(self.names), "the student") as taps:
            logits = self.student(x)
        self.features = [adapter(taps[name]) for name, adapter in zip(self.names, self.adapters)]
        return logits


def feature_distill(ctx: StageContext, student: torch.nn.Module, warm_up: bool = False) -> tuple:
    """``(module to train, loss, hooks)`` for ``distill.features``: the logit loss plus the weighted feature terms.

    The teacher runs online on every batch (eval mode, no gradients), giving its logits for the logit loss
    (kd, dkd or the user's) and its tapped features; the logit cache is not used. ``hint`` adapters are built
    from a dry-run batch (check_recipe has already checked the pairs line up).
    """
    recipe, d = ctx.recipe, ctx.recipe.distill
    teacher = load_stage_model(recipe, "teacher", ctx.device)[0].eval()
    terms = list(d.features)
    pairs = check_feature_terms(terms, teacher, student, ctx.data.input_shape, device=ctx.device)
    student.train()

    adapters = [
        make_adapter(s, t) if term.loss == "hint" else torch.nn.Identity() for term, (s, t) in zip(terms, pairs)
    ]
    wrapper = FeatureStudent(student, [t.student for t in terms], adapters).to(ctx.device)
    if d.loss == "kd":
        temperature, alpha = d.temperature, d.alpha
        logit_loss, hooks = (lambda s, t, y: kd_loss(s, t, y, temperature, alpha)), []
    else:
        logit_loss, hooks = make_logit_loss(d, min(d.dkd_warmup, d.epochs) if warm_up else 0)
    meter = FeatureMeter()
    teacher_names = {t.teacher for t in terms}

    def loss(logits, y, idx, x):
        with torch.no_grad(), FeatureTaps(teacher, teacher_names, "the teacher") as taps:
            target = teacher(x).float()
        total = logit_loss(logits, target, y)
        feature_total = 0.0
        for term, s_feat in zip(terms, wrapper.features):
            t_feat = taps[term.teacher].float()
            s_feat = s_feat.float()
            value = at_loss(s_feat, t_feat) if term.loss == "at" else F.mse_loss(s_feat, t_feat)
            feature_total = feature_total + term.weight * value
        meter.add(feature_total)
        return total + feature_total

    return wrapper, loss, [*hooks, meter]
