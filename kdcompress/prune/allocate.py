"""Per-group pruning shares that meet a budget: how many channels each group of coupled layers gives up.

A budget (``prune.budget``) says what the pruned model may cost: MACs, parameters or the bytes of its
exported file, as a fraction of the distilled student (:func:`budget_target`) or as a count. This module
turns it into shares, ``{group root: share of its channels removed}``, that
:meth:`~kdcompress.prune.structured.StructuredPruner.prune_ratios` applies:

* :func:`allocate_uniform`: one share for every group, the smallest that meets the budget (bisection).
* :func:`allocate_sensitivity`: a greedy search in the manner of NetAdapt and AMC: from nothing pruned, it
  repeatedly raises the share of the group whose next step costs the least predicted accuracy per unit of
  cost saved (drops read off per-group sensitivity curves), until the budget is met; then it refines at
  channel granularity so the cost lands just under the target.

A cost (:data:`Cost`) maps shares to what the model pruned that way costs. :func:`structure_cost` measures
it exactly on a pruned copy (cached by the channels each group keeps: MACs, parameters and file sizes do
not depend on which channels go, only how many); :func:`quadratic_cost` fits the exact cost with a few such
measurements (MACs and parameters are sums over layers of kept-input times kept-output channels, a
quadratic in the kept fractions) so a search that asks thousands of questions stays fast.

Example::

    >>> import torch
    >>> from kdcompress.models import SmallCNN
    >>> net = SmallCNN(channels=(8, 16), hidden=32)
    >>> cost = structure_cost(net, (1, 28, 28), "macs")
    >>> groups = groups_of(net, (1, 28, 28))
    >>> a = allocate_uniform(groups, cost, budget_target("macs", 0.5, cost({})))
    >>> a.predicted <= a.target
    True
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import KdcError
from ..measure import count_macs, count_params
from .structured import StructuredPruner, kept_channels

__all__ = [
    "Cost",
    "Allocation",
    "budget_target",
    "structure_cost",
    "pruned_copy",
    "quadratic_cost",
    "groups_of",
    "allocate_uniform",
    "allocate_sensitivity",
    "interpolate_drop",
    "NEAR",
    "SWAP_SLACK",
]

# A cost: given {group root: share removed}, what the model pruned that way costs (groups not named: 0).
Cost = Callable[[dict[str, float]], float]

NEAR = 0.03  # the allocation aims to land within this share below the target
# points of predicted drop a swap (allocate_sensitivity) may add to land within NEAR of the target: drops are
# measured on a validation subset (2,000 images give a standard error near 0.7 points), so half a point is
# within their noise; more would trade accuracy for budget the user did not ask to spend
SWAP_SLACK = 0.5


@dataclass
class Allocation:
    """Shares per group that meet a budget, and what they are predicted to cost.

    ``predicted``: the cost of the model pruned by ``shares`` (from the cost function the allocation used);
    ``target`` and ``reference`` (the unpruned model's cost) are in the budget's unit; ``sparsity`` is the
    share of prunable channels these shares remove, weighted as ``StructuredPruner.sparsity`` weighs them
    (the schedule ramps to it); ``predicted_drop`` (sensitivity only) the sum of the curves' drops, in points.
    """

    shares: dict[str, float]
    predicted: float
    target: float
    reference: float
    kind: str
    method: str
    predicted_drop: float | None = None
    sparsity: float = 0.0
    kept: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain data for a checkpoint's metrics and the report."""
        return {
            "shares": {k: round(v, 6) for k, v in self.shares.items()},
            "kept": dict(self.kept),
            "predicted": self.predicted,
            "target": self.target,
            "reference": self.reference,
            "kind": self.kind,
            "method": self.method,
            "predicted_drop": self.predicted_drop,
            "sparsity": self.sparsity,
        }

    def lines(self) -> list[str]:
        """What to print: predicted cost against the target, then each group's share."""
        ratio = self.predicted / self.target if self.target else float("nan")
        drop = f", predicted accuracy drop {self.predicted_drop:.2f} points" if self.predicted_drop is not None else ""
        fmt = ",.2f" if self.kind.startswith("latency") else ",.0f"  # milliseconds, or counts
        what = "timed" if self.kind.startswith("latency") else "predicted"
        head = (
            f"allocation ({self.method}): {self.kind} {what} {self.predicted:{fmt}} against the target "
            f"{self.target:{fmt}} ({ratio:.1%} of it; the distilled student: {self.reference:{fmt}}){drop}"
        )
        return [head] + [
            f"  {root}: remove {share:.1%}" + (f", keep {self.kept[root]} channels" if root in self.kept else "")
            for root, share in self.shares.items()
        ]


def budget_target(kind: str, value: float, reference: float) -> float:
    """The budget in its unit: ``value`` at most 1 is a fraction of ``reference`` (the distilled student's cost),
    more is an absolute count. ``latency`` is always a fraction, ``latency_ms`` always milliseconds."""
    if not value > 0:
        raise ValueError(f"a budget must be above 0, got {value}")
    if kind == "latency_ms":
        return float(value)
    if kind == "latency" or value <= 1.0:
        return float(value) * float(reference)
    return float(value)


def groups_of(
    model: nn.Module, input_shape, importance: str = "l1", include=("*",), exclude=(), round_to=None
) -> list[dict]:
    """The prunable groups of ``model`` (:meth:`StructuredPruner.groups_info`), found on a copy."""
    pruner = StructuredPruner(copy.deepcopy(model), input_shape, importance, "layer", include, exclude, round_to)
    return pruner.groups_info()


def pruned_copy(
    model: nn.Module,
    input_shape,
    shares: dict[str, float],
    importance: str = "l1",
    include: Iterable[str] = ("*",),
    exclude: Iterable[str] = (),
    round_to: int | None = None,
) -> nn.Module:
    """A copy of ``model`` (on the CPU, in eval mode) with each group pruned by its share, the channels the
    pruning would pick first; ``model`` is not changed."""
    twin = copy.deepcopy(model).cpu().eval()
    ratios = {root: share for root, share in shares.items() if share > 0}
    if ratios:
        StructuredPruner(twin, input_shape, importance, "layer", include, exclude, round_to).prune_ratios(ratios)
    return twin


def structure_cost(
    model: nn.Module,
    input_shape,
    kind: str,
    importance: str = "l1",
    include: Iterable[str] = ("*",),
    exclude: Iterable[str] = (),
    round_to: int | None = None,
    bytes_of: Callable[[nn.Module], float] | None = None,
) -> Cost:
    """The exact cost of ``model`` pruned by given shares: a copy is pruned and measured (cached by kept channels).

    ``kind``: ``macs`` (:func:`~kdcompress.measure.count_macs`, one sample of ``input_shape``), ``params``
    or ``bytes`` (``bytes_of(pruned copy)``, e.g. the size of its exported file: the caller supplies it,
    since exporting is not this package's business). Unknown group roots are a ValueError.
    """
    if kind == "bytes" and bytes_of is None:
        raise ValueError("a bytes cost needs bytes_of, the function that measures a model's file")
    if kind not in ("macs", "params", "bytes"):
        raise ValueError(f"structure_cost measures macs, params or bytes, not {kind!r}")
    base = copy.deepcopy(model).cpu().eval()
    settings = dict(importance=importance, scope="layer", include=include, exclude=exclude, round_to=round_to)
    initial = {
        g["root"]: g["initial"] for g in StructuredPruner(copy.deepcopy(base), input_shape, **settings).groups_info()
    }
    roots = sorted(initial)
    cache: dict[tuple[int, ...], float] = {}

    def measure(m: nn.Module) -> float:
        if kind == "macs":
            return float(count_macs(m, input_shape))
        return float(count_params(m)) if kind == "params" else float(bytes_of(m))

    def cost(shares: dict[str, float]) -> float:
        unknown = sorted(set(shares) - set(initial))
        if unknown:
            raise ValueError(f"no prunable group named {unknown}; the groups are {roots}")
        key = tuple(kept_channels(initial[r], shares.get(r, 0.0), round_to) for r in roots)
        if key not in cache:
            ratios = {r: (initial[r] - k) / initial[r] for r, k in zip(roots, key) if k < initial[r]}
            cache[key] = measure(pruned_copy(base, input_shape, ratios, importance, include, exclude, round_to))
        return cache[key]

    return cost


def _features(x: list[float]) -> list[float]:
    """1, each kept fraction, and every product of two (squares included): a quadratic's terms."""
    n = len(x)
    return [1.0, *x, *(x[i] * x[j] for i in range(n) for j in range(i, n))]


def quadratic_cost(
    cost: Cost, groups: list[dict], round_to: int | None = None, check: int = 2, tolerance: float | None = 0.005
) -> Cost:
    """A fast stand-in for ``cost``: the quadratic in the groups' kept fractions through measured points.

    MACs and parameters are, layer by layer, kept input channels times kept output channels (plus terms in
    one of them), so a quadratic in the kept fractions is exact for them, and near-exact for the size of an
    exported file. It is fitted on ``1 + 2G + G(G-1)/2`` measurements (G groups) and checked against ``cost``
    at ``check`` further shares; when it misses one by more than ``tolerance`` (0.5 %), ``cost`` itself is
    returned. ``tolerance=None`` keeps the fit unchecked: a smooth stand-in for a cost that is itself a noisy
    prediction (latency from a per-layer table), whose result is checked on the real model instead.
    """
    roots = [g["root"] for g in groups]
    initial = {g["root"]: g["initial"] for g in groups}

    def fractions(shares: dict[str, float]) -> list[float]:
        return [kept_channels(initial[r], shares.get(r, 0.0), round_to) / initial[r] for r in roots]

    probes: list[dict[str, float]] = [{}]
    for r in roots:
        probes += [{r: 0.5}, {r: 0.25}]
    probes += [{a: 0.5, b: 0.5} for i, a in enumerate(roots) for b in roots[i + 1 :]]
    design = torch.tensor([_features(fractions(s)) for s in probes], dtype=torch.float64)
    values = torch.tensor([[cost(s)] for s in probes], dtype=torch.float64)
    coef = torch.linalg.lstsq(design, values, driver="gelsd").solution[:, 0]

    def fitted(shares: dict[str, float]) -> float:
        return float(torch.tensor(_features(fractions(shares)), dtype=torch.float64) @ coef)

    generator = torch.Generator().manual_seed(0)
    for _ in range(check if tolerance is not None else 0):
        shares = {r: float(v) for r, v in zip(roots, torch.rand(len(roots), generator=generator) * 0.8)}
        exact = cost(shares)
        if abs(fitted(shares) - exact) > tolerance * max(abs(exact), 1.0):
            return cost
    return fitted


def interpolate_drop(curve: list[tuple[float, float]], share: float) -> float:
    """The accuracy drop (points) a curve predicts at ``share``: linear between its points, 0 at share 0,
    beyond the last point along the last segment's rising slope."""
    points = sorted((float(r), float(d)) for r, d in curve)
    if not points or points[0][0] > 0:
        points.insert(0, (0.0, 0.0))
    for (r0, d0), (r1, d1) in zip(points, points[1:]):
        if share <= r1:
            return d0 + (d1 - d0) * (share - r0) / (r1 - r0) if r1 > r0 else d1
    if len(points) == 1:
        return points[0][1]
    (r0, d0), (r1, d1) = points[-2], points[-1]
    slope = max(0.0, (d1 - d0) / (r1 - r0)) if r1 > r0 else 0.0
    return d1 + slope * (share - r1)


def _levels(initial: int, round_to: int | None) -> list[int]:
    """The channel counts a group of ``initial`` channels can keep, from all of them down to the fewest."""
    return sorted({kept_channels(initial, j / initial, round_to) for j in range(initial)}, reverse=True)


def _share(initial: int, kept: int) -> float:
    return (initial - kept) / initial


def _impossible(cost_at_max: float, target: float, round_to: int | None, left_out: list[str]) -> KdcError:
    unpruned = f"; groups without a sensitivity curve are not pruned: {', '.join(left_out)}" if left_out else ""
    return KdcError(
        f"prune.budget cannot be met: even with every group at its largest share (each keeping "
        f"{round_to or 1} channel{'s' if (round_to or 1) > 1 else ''}) the model costs {cost_at_max:,.0f}, above "
        f"the target {target:,.0f}{unpruned}; raise the budget, lower or drop prune.round_to, or let more layers "
        f"be pruned (prune.include/exclude)"
    )


def _finish(groups, kept: dict[str, int], cost: Cost, target: float, reference: float, kind: str, method: str):
    initial = {g["root"]: g["initial"] for g in groups}
    shares = {r: _share(initial[r], k) for r, k in kept.items()}
    total = sum(g["initial"] * len(g["layers"]) for g in groups)
    removed = sum((initial[r] - k) * len(g["layers"]) for g in groups for r in [g["root"]] for k in [kept[r]])
    return Allocation(
        shares=shares,
        predicted=cost(shares),
        target=target,
        reference=reference,
        kind=kind,
        method=method,
        sparsity=removed / total if total else 0.0,
        kept=dict(kept),
    )


def allocate_uniform(
    groups: list[dict], cost: Cost, target: float, round_to: int | None = None, *, kind: str = "cost"
) -> Allocation:
    """One share for every group: the smallest that brings ``cost`` to ``target`` or below (bisection).

    ``groups``: :meth:`StructuredPruner.groups_info` (roots and initial channels). The cost lands as near the
    target as one share for all at channel granularity allows, never above it; ``Allocation.predicted``
    says how near. A KdcError when even the largest shares cost more than the target.
    """
    initial = {g["root"]: g["initial"] for g in groups}
    most = {r: _share(n, _levels(n, round_to)[-1]) for r, n in initial.items()}

    def kept_at(s: float) -> dict[str, int]:
        return {r: kept_channels(n, min(s, most[r]), round_to) for r, n in initial.items()}

    def cost_at(s: float) -> float:
        return cost({r: _share(initial[r], k) for r, k in kept_at(s).items()})

    reference = cost({})
    if reference <= target:
        return _finish(groups, kept_at(0.0), cost, target, reference, kind, "uniform")
    hi = max(most.values(), default=0.0)
    if cost_at(hi) > target:
        raise _impossible(cost_at(hi), target, round_to, [])
    lo = 0.0
    for _ in range(40):  # far finer than one channel of any group
        mid = (lo + hi) / 2
        if cost_at(mid) <= target:
            hi = mid
        else:
            lo = mid
    kept = kept_at(hi)
    # one share for all moves every group at once; a channel given back to single groups (the widest first,
    # at most one level each) brings the cost nearer the target where that jump overshot it
    levels = {r: _levels(n, round_to) for r, n in initial.items()}
    for r in sorted(initial, key=lambda r: (-initial[r], r)):
        up = [v for v in levels[r] if v > kept[r]]
        trial = {**kept, r: up[-1]} if up else kept
        if up and cost({q: _share(initial[q], k) for q, k in trial.items()}) <= target:
            kept = trial
    return _finish(groups, kept, cost, target, reference, kind, "uniform")


def allocate_sensitivity(
    groups: list[dict],
    cost: Cost,
    target: float,
    curves: dict[str, list[tuple[float, float]]],
    step: float = 0.05,
    round_to: int | None = None,
    *,
    kind: str = "cost",
) -> Allocation:
    """Shares chosen from sensitivity curves: the least predicted accuracy drop per unit of cost saved, greedily.

    From nothing pruned, each round raises by ``step`` (at least one level of channels) the share of the
    group whose raise has the smallest ``drop increase / cost saved``, read off ``curves`` (``{root:
    [(share, drop in points), ...]}``, linear in between) until ``cost <= target``. The last raise is then
    refined channel by channel to the smallest that meets the target, and channels are given back to the
    most sensitive groups while the target still holds. When the cost still sits more than :data:`NEAR`
    under the target (one channel of a group can be worth more than that), a group gives back a level and
    the others make up for it, where that lands within :data:`NEAR` at the least predicted drop and adds at
    most :data:`SWAP_SLACK` points to it. No share
    reaches a group's whole width: each keeps at least one channel (``round_to`` channels). Groups without a
    curve are not pruned. A KdcError when even the largest shares cannot meet the budget.
    """
    search = _Search(groups, cost, target, curves, step, round_to)
    fewest = {**search.start, **{r: search.levels[r][-1] for r in search.pruned}}
    if search.cost_of(fewest) > target:
        raise _impossible(search.cost_of(fewest), target, round_to, sorted(set(search.initial) - set(curves)))
    kept, last = search.greedy(search.start, search.pruned)
    if last is not None:
        kept = search.give_back(search.refine(kept, last))
        kept = search.swap(kept)
    allocation = _finish(groups, kept, cost, target, cost({}), kind, "sensitivity")
    allocation.predicted_drop = search.total_drop(kept)
    return allocation


class _Search:
    """The state :func:`allocate_sensitivity` searches in: kept channels per group, their levels and drops."""

    def __init__(self, groups, cost: Cost, target: float, curves, step: float, round_to: int | None):
        self.initial = {g["root"]: g["initial"] for g in groups}
        self.levels = {r: _levels(n, round_to) for r, n in self.initial.items()}
        self.pruned = [r for r in self.initial if r in curves and len(self.levels[r]) > 1]
        self.start = dict(self.initial)
        self.cost, self.target, self.curves, self.step, self.round_to = cost, target, curves, step, round_to

    def cost_of(self, kept: dict[str, int]) -> float:
        return self.cost({r: _share(self.initial[r], v) for r, v in kept.items() if v < self.initial[r]})

    def drop(self, r: str, k: int) -> float:
        return interpolate_drop(self.curves[r], _share(self.initial[r], k))

    def total_drop(self, kept: dict[str, int]) -> float:
        return sum(self.drop(r, kept[r]) for r in self.pruned)

    def greedy(self, kept: dict[str, int], movable: list[str]):
        """Raise the cheapest group (predicted drop per cost saved) until the target holds: ``(kept, last raise)``;
        ``(None, None)`` when the ``movable`` groups run out of channels first."""
        kept, last = dict(kept), None
        while (now := self.cost_of(kept)) > self.target:
            best = None
            for r in movable:
                nxt = _next_level(self.levels[r], kept[r], self.initial[r], self.step, self.round_to)
                if nxt is None:
                    continue
                saved = now - self.cost_of({**kept, r: nxt})
                rise = max(0.0, self.drop(r, nxt) - self.drop(r, kept[r]))
                key = (rise / saved if saved > 0 else math.inf, -saved, r)
                if best is None or key < best[0]:
                    best = (key, r, nxt)
            if best is None:
                return None, None
            _, r, nxt = best
            last = (r, kept[r])
            kept[r] = nxt
        return kept, last

    def refine(self, kept: dict[str, int], last) -> dict[str, int]:
        """Undo as much of the last raise as the target allows: the most channels of that group that still fit."""
        r, before = last
        for v in [v for v in self.levels[r] if kept[r] <= v < before]:  # descending: most channels first
            if self.cost_of({**kept, r: v}) <= self.target:
                return {**kept, r: v}
        return kept

    def give_back(self, kept: dict[str, int], frozen: str | None = None) -> dict[str, int]:
        """Give a level of channels back to the group whose predicted drop falls most, again and again, while
        the target holds: the slack under the target buys back accuracy."""
        while True:
            options = []
            for r in self.pruned:
                up = [v for v in self.levels[r] if v > kept[r]]
                if r != frozen and up and self.cost_of({**kept, r: up[-1]}) <= self.target:
                    options.append((self.drop(r, up[-1]) - self.drop(r, kept[r]), r, up[-1]))
            if not options:
                return kept
            _, r, v = min(options)
            kept = {**kept, r: v}

    def swap(self, kept: dict[str, int]) -> dict[str, int]:
        """When the cost sits more than NEAR under the target: for each pruned group, a level back to it and the
        others raised to make up for it; the result within NEAR with the least predicted drop, if that drop is
        at most SWAP_SLACK points above ``kept``'s, else ``kept``."""
        if self.cost_of(kept) >= (1.0 - NEAR) * self.target:
            return kept
        best, limit = None, self.total_drop(kept) + SWAP_SLACK
        for r in self.pruned:
            up = [v for v in self.levels[r] if v > kept[r]]
            if not up:
                continue
            others = [q for q in self.pruned if q != r]
            trial, last = self.greedy({**kept, r: up[-1]}, others)
            if trial is None:
                continue
            if last is not None:
                trial = self.give_back(self.refine(trial, last), frozen=r)
            if self.cost_of(trial) >= (1.0 - NEAR) * self.target and self.total_drop(trial) <= limit:
                key = (self.total_drop(trial), r)
                if best is None or key < best[0]:
                    best = (key, trial)
        return best[1] if best else kept


def _next_level(levels: list[int], kept: int, initial: int, step: float, round_to: int | None) -> int | None:
    """The kept count ``step`` further along (at least the next level down), or None at the fewest."""
    lower = [v for v in levels if v < kept]
    if not lower:
        return None
    nxt = kept_channels(initial, _share(initial, kept) + step, round_to)
    return nxt if nxt < kept else lower[0]
