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

Example::

    >>> import torch
    >>> from kdcompress.distill import kd_loss
    >>> s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    >>> loss = kd_loss(s, t, y, temperature=4.0, alpha=0.5)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["kd_loss", "kd_loss_from_log_probs", "soft_target_loss", "teacher_log_probs", "teacher_logits"]


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
        raise ValueError(f"kd_loss: targets must be a 1-D tensor of class indices, got {targets.dtype} {tuple(targets.shape)}")
    if student_logits.shape != teacher_log_p.shape:
        raise ValueError(
            f"kd_loss: student logits {tuple(student_logits.shape)} and teacher {tuple(teacher_log_p.shape)} differ in shape"
        )
    return _KDLoss.apply(student_logits, teacher_log_p.to(student_logits.dtype), targets, float(temperature), float(alpha))


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
    return kd_loss_from_log_probs(student_logits, teacher_log_probs(teacher_logits, temperature), targets, temperature, alpha)


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
