"""Pruning to a budget (``prune.budget``): measure the distilled student, allocate shares per group, check the end.

The pruned stage calls :func:`allocate_budget` on the distilled model before retraining: it measures the
reference (the distilled student's MACs, parameters or file bytes), turns the budget into a target
(:func:`kdcompress.prune.allocate.budget_target`), and allocates shares per group of coupled channels,
uniform or from sensitivity curves. The schedule then ramps towards that allocation, and at the end
:func:`budget_record` measures what the real pruned model costs, for the stage's metrics and the report.

Two seams are left for parts of issue 21 built elsewhere, each one function whose body is replaced:

* :func:`budget_cost`, the dispatch from a budget kind to its cost function: ``latency_ms`` and
  ``latency`` are to come from ``kdcompress.latency_budget``;
* :func:`sensitivity_curves`, the per-group accuracy-drop curves ``allocation: sensitivity`` reads, to
  come from ``kdc sensitivity`` (``kdcompress.run.sensitivity``).

``kdc validate`` plans the schedule before any distilled model exists: :func:`planned_sparsity` estimates
the share of channels from a uniform allocation on the freshly built student (same architecture, so the
same MACs and parameters).
"""

from __future__ import annotations

import copy
import functools
import time
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ..errors import KdcError
from ..measure import count_macs, count_params
from ..recipe import PruneSection
from .context import StageContext

if TYPE_CHECKING:
    from ..prune.allocate import Allocation

# the cost of the model pruned by {group root: share}, as kdcompress.prune.allocate.Cost (imported lazily:
# torch-pruning is imported only when structured pruning is used)
Cost = Callable[[dict[str, float]], float]
# the report's limit above the target: as kdcompress.prune.allocate.NEAR
TOLERANCE = 0.03

__all__ = [
    "allocate_budget",
    "budget_cost",
    "budget_record",
    "budget_words",
    "file_bytes",
    "how_measured",
    "measure_model",
    "planned_sparsity",
    "sensitivity_curves",
    "LATENCY_KINDS",
    "TOLERANCE",
]

LATENCY_KINDS = ("latency_ms", "latency")


def file_bytes(model: nn.Module, input_shape, fmt: str = "onnx") -> int:
    """Bytes of ``model`` exported as ``fmt`` (``onnx``: fp32 ONNX; ``int8``: onnxruntime's QDQ int8), without
    kdc's metadata. An int8 file is calibrated on a seeded random batch: its size does not depend on the values."""
    from ..export.onnx_common import export_onnx  # onnx is an optional extra, imported only when it is used

    model = copy.deepcopy(model).cpu().eval()
    example = torch.zeros(2, *(int(d) for d in input_shape))
    proto = export_onnx(model, example, fmt)
    if fmt == "int8":
        from ..export.int8 import quantize

        generator = torch.Generator().manual_seed(0)
        proto = quantize(proto, [torch.randn(8, *example.shape[1:], generator=generator)])
    return len(proto.SerializeToString())


def how_measured(kind: str, prune: PruneSection) -> str:
    """How a budget of ``kind`` is measured, in words for the report."""
    return {
        "macs": "multiply-accumulates of one image, counted by torch's operator counter (kdc's macs column)",
        "params": "parameters of the model (every element)",
        "bytes": f"size of the model exported to {prune.budget.format} (kdc's metadata left out), in bytes",
    }.get(kind, kind)


def measure_model(kind: str, model: nn.Module, input_shape, prune: PruneSection) -> float:
    """What ``model`` costs in the budget's unit (the reference on the distilled model, reached at the end)."""
    if kind == "macs":
        return float(count_macs(copy.deepcopy(model).cpu(), input_shape))
    if kind == "params":
        return float(count_params(model))
    if kind == "bytes":
        return float(file_bytes(model, input_shape, prune.budget.format))
    return budget_cost(kind, model, input_shape, prune)({})  # the latency kinds: whatever is wired in


def budget_cost(kind: str, model: nn.Module, input_shape, prune: PruneSection) -> Cost:
    """THE DISPATCH POINT from a budget kind to the cost of ``model`` pruned by given shares.

    ``macs``, ``params`` and ``bytes`` are measured on pruned copies
    (:func:`kdcompress.prune.allocate.structure_cost`). The latency kinds are to be plugged in here from
    ``kdcompress.latency_budget`` (a cost of the same shape: shares in, milliseconds out, at
    ``prune.budget.batch`` on ``prune.budget.runtime``); until then they are refused.
    """
    if kind in LATENCY_KINDS:
        raise KdcError(
            f"prune.budget.{kind}: latency budgets are not wired yet; use a macs, params or bytes budget for now"
        )
    from ..prune.allocate import structure_cost

    bytes_of = functools.partial(file_bytes, input_shape=input_shape, fmt=prune.budget.format)
    return structure_cost(
        model,
        input_shape,
        kind,
        importance=prune.importance,
        include=prune.include,
        exclude=prune.exclude,
        round_to=prune.round_to,
        bytes_of=bytes_of if kind == "bytes" else None,
    )


def sensitivity_curves(ctx: StageContext) -> dict[str, list[tuple[float, float]]]:
    """SEAM: ``{group root: [(share removed, accuracy drop in points), ...]}`` for ``allocation: sensitivity``.

    To be wired to ``kdc sensitivity`` (``kdcompress.run.sensitivity.run_sensitivity``): each prunable group
    of the distilled student (``ctx.recipe``'s run directory) pruned alone at ``prune.sensitivity_ratios``,
    evaluated on the validation split only (``search_split``), never the test split. Only this body changes;
    the tests stand in for it with synthetic curves.
    """
    raise KdcError(
        "prune.allocation: sensitivity needs the per-layer sensitivity curves of kdc sensitivity, which are not "
        "wired into the pruned stage yet; use prune.allocation: uniform for now"
    )


def allocate_budget(
    model: nn.Module, input_shape, prune: PruneSection, curves: dict | None = None, console=None
) -> "Allocation":
    """The shares per group that bring ``model`` (the distilled student) within ``prune.budget``.

    The search runs on a quadratic fitted to the exact cost (:func:`kdcompress.prune.allocate.quadratic_cost`);
    the allocation's ``predicted`` cost is then measured exactly on a pruned copy, and should the fit have
    misled the search above the target, it is searched again on the exact cost.
    """
    from ..prune.allocate import allocate_sensitivity, allocate_uniform, budget_target, groups_of, quadratic_cost

    kind = prune.budget.kind()
    started = time.perf_counter()
    exact = budget_cost(kind, model, input_shape, prune)
    groups = groups_of(model, input_shape, prune.importance, prune.include, prune.exclude, prune.round_to)
    reference = exact({})
    target = budget_target(kind, getattr(prune.budget, kind), reference)
    if console is not None:
        console.print(
            f"pruned: allocating {prune.allocation} shares over {len(groups)} groups of channels for a {kind} "
            f"budget of {target:,.0f} (the distilled student: {reference:,.0f})"
        )

    def allocate(cost: Cost) -> Allocation:
        if prune.allocation == "sensitivity":
            return allocate_sensitivity(groups, cost, target, curves or {}, round_to=prune.round_to, kind=kind)
        return allocate_uniform(groups, cost, target, prune.round_to, kind=kind)

    allocation = allocate(quadratic_cost(exact, groups, prune.round_to))
    allocation.predicted, allocation.reference = exact(allocation.shares), reference
    if allocation.predicted > target:
        allocation = allocate(exact)
    if console is not None:
        for line in allocation.lines():
            console.print(line)
        console.print(f"pruned: allocation found in {time.perf_counter() - started:.1f} s")
    return allocation


def budget_record(allocation: "Allocation", reached: float, prune: PruneSection) -> dict:
    """The stage's ``budget`` metrics: the budget, its target, what the pruned model reached and how it was measured."""
    kind = allocation.kind
    return {
        "kind": kind,
        "value": getattr(prune.budget, kind),
        "target": allocation.target,
        "reference": allocation.reference,
        "reached": reached,
        "ratio_to_target": reached / allocation.target if allocation.target else None,
        "ratio_to_reference": reached / allocation.reference if allocation.reference else None,
        "predicted": allocation.predicted,
        "predicted_drop": allocation.predicted_drop,
        "allocation": {k: round(v, 6) for k, v in allocation.shares.items()},
        "kept": dict(allocation.kept),
        "method": allocation.method,
        "round_to": prune.round_to,
        "how_measured": how_measured(kind, prune),
        "over": reached > (1.0 + TOLERANCE) * allocation.target,
        "tolerance": TOLERANCE,
    }


def budget_words(prune: PruneSection) -> str:
    """The budget in words: ``macs 0.25 of the distilled student`` or ``bytes 120,000``."""
    kind = prune.budget.kind()
    value = getattr(prune.budget, kind)
    if kind == "latency_ms":
        return f"latency {value:g} ms at batch {prune.budget.batch} on {prune.budget.runtime}"
    if kind == "latency" or value <= 1:
        return f"{kind} {value:g} of the distilled student"
    return f"{kind} {value:,.0f}"


# estimates already made in this process, by (prune section, student spec): `kdc run` checks the recipe
# before every stage, and the estimate costs a few pruned copies
_PLANNED: dict[tuple[str, str], float] = {}


def planned_sparsity(prune: PruneSection, student: nn.Module, input_shape, spec: dict | None = None) -> float:
    """The share of prunable channels the schedule ramps to, estimated before the distilled student exists.

    A uniform allocation on ``student`` (built afresh from the recipe: same architecture as the distilled
    model, so the same MACs and parameters); a bytes budget is estimated as parameters (4 bytes each in an
    fp32 file, about 1 in int8), a ``latency`` fraction as the same fraction of MACs, and ``latency_ms``,
    which has no fraction to go by, at ``prune.target_sparsity``. The stage plans again on the real
    allocation. With ``spec`` (the student's architecture spec), an estimate made before in this process is
    reused.
    """
    key = (repr(prune), repr(spec)) if spec is not None else None
    if key is None or key not in _PLANNED:
        estimate = _estimate(prune, student, tuple(int(d) for d in input_shape))
        if key is None:
            return estimate
        _PLANNED[key] = estimate
    return _PLANNED[key]


def _estimate(prune: PruneSection, student: nn.Module, input_shape: tuple) -> float:
    from ..prune.allocate import allocate_uniform, budget_target, groups_of, quadratic_cost, structure_cost

    kind = prune.budget.kind()
    value = getattr(prune.budget, kind)
    if kind == "latency_ms":
        return prune.target_sparsity
    proxy = {"bytes": "params", "latency": "macs"}.get(kind, kind)
    if kind == "bytes" and value > 1:
        value = value / (1 if prune.budget.format == "int8" else 4)
    settings = (prune.importance, prune.include, prune.exclude, prune.round_to)
    exact = structure_cost(student, input_shape, proxy, *settings)
    groups = groups_of(student, input_shape, *settings)
    target = budget_target(proxy, value, exact({}))
    return allocate_uniform(groups, quadratic_cost(exact, groups, prune.round_to), target, prune.round_to).sparsity
