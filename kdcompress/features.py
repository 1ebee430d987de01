"""Feature distillation: match what inner layers of the student and the teacher compute.

Two losses, each between one student module's output and one teacher module's output, named by
their dotted paths in ``model.named_modules()`` (``features.3``, ``layer2.1.conv2``):

``hint``  FitNets (Romero et al. 2015): a trainable adapter maps the student's feature to the
          teacher's shape (a 1x1 convolution between feature maps, a linear layer between
          vectors, nothing when the shapes already agree) and the loss is the mean squared error
          to the teacher's feature. The adapter trains with the student and is not part of it.
``at``    attention transfer (Zagoruyko and Komodakis 2017): each feature map (N, C, H, W) becomes
          its spatial attention map, the channel mean of the squared activations, flattened and
          L2-normalised per sample; the loss is the mean squared difference of the two maps. No
          parameters; the two maps need the same H x W (channel counts may differ).

:class:`FeatureTaps` records module outputs with forward hooks during a forward pass. Example::

    >>> import torch
    >>> from torch import nn
    >>> student = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    >>> teacher = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
    >>> x = torch.randn(2, 1, 8, 8)
    >>> with FeatureTaps(student, ["1"]) as s_taps, FeatureTaps(teacher, ["1"]) as t_taps:
    ...     _ = student(x), teacher(x)
    >>> at_loss(s_taps["1"], t_taps["1"]).item() >= 0
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelError, did_you_mean

__all__ = ["FEATURE_LOSSES", "attention_map", "at_loss", "hint_loss", "make_adapter", "FeatureTaps", "module_named"]

FEATURE_LOSSES = ("hint", "at")


def attention_map(feature: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W): the channel mean of the squared activations, L2-normalised per sample."""
    if feature.dim() != 4:
        raise ValueError(f"attention transfer needs feature maps (N, C, H, W), got shape {tuple(feature.shape)}")
    q = feature.pow(2).mean(dim=1).flatten(1)
    return q / q.norm(dim=1, keepdim=True).clamp_min(eps)


def at_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the two attention maps (the teacher's is not differentiated)."""
    if student_feature.shape[2:] != teacher_feature.shape[2:] or student_feature.dim() != 4:
        raise ValueError(
            f"attention transfer compares feature maps of the same height and width; the student's is "
            f"{tuple(student_feature.shape)}, the teacher's {tuple(teacher_feature.shape)}: pick modules at the "
            f"same resolution"
        )
    return (attention_map(student_feature) - attention_map(teacher_feature.detach())).pow(2).mean()


def make_adapter(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> nn.Module:
    """The ``hint`` adapter from one sample output of each side: 1x1 conv, linear, or identity.

    Feature maps must share H x W, and vectors are (N, D); anything else is refused with its shapes.
    """
    s, t = tuple(student_feature.shape[1:]), tuple(teacher_feature.shape[1:])
    if s == t:
        return nn.Identity()
    if len(s) == 3 and len(t) == 3 and s[1:] == t[1:]:
        return nn.Conv2d(s[0], t[0], kernel_size=1, bias=False)
    if len(s) == 1 and len(t) == 1:
        return nn.Linear(s[0], t[0], bias=False)
    raise ValueError(
        f"a hint adapter maps channels (feature maps of the same height and width) or vector widths; the "
        f"student's feature is {s}, the teacher's {t} (without the batch dimension): pick modules whose outputs "
        f"line up"
    )


def hint_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, adapter: nn.Module) -> torch.Tensor:
    """Mean squared error between ``adapter(student_feature)`` and the teacher's feature (not differentiated)."""
    return F.mse_loss(adapter(student_feature), teacher_feature.detach())


def module_named(model: nn.Module, name: str, where: str = "model") -> nn.Module:
    """The submodule at dotted path ``name``; ModelError with the closest names when there is none."""
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    names = [n for n in modules if n]
    hint = did_you_mean(name, names)
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    raise ModelError(f"{where} has no module named {name!r}{hint} (its modules: {shown})")


class FeatureTaps:
    """Forward hooks that keep the outputs of the named modules of ``model``; use as a context manager.

    ``taps[name]`` is the output of the last forward pass (a tensor, with its graph). The hooks are
    removed on exit, so the model is left as it was.
    """

    def __init__(self, model: nn.Module, names, where: str = "model"):
        self.outputs: dict[str, torch.Tensor] = {}
        self._modules = {name: module_named(model, name, where) for name in names}
        self._handles = []

    def __enter__(self) -> "FeatureTaps":
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._keep(name)))
        return self

    def _keep(self, name: str):
        def hook(module, inputs, output):
            self.outputs[name] = output

        return hook

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.outputs:
            raise KeyError(f"no output recorded for {name!r}: run a forward pass inside the 'with' block first")
        return self.outputs[name]
