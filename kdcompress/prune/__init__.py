"""Pruning: which weights go (the pruners) and when (the schedule).

* :mod:`.unstructured`: :class:`MagnitudePruner` zeroes single weights by
  magnitude and keeps them at zero with masks.
* :mod:`.schedule`: :func:`plan_schedule` turns a recipe's ``prune`` section
  into the batches at which to prune and the sparsity to reach at each; the
  same plan serves ``kdc validate`` and the run.

Every pruner has ``prune_to(sparsity)``, ``apply()``, ``sparsity()``,
``state_dict()`` / ``load_state_dict()`` and ``changes_parameters``.

Example::

    >>> import torch
    >>> from kdcompress.prune import MagnitudePruner
    >>> net = torch.nn.Sequential(torch.nn.Linear(20, 10), torch.nn.ReLU(), torch.nn.Linear(10, 2))
    >>> pruner = MagnitudePruner(net, rate=0.5, target_sparsity=0.75)
    >>> pruner.prune_to(0.75); round(pruner.sparsity(), 2)
    0.75
"""

from .schedule import Schedule, plan_schedule, pruning_steps_needed
from .unstructured import MagnitudePruner, prunable_weights, weight_sparsity

__all__ = [
    "MagnitudePruner",
    "prunable_weights",
    "weight_sparsity",
    "Schedule",
    "plan_schedule",
    "pruning_steps_needed",
]
