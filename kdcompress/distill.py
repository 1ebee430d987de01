"""Knowledge-distillation losses (Hinton, Vinyals and Dean, 2015).

The soft term compares temperature-softened distributions with a KL
divergence computed from ``log_softmax`` (never ``softmax(x).log()``, which
underflows) and is scaled by T^2 so that its gradients keep their size as T
changes. A hard cross-entropy term on the labels is kept beside it.

:func:`kd_loss` is one autograd node: its gradient with respect to the
student's logits has a closed form,

    dL/ds = [(1 - alpha) (softmax(s) - onehot(y)) + alpha T (softmax(s/T) - softmax(t/T))] / B,

so it is built from the softmaxes the forward pass computes anyway: a
handful of element-wise operations on a (B, C) tensor instead of the
autograd graph of log_softmax, kl_div, cross_entropy and the scalings, which
for a small student costs a sizeable share of the step. The teacher's side,
``log_softmax(t/T)``, depends only on the teacher, so a cached teacher's
log-probabilities are computed once per stage (:func:`teacher_log_probs`) and
looked up per batch (:func:`kd_loss_from_log_probs`).

Decoupled KD (:func:`dkd_loss`, Zhao et al. 2022) splits the soft term into
a target-class part (TCKD) and a non-target part (NCKD) and weights them
apart. :data:`LOSSES` names the logit losses a recipe's ``distill.loss`` can
pick; :func:`get_loss` also resolves a user's own ``package.module:function``.

Example::

    >>> import torch
    >>> from kdcompress.distill import dkd_loss, kd_loss
    >>> s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    >>> loss = kd_loss(s, t, y, temperature=4.0, alpha=0.5)
    >>> loss = dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=4.0)
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import Problem, RecipeError
from .names import find_factory, loss_name_problem

__all__ = [
    "LOSSES",
    "dkd_loss",
    "dkd_warmup_factor",
    "get_loss",
    "kd_loss",
    "kd_loss_from_log_probs",
    "soft_target_loss",
    "teacher_log_probs",
    "teacher_logits",
]


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch (plain autograd)."""
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)


def teacher_log_probs(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(teacher_logits / T)``, detached, with -inf raised to the dtype's lowest finite value.

    A class the teacher rules out entirely (probability exactly 0) then adds
    0 to the KL divergence instead of ``0 * -inf = nan``.
    """
    log_p = F.log_softmax(teacher_logits.detach() / float(temperature), dim=1)
    return log_p.clamp_min(torch.finfo(log_p.dtype).min)


class _KDLoss(torch.autograd.Function):
    """(1 - alpha) CE(s, y) + alpha T^2 KL(p_t || softmax(s/T)), with its gradient in ``s`` in closed form.

    The gradient is built in the forward pass from the same softmaxes (about
    a dozen small operations in all, against some thirty for autograd through
    the plain formula) and backward only scales it.
    """

    @staticmethod
    def forward(ctx, student, teacher_log_p, targets, temperature: float, alpha: float):
        n = student.shape[0]
        log_q_t = torch.log_softmax(student * (1.0 / temperature), dim=1)
        log_q = torch.log_softmax(student, dim=1)
        p_t = teacher_log_p.exp()
        kl = (p_t * (teacher_log_p - log_q_t)).sum()  # not vdot, which CUDA autocast may run in bf16
        y = targets.view(-1, 1)
        ce = log_q.gather(1, y).sum()  # minus the summed cross-entropy
        loss = torch.sub(kl * (alpha * temperature * temperature / n), ce, alpha=(1.0 - alpha) / n)
        if ctx.needs_input_grad[0]:
            # n dL/ds = (1 - alpha) (softmax(s) - onehot(y)) + alpha T (softmax(s/T) - p_t)
            grad = log_q.exp_()
            grad.scatter_add_(1, y, grad.new_full((n, 1), -1.0))
            grad.mul_((1.0 - alpha) / n).add_(log_q_t.exp_().sub_(p_t), alpha=alpha * temperature / n)
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None, None


def kd_loss_from_log_probs(
    student_logits: torch.Tensor,
    teacher_log_p: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """:func:`kd_loss` with the teacher given as ``teacher_log_probs(teacher_logits, temperature)``.

    Differentiable in ``student_logits`` only (once: no double backward).
    """
    if alpha <= 0.0:
        return F.cross_entropy(student_logits, targets)
    if targets.dtype != torch.long or targets.dim() != 1:
        raise ValueError(
            f"kd_loss: targets must be a 1-D tensor of class indices, got {targets.dtype} {tuple(targets.shape)}"
        )
    if student_logits.shape != teacher_log_p.shape:
        raise ValueError(
            f"kd_loss: student logits {tuple(student_logits.shape)} and teacher {tuple(teacher_log_p.shape)} differ in shape"
        )
    return _KDLoss.apply(
        student_logits, teacher_log_p.to(student_logits.dtype), targets, float(temperature), float(alpha)
    )


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, targets), averaged over the batch."""
    if alpha <= 0.0:
        return F.cross_entropy(student_logits, targets)
    return kd_loss_from_log_probs(
        student_logits, teacher_log_probs(teacher_logits, temperature), targets, temperature, alpha
    )


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022): ``alpha * TCKD + beta * NCKD``, each scaled by T^2, averaged over the batch.

    TCKD is the KL divergence between the teacher's and the student's binary
    distributions (target class, all other classes) at temperature T; NCKD the
    KL divergence between their distributions among the non-target classes
    alone. The hard-label cross-entropy is not included: the paper trains on
    ``CE + warm-up * dkd_loss`` (see :func:`dkd_warmup_factor`).

    Everything is computed in log space: the non-target mass is a logsumexp of
    log-probabilities, not ``1 - p``, and the non-target distribution is a
    log_softmax over the other classes' logits (the paper's code masks the
    target with ``-1000``, which a large T can undo).

    Example::

        >>> s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
        >>> loss = dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=4.0)
    """
    if targets.dtype != torch.long or targets.dim() != 1:
        raise ValueError(
            f"dkd_loss: targets must be a 1-D tensor of class indices, got {targets.dtype} {tuple(targets.shape)}"
        )
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"dkd_loss: student logits {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} must "
            f"be the same (batch, classes) shape"
        )
    n, c = student_logits.shape
    t = float(temperature)
    teacher_logits = teacher_logits.detach().to(student_logits.dtype)
    target = F.one_hot(targets, c).bool()
    others = ~target

    def binary_log_probs(logits):  # log of [p(target), p(not target)], shape (n, 2)
        log_p = F.log_softmax(logits / t, dim=1)
        log_gt = log_p.masked_select(target).view(n, 1)
        log_rest = torch.logsumexp(log_p.masked_select(others).view(n, c - 1), dim=1, keepdim=True)
        return torch.cat([log_gt, log_rest], dim=1)

    log_b_s, log_b_t = binary_log_probs(student_logits), binary_log_probs(teacher_logits)
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum()
    log_q_s = F.log_softmax(student_logits.masked_select(others).view(n, c - 1) / t, dim=1)
    log_q_t = F.log_softmax(teacher_logits.masked_select(others).view(n, c - 1) / t, dim=1)
    nckd = (log_q_t.exp() * (log_q_t - log_q_s)).sum()
    return (float(alpha) * tckd + float(beta) * nckd) * (t * t / n)


def dkd_warmup_factor(epoch: int, warmup: int) -> float:
    """The weight of the DKD term in 0-based ``epoch``: rises linearly over ``warmup`` epochs, then stays 1.

    As in the paper's code, ``min(epoch / warmup, 1)`` with epochs counted
    from 1: the first epoch gets ``1 / warmup``, epoch ``warmup`` (1-based)
    and later the full weight. ``warmup`` 0 means no warm-up.

        >>> [dkd_warmup_factor(e, 4) for e in range(5)]
        [0.25, 0.5, 0.75, 1.0, 1.0]
    """
    if warmup <= 0:
        return 1.0
    return min((epoch + 1) / warmup, 1.0)


# name -> loss function on logits: (student_logits, teacher_logits, targets, ...) -> scalar
LOSSES: dict[str, Callable[..., torch.Tensor]] = {"kd": kd_loss, "dkd": dkd_loss}


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    """The loss function ``name`` stands for: one of :data:`LOSSES`, or ``package.module:function``.

    A user's function is called as ``fn(student_logits, teacher_logits,
    targets, args)`` with ``args`` the recipe's ``distill.loss_args`` and
    returns a scalar tensor. Raises :class:`~kdcompress.errors.KdcError`
    (exit code 2) naming ``distill.loss`` when the name resolves to nothing.

        >>> get_loss("dkd") is dkd_loss
        True
    """
    if name in LOSSES:
        return LOSSES[name]
    if ":" in name:
        fn, problem = find_factory(name, ())
    else:
        fn, problem = None, loss_name_problem(name)
    if problem:
        raise RecipeError("recipe", [Problem("distill.loss", problem)])
    return fn


@torch.no_grad()
def teacher_logits(teacher: nn.Module, data, batch_size: int, device: torch.device) -> torch.Tensor:
    """The teacher's logits for every sample of ``data`` (a TensorData), in order, on ``device``.

    The teacher runs in eval mode without gradients: training mode would
    change its BatchNorm statistics and dropout would add noise to the targets.
    """
    was_training = teacher.training
    teacher.eval()
    out = [teacher(x.to(device)).float() for x, _, _ in data.batches(batch_size)]
    teacher.train(was_training)
    return torch.cat(out)
