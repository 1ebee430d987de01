"""Pruning to a budget (``prune.budget``): measure the distilled student, allocate shares per group, check the end.

The pruned stage calls :func:`allocate_budget` on the distilled model before retraining: it measures the
reference (the distilled student's MACs, parameters or file bytes), turns the budget into a target
(:func:`kdcompress.prune.allocate.budget_target`), and allocates shares per group of coupled channels,
uniform or from sensitivity curves. The schedule then ramps towards that allocation, and at the end
:func:`budget_record` measures what the real pruned model costs, for the stage's metrics and the report.

:func:`budget_cost` dispatches from a budget kind to its cost function; :func:`sensitivity_curves` gives
``allocation: sensitivity`` the per-group accuracy-drop curves of ``kdc sensitivity``. A latency budget is
searched on the runtime itself (:func:`timed_pair`: candidates timed in turns with the distilled student) and
checked the same way at the end of the stage.

``kdc validate`` plans the schedule before any distilled model exists: :func:`planned_sparsity` estimates
the share of channels from a uniform allocation on the freshly built student (same architecture, so the
same MACs and parameters).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
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
    "pruned_copy",
    "resumed_allocation",
    "sensitivity_curves",
    "LATENCY_KINDS",
    "latency_target",
    "timed_pair",
    "TOLERANCE",
]

LATENCY_KINDS = ("latency_ms", "latency")
VERIFY_ROUNDS = 7  # rounds of the interleaved timing that checks a latency budget (median over rounds)
LATENCY_TRIES = 7  # structures timed for a latency budget (a search over the share of MACs kept)
# a latency budget's search aims this far under the target: one structure's median of 7 rounds moved by 10-15 %
# between timings on a shared 2-core machine (1.22 ms in the search, 1.44 ms at the end of retraining)
LATENCY_MARGIN = 0.9


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
    b = prune.budget
    latency_words = (
        f"median ms per batch of {b.batch} on {b.runtime}"
        + (" (the model exported to ONNX)" if b.runtime == "onnxruntime" else "")
        + f", timed in turns with the distilled student over {VERIFY_ROUNDS} rounds, as the search timed each "
        "candidate structure"
    )
    return {
        "macs": "multiply-accumulates of one image, counted by torch's operator counter (kdc's macs column)",
        "params": "parameters of the model (every element)",
        "bytes": f"size of the model exported to {prune.budget.format} (kdc's metadata left out), in bytes",
        "latency_ms": latency_words,
        "latency": latency_words,
    }.get(kind, kind)


def measure_model(kind: str, model: nn.Module, input_shape, prune: PruneSection) -> float:
    """What ``model`` costs in the budget's unit (the reference on the distilled model, reached at the end)."""
    if kind == "macs":
        return float(count_macs(copy.deepcopy(model).cpu(), input_shape))
    if kind == "params":
        return float(count_params(model))
    if kind == "bytes":
        return float(file_bytes(model, input_shape, prune.budget.format))
    return budget_cost(kind, model, input_shape, prune)({})  # the latency kinds: predicted from the table


def timed_pair(reference: nn.Module, pruned: nn.Module, input_shape, prune: PruneSection, threads: int) -> dict:
    """The distilled (``reference``) and ``pruned`` models timed in turns, in the same rounds, as a latency
    budget is checked: ``{"distilled": {median_ms, ...}, "pruned": {...}}`` (:func:`kdcompress.latency_budget.
    verify_latency`: exported to ONNX for onnxruntime, :data:`VERIFY_ROUNDS` rounds, median over rounds)."""
    from ..latency_budget import verify_latency

    models = {"distilled": copy.deepcopy(reference).cpu().eval(), "pruned": copy.deepcopy(pruned).cpu().eval()}
    b = prune.budget
    return verify_latency(models, input_shape, batch=b.batch, runtime=b.runtime, threads=threads, rounds=VERIFY_ROUNDS)


def latency_target(prune: PruneSection, reference_ms: float) -> float:
    """The milliseconds a latency budget allows: ``latency_ms`` as given, ``latency`` as a share of the reference."""
    b = prune.budget
    return float(b.latency_ms) if b.latency_ms is not None else float(b.latency) * reference_ms


def budget_cost(kind: str, model: nn.Module, input_shape, prune: PruneSection, threads: int = 1) -> Cost:
    """THE DISPATCH POINT from a budget kind to the cost of ``model`` pruned by given shares.

    ``macs``, ``params`` and ``bytes`` are measured on pruned copies
    (:func:`kdcompress.prune.allocate.structure_cost`). The latency kinds give the per-layer latency table's
    prediction (:func:`kdcompress.latency_budget.latency_cost`: milliseconds per batch of ``prune.budget.batch``
    on ``prune.budget.runtime`` with ``threads`` threads); the pruned stage does not search on it (see
    :func:`_latency_allocation`) but times candidates on the runtime.
    """
    if kind in LATENCY_KINDS:
        from ..latency_budget import latency_cost  # onnxruntime and the table are needed only here

        return latency_cost(
            model,
            input_shape,
            batch=prune.budget.batch,
            runtime=prune.budget.runtime,
            threads=threads,
            importance=prune.importance,
            include=prune.include,
            exclude=prune.exclude,
            round_to=prune.round_to,
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
    """``{group root: [(share removed, accuracy drop in points), ...]}`` for ``allocation: sensitivity``.

    What ``kdc sensitivity`` measures (:func:`kdcompress.run.sensitivity.sensitivity_for`): each prunable
    group of the distilled student pruned alone at ``prune.sensitivity_ratios``, scored on the validation split
    (else a fixed subset of the training split; never the test split). ``sensitivity.json`` is reused when it
    was measured from this distilled checkpoint with these settings, else measured and written.
    """
    from .sensitivity import sensitivity_for  # torch-pruning and the data are needed only here

    result, _, _ = sensitivity_for(ctx.recipe, ctx.console, data=ctx.data)
    return {g.name: list(zip(g.ratios, g.drop)) for g in result.groups}


def allocate_budget(
    model: nn.Module, input_shape, prune: PruneSection, curves: dict | None = None, console=None, threads: int = 1
) -> "Allocation":
    """The shares per group that bring ``model`` (the distilled student) within ``prune.budget``.

    MACs, parameters, bytes: the search runs on a quadratic fitted to the exact cost
    (:func:`kdcompress.prune.allocate.quadratic_cost`); the allocation's ``predicted`` cost is then measured
    exactly on a pruned copy, and should the fit have misled the search above the target, it is searched again
    on the exact cost. Latency: see :func:`_latency_allocation`.
    """
    from ..prune.allocate import budget_target, groups_of, quadratic_cost

    kind = prune.budget.kind()
    started = time.perf_counter()
    groups = groups_of(model, input_shape, prune.importance, prune.include, prune.exclude, prune.round_to)
    say = console.print if console is not None else (lambda *a, **k: None)
    if kind in LATENCY_KINDS:
        allocation = _latency_allocation(model, input_shape, prune, groups, curves, threads, say)
    else:
        exact = budget_cost(kind, model, input_shape, prune, threads)
        reference = exact({})
        target = budget_target(kind, getattr(prune.budget, kind), reference)
        say(
            f"pruned: allocating {prune.allocation} shares over {len(groups)} groups of channels for a {kind} "
            f"budget of {target:,.0f} (the distilled student: {reference:,.0f})"
        )
        allocation = _search(prune, groups, quadratic_cost(exact, groups, prune.round_to), target, curves)
        allocation.predicted, allocation.reference = exact(allocation.shares), reference
        if allocation.predicted > target:
            allocation = _search(prune, groups, exact, target, curves)
    for line in allocation.lines():
        say(line)
    say(f"pruned: allocation found in {time.perf_counter() - started:.1f} s")
    return allocation


def _search(prune: PruneSection, groups: list[dict], cost: Cost, target: float, curves: dict | None) -> "Allocation":
    """One allocation search, as ``prune.allocation`` says."""
    from ..prune.allocate import allocate_sensitivity, allocate_uniform

    kind = prune.budget.kind()
    if prune.allocation == "sensitivity":
        return allocate_sensitivity(groups, cost, target, curves or {}, round_to=prune.round_to, kind=kind)
    return allocate_uniform(groups, cost, target, prune.round_to, kind=kind)


def pruned_copy(model: nn.Module, input_shape, prune: PruneSection, shares: dict[str, float]) -> nn.Module:
    """A copy of ``model`` with each group pruned by its share, as ``prune`` ranks and rounds channels
    (:func:`kdcompress.prune.allocate.pruned_copy`)."""
    from ..prune import allocate

    return allocate.pruned_copy(
        model, input_shape, shares, prune.importance, prune.include, prune.exclude, prune.round_to
    )


def _latency_allocation(model, input_shape, prune, groups, curves, threads: int, say) -> "Allocation":
    """A latency budget, searched on the runtime that ships (NetAdapt's lesson): every try allocates a MACs
    budget over the groups (uniform, or from the sensitivity curves, as ``prune.allocation`` says), and that
    structure (a pruned copy of the distilled student) is exported and timed in turns with the distilled one
    (:func:`timed_pair`). A search over the MACs fraction keeps the least pruned structure whose timed latency
    is within :data:`LATENCY_MARGIN` of the budget (timings move between runs); the allocation records the
    timed figures (``predicted``: that structure's median ms, ``reference``: the distilled student's in the
    same rounds, ``target``: the budget in ms).

    The per-layer latency table (:func:`kdcompress.latency_budget.latency_cost`) does not steer it: on this
    project's CNN recipe it predicted 0.66 ms for a structure that timed 1.86 ms (units timed alone miss the
    layout changes onnxruntime makes across a whole network), and a search on it kept the costliest layer whole.
    """
    from ..prune.allocate import quadratic_cost

    macs = budget_cost("macs", model, input_shape, prune)
    fitted, reference_macs = quadratic_cost(macs, groups, prune.round_to), macs({})
    say(
        f"pruned: allocating {prune.allocation} shares over {len(groups)} groups of channels for a latency budget "
        f"of {budget_words(prune)}, timing each candidate against the distilled student"
    )
    good, bad, best, fraction = 0.0, 1.0, None, 0.5 if prune.budget.latency is None else prune.budget.latency
    for attempt in range(1, LATENCY_TRIES + 1):
        try:
            allocation = _search(
                dataclasses.replace(prune, budget=type(prune.budget)(macs=fraction)),
                groups,
                fitted,
                fraction * reference_macs,
                curves,
            )
        except KdcError:
            if best is None:
                raise
            break  # more MACs than any structure can shed: the best timed so far stands
        timing = timed_pair(
            model, pruned_copy(model, input_shape, prune, allocation.shares), input_shape, prune, threads
        )
        reference, reached = timing["distilled"]["median_ms"], timing["pruned"]["median_ms"]
        target = latency_target(prune, reference)
        meets = reached <= LATENCY_MARGIN * target
        say(
            f"pruned: try {attempt}: {fraction:.1%} of the MACs timed {reached:.2f} ms against the budget's {target:.2f} "
            f"ms, aimed at {LATENCY_MARGIN:.0%} of it (the distilled student: {reference:.2f} ms, same rounds)"
            + ("" if meets else ": over")
        )
        if meets or best is None or (not best[4] and reached < best[3]):  # else the fastest so far
            best = (allocation, target, reference, reached, meets)
        good, bad = (max(good, fraction), bad) if meets else (good, min(bad, fraction))
        if good > 0 and bad / good < 1.1:
            break
        fraction = (good * bad) ** 0.5 if good > 0 else fraction * min(0.9, target / reached)
    allocation, target, reference, reached, _ = best
    if reached > target:
        raise KdcError(
            f"prune.budget cannot be met: the fastest structure tried timed {reached:.2f} ms against the budget's "
            f"{target:.2f} ms at batch {prune.budget.batch} on {prune.budget.runtime} (the distilled student: "
            f"{reference:.2f} ms); raise the budget, or let more layers be pruned (prune.include/exclude)"
        )
    allocation.kind = prune.budget.kind()
    allocation.target, allocation.reference, allocation.predicted = target, reference, reached
    return allocation


def resumed_allocation(model: nn.Module, input_shape, prune: PruneSection, shares: dict[str, float]) -> "Allocation":
    """An :class:`~kdcompress.prune.allocate.Allocation` of saved ``shares`` (a resumed latency budget): its
    sparsity as the schedule needs it; target and reference are timed again at the end of the stage."""
    from ..prune.allocate import Allocation
    from ..prune.structured import StructuredPruner, kept_channels

    pruner = StructuredPruner(
        copy.deepcopy(model), input_shape, prune.importance, "layer", prune.include, prune.exclude, prune.round_to
    )
    initial = {g["root"]: g["initial"] for g in pruner.groups_info()}
    kept = {r: kept_channels(initial[r], share, prune.round_to) for r, share in shares.items() if r in initial}
    nan = float("nan")
    return Allocation(
        shares=dict(shares),
        predicted=nan,
        target=nan,
        reference=nan,
        kind=prune.budget.kind(),
        method=prune.allocation,
        sparsity=pruner.planned_sparsity(shares),
        kept=kept,
    )


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
        "predicted": allocation.predicted if math.isfinite(allocation.predicted) else None,  # None: resumed
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
