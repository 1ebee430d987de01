"""Knowledge-distillation losses (Hinton, Vinyals and Dean, 2015).

The soft term compares temperature-softened distributions with a KL
divergence computed from ``log_softmax`` (never ``softmax(x).log()``, which
underflows) and is scaled by T^2 so that its gradients keep their size as T
changes. A hard cross-entropy term on the labels is kept beside it.

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

__all__ = ["kd_loss", "soft_target_loss", "teacher_logits"]


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch."""
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, targets)."""
    loss = F.cross_entropy(student_logits, targets) * (1.0 - alpha) if alpha < 1.0 else 0.0
    if alpha > 0.0:
        loss = loss + alpha * soft_target_loss(student_logits, teacher_logits, temperature)
    return loss


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
