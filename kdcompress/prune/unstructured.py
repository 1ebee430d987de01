"""Unstructured magnitude pruning with masks that hold.

``rate`` is the fraction of the *still non-zero* prunable weights removed at
each pruning step; ``target_sparsity`` is the fraction of *all* prunable
weights that end at zero. Prunable weights are the ``weight`` tensors of
Conv and Linear modules whose names match ``include`` and not ``exclude``
(shell-style patterns on the module name, as in ``model.named_modules()``);
biases and normalisation layers stay dense.

Zeroing weights once and training on lets them grow back, so the mask is
applied again after every optimiser step (:meth:`MagnitudePruner.apply`).

Two ways to prune: :meth:`MagnitudePruner.step` removes ``rate`` of what is
left (capped at the target); :meth:`MagnitudePruner.prune_to` prunes up to a
given sparsity, as a schedule (:mod:`kdcompress.prune.schedule`) asks.

Example::

    >>> import torch
    >>> from kdcompress.prune import MagnitudePruner
    >>> net = torch.nn.Sequential(torch.nn.Linear(20, 10), torch.nn.ReLU(), torch.nn.Linear(10, 2))
    >>> pruner = MagnitudePruner(net, rate=0.5, target_sparsity=0.75)
    >>> pruner.step(); pruner.step(); round(pruner.sparsity(), 2)
    0.75
"""

from __future__ import annotations

import fnmatch
from typing import Iterable

import torch
from torch import nn

__all__ = ["MagnitudePruner", "prunable_weights", "weight_sparsity"]

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_weights(
    model: nn.Module, include: Iterable[str] = ("*",), exclude: Iterable[str] = ()
) -> dict[str, nn.Parameter]:
    """``{module_name.weight: parameter}`` for the Conv/Linear weights selected by the patterns."""
    include, exclude = list(include), list(exclude)
    selected = {}
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE_TYPES) or getattr(module, "weight", None) is None:
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in include) and not any(
            fnmatch.fnmatchcase(name, p) for p in exclude
        ):
            selected[f"{name}.weight" if name else "weight"] = module.weight
    return selected


def weight_sparsity(weights: dict[str, torch.Tensor]) -> float:
    """Share of the given weights that are exactly zero (0.0 when there are none)."""
    total = sum(w.numel() for w in weights.values())
    if total == 0:
        return 0.0
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    return zeros / total


class MagnitudePruner:
    """Magnitude pruning of single weights, global or per layer, up to a target sparsity.

    Weights are zeroed in place and kept at zero by boolean masks; the
    parameters keep their shapes (``changes_parameters`` is False), so an
    optimiser built before pruning stays valid.
    """

    changes_parameters = False

    def __init__(
        self,
        model: nn.Module,
        rate: float,
        target_sparsity: float,
        scope: str = "global",
        include: Iterable[str] = ("*",),
        exclude: Iterable[str] = (),
    ):
        if not 0.0 < rate < 1.0:
            raise ValueError(f"rate must be in (0, 1), got {rate}")
        if not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1), got {target_sparsity}")
        if scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
        self.rate, self.target, self.scope = rate, target_sparsity, scope
        self.weights = prunable_weights(model, include, exclude)
        self.masks = {name: torch.ones_like(w, dtype=torch.bool) for name, w in self.weights.items()}
        self.steps_taken = 0

    # -- state
    def mask_sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return 0.0 if total == 0 else sum(int((~m).sum()) for m in self.masks.values()) / total

    def sparsity(self) -> float:
        """Measured share of prunable weights that are exactly zero."""
        return weight_sparsity({k: w.detach() for k, w in self.weights.items()})

    @property
    def done(self) -> bool:
        return all(self._left_to_prune(list(group)) <= 0 for group in self._groups())

    # -- actions
    @torch.no_grad()
    def step(self) -> int:
        """Remove ``rate`` of the remaining weights (capped at the target); return how many were removed."""
        removed = 0
        for group in self._groups():
            names = list(group)
            remaining = sum(int(self.masks[n].sum()) for n in names)
            k = min(int(round(self.rate * remaining)), self._left_to_prune(names))
            if k <= 0 and self._left_to_prune(names) > 0:
                k = 1
            removed += self._prune_smallest(names, k)
        self.steps_taken += 1
        self.apply()
        return removed

    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        """Prune the smallest remaining weights until ``sparsity`` of the prunable weights are masked.

        Per group: the whole selection for global scope, each layer for layer
        scope; a group already at or past ``sparsity`` is left as it is (masks
        never come back). The count is rounded to whole weights, so the result
        is within half a weight of ``sparsity`` per group. ``sparsity`` may be
        anything in [0, 1); the constructor's ``target_sparsity`` only bounds
        :meth:`step`.
        """
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        for group in self._groups():
            names = list(group)
            total = sum(self.masks[n].numel() for n in names)
            pruned = sum(int((~self.masks[n]).sum()) for n in names)
            self._prune_smallest(names, int(round(sparsity * total)) - pruned)
        self.steps_taken += 1
        self.apply()

    def _prune_smallest(self, names: list[str], k: int) -> int:
        """Mask the ``k`` smallest-magnitude unmasked weights of ``names`` (ranked together); return how many."""
        if k <= 0:
            return 0
        scores = torch.cat([self.weights[n].detach().abs()[self.masks[n]].float() for n in names])
        k = min(k, scores.numel())
        drop = torch.topk(scores, k, largest=False, sorted=False).indices
        offset = 0
        for n in names:
            alive = self.masks[n].nonzero(as_tuple=True)
            count = alive[0].numel()
            mine = drop[(drop >= offset) & (drop < offset + count)] - offset
            if mine.numel():
                self.masks[n][tuple(a[mine] for a in alive)] = False
            offset += count
        return k

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every pruned weight; call after each optimiser step."""
        for name, w in self.weights.items():
            w.masked_fill_(~self.masks[name], 0.0)

    # -- resume
    def state_dict(self) -> dict:
        """The masks and the step count, as tensors and plain data (loads with ``weights_only=True``)."""
        return {"masks": dict(self.masks), "steps_taken": self.steps_taken}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned and zero the masked weights."""
        for name, mask in state["masks"].items():
            self.masks[name] = mask.to(self.masks[name].device)
        self.steps_taken = state["steps_taken"]
        self.apply()

    # -- helpers
    def _groups(self) -> list[Iterable[str]]:
        return [list(self.weights)] if self.scope == "global" else [[n] for n in self.weights]

    def _left_to_prune(self, names: list[str]) -> int:
        total = sum(self.masks[n].numel() for n in names)
        pruned = sum(int((~self.masks[n]).sum()) for n in names)
        return int(round(self.target * total)) - pruned
