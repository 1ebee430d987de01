"""Per-layer sensitivity: how much accuracy each prunable group loses when it alone is pruned, at a grid of ratios.

Before choosing per-layer pruning ratios (``prune.allocation: sensitivity``), one needs to know which layers
can lose channels cheaply and which cannot. :func:`measure_sensitivity` prunes one group at a time on a deep
copy of the model, at each ratio of a grid, and scores the copy with an ``evaluate`` function the caller
gives (the run layer decides on which images: never the test split). The original model is never changed.

* ``method="structured"``: the groups are those of :meth:`StructuredPruner.groups_info` with ``scope="layer"``
  (a conv's output channels with everything that depends on them; a linear layer's neurons). Each ratio
  removes that share of the group's channels (:meth:`StructuredPruner.prune_ratios`); the MACs and parameters
  of the pruned copy are counted.
* ``method="unstructured"``: each prunable weight tensor (:func:`kdcompress.prune.prunable_weights`) has that
  share of its smallest-magnitude weights zeroed; the MACs are those sparse kernels could reach
  (:func:`kdcompress.measure.count_sparse_macs`) and the parameters are the non-zeros.

The result (:class:`Sensitivity`, one :class:`GroupCurve` per group) is plain data: :meth:`Sensitivity.to_dict`
gives JSON, and :meth:`Sensitivity.from_dict` reads it back from a file it does not trust.
:func:`kdcompress.prune.allocate.interpolate_drop` reads a curve between its measured ratios for an allocation.

Example::

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> x, y = torch.randn(64, 1, 4, 4), torch.randint(0, 3, (64,))
    >>> def evaluate(model):
    ...     with torch.no_grad():
    ...         p = float((model(x).argmax(1) == y).float().mean())
    ...     return p, (p * (1 - p) / 64) ** 0.5
    >>> result = measure_sensitivity(net, (1, 4, 4), evaluate, [0.25, 0.5])
    >>> [(g.name, g.size, g.ratios) for g in result.groups]
    [('1', 8, [0.25, 0.5])]
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from ..measure import count_macs, count_nonzero, count_params, count_sparse_macs
from .unstructured import prunable_weights

__all__ = [
    "GroupCurve",
    "Sensitivity",
    "measure_sensitivity",
    "check_ratios",
    "METHODS",
    "MAX_GROUPS",
    "MAX_RATIOS",
]

METHODS = ("structured", "unstructured")
SCHEMA = 1
# bounds on what a sensitivity file may hold (it is read as untrusted data): far above any real model
MAX_GROUPS = 10_000
MAX_RATIOS = 100
MAX_LAYERS = 1_000
MAX_TEXT = 1_000

Evaluate = Callable[[nn.Module], "tuple[float, float]"]
Progress = Callable[[int, int, str], None]


@dataclass
class GroupCurve:
    """One group's measured curve: at each ``ratios[i]``, the accuracy of the model with only this group pruned.

    ``name``: the group's root layer (structured; the key of :meth:`StructuredPruner.prune_ratios`) or the
    weight tensor (unstructured, ``features.0.weight``). ``layers``: the prunable layers that lose channels with
    it (structured) or the tensor itself. ``size``: the group's channels (structured) or weights (unstructured)
    before pruning. ``drop``: accuracy lost against the unpruned model, in points (positive is worse).
    ``macs`` and ``params``: of the pruned copy (unstructured: sparse MACs and non-zero parameters).
    """

    name: str
    layers: list[str]
    size: int
    ratios: list[float]
    accuracy: list[float]
    se: list[float]
    drop: list[float]
    macs: list[int]
    params: list[int]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "layers": list(self.layers),
            "size": self.size,
            "ratios": list(self.ratios),
            "accuracy": list(self.accuracy),
            "se": list(self.se),
            "drop": list(self.drop),
            "macs": list(self.macs),
            "params": list(self.params),
        }

    @classmethod
    def from_dict(cls, data, where: str = "group") -> "GroupCurve":
        """A curve from JSON data; ValueError saying what is wrong and where when it is not one."""
        if not isinstance(data, dict):
            raise ValueError(f"{where} is not an object")
        name = _text(data.get("name"), f"{where}.name")
        where = f"{where} ({name})"
        layers = data.get("layers")
        if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
            raise ValueError(f"{where}: layers is not a list of at most {MAX_LAYERS} names")
        layers = [_text(layer, f"{where}.layers") for layer in layers]
        size = _count(data.get("size"), f"{where}.size")
        ratios = _numbers(data.get("ratios"), f"{where}.ratios", None, 0.0, 1.0)
        n = len(ratios)
        return cls(
            name=name,
            layers=layers,
            size=size,
            ratios=ratios,
            accuracy=_numbers(data.get("accuracy"), f"{where}.accuracy", n, 0.0, 1.0),
            se=_numbers(data.get("se"), f"{where}.se", n, 0.0, 1.0),
            drop=_numbers(data.get("drop"), f"{where}.drop", n, -100.0, 100.0),
            macs=[_count(v, f"{where}.macs") for v in _list(data.get("macs"), f"{where}.macs", n)],
            params=[_count(v, f"{where}.params") for v in _list(data.get("params"), f"{where}.params", n)],
        )


@dataclass
class Sensitivity:
    """What :func:`measure_sensitivity` found: the unpruned baseline and one :class:`GroupCurve` per group.

    ``split``, ``samples`` and ``note`` say which images scored it (set by the caller: the run layer);
    ``key`` identifies the checkpoint and settings it was measured from and ``source_fingerprint`` that
    checkpoint's fingerprint (both set by the run layer, for reuse and staleness); ``seconds`` how long it took.
    """

    method: str
    importance: str
    ratios: list[float]
    baseline_accuracy: float
    baseline_se: float
    baseline_macs: int
    baseline_params: int
    groups: list[GroupCurve]
    samples: int = 0
    split: str = ""
    note: str = ""
    key: str = ""
    source_fingerprint: str = ""
    seconds: float = 0.0
    round_to: int | None = None

    @property
    def unit(self) -> str:
        """What a group's ``size`` counts: channels (structured) or weights (unstructured)."""
        return "channels" if self.method == "structured" else "weights"

    def group(self, name: str) -> GroupCurve:
        """The curve of the group called ``name``; KeyError listing the groups when there is none."""
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no group {name!r}; the groups are {[g.name for g in self.groups]}")

    def to_dict(self) -> dict:
        """Plain JSON-able data; :meth:`from_dict` reads it back."""
        return {
            "schema": SCHEMA,
            "method": self.method,
            "importance": self.importance,
            "round_to": self.round_to,
            "ratios": list(self.ratios),
            "samples": self.samples,
            "split": self.split,
            "note": self.note,
            "key": self.key,
            "source_fingerprint": self.source_fingerprint,
            "seconds": self.seconds,
            "baseline": {
                "accuracy": self.baseline_accuracy,
                "se": self.baseline_se,
                "macs": self.baseline_macs,
                "params": self.baseline_params,
            },
            "groups": [g.to_dict() for g in self.groups],
        }

    @classmethod
    def from_dict(cls, data) -> "Sensitivity":
        """Read :meth:`to_dict`'s data from an untrusted source: every type, length and number is checked.

        ValueError (saying what is wrong, where) when it is not a sensitivity record kdc writes: a missing or
        mistyped entry, a non-finite number, lists of unequal lengths, more groups or ratios than
        :data:`MAX_GROUPS` / :data:`MAX_RATIOS`.
        """
        if not isinstance(data, dict):
            raise ValueError("it is not a JSON object")
        if data.get("schema") != SCHEMA:
            raise ValueError(f"schema is {data.get('schema')!r}, not {SCHEMA}")
        method = data.get("method")
        if method not in METHODS:
            raise ValueError(f"method is {method!r}, not one of {', '.join(METHODS)}")
        ratios = check_ratios(_numbers(data.get("ratios"), "ratios", None, 0.0, 1.0))
        baseline = data.get("baseline")
        if not isinstance(baseline, dict):
            raise ValueError("baseline is not an object")
        groups = data.get("groups")
        if not isinstance(groups, list) or len(groups) > MAX_GROUPS:
            raise ValueError(f"groups is not a list of at most {MAX_GROUPS}")
        curves = [GroupCurve.from_dict(g, f"groups[{i}]") for i, g in enumerate(groups)]
        for curve in curves:
            if curve.ratios != ratios:
                raise ValueError(f"group {curve.name!r} was measured at other ratios than {ratios}")
        round_to = data.get("round_to")
        if round_to is not None:
            round_to = _count(round_to, "round_to")
        return cls(
            method=method,
            importance=_text(data.get("importance"), "importance"),
            ratios=ratios,
            baseline_accuracy=_number(baseline.get("accuracy"), "baseline.accuracy", 0.0, 1.0),
            baseline_se=_number(baseline.get("se"), "baseline.se", 0.0, 1.0),
            baseline_macs=_count(baseline.get("macs"), "baseline.macs"),
            baseline_params=_count(baseline.get("params"), "baseline.params"),
            groups=curves,
            samples=_count(data.get("samples"), "samples"),
            split=_text(data.get("split"), "split", empty=True),
            note=_text(data.get("note"), "note", empty=True),
            key=_text(data.get("key"), "key", empty=True),
            source_fingerprint=_text(data.get("source_fingerprint"), "source_fingerprint", empty=True),
            seconds=_number(data.get("seconds"), "seconds", 0.0, math.inf),
            round_to=round_to,
        )


# -- validation helpers for from_dict: each raises ValueError naming the entry


def _text(value, where: str, empty: bool = False) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT or (not empty and not value):
        raise ValueError(f"{where} is not a text of 1 to {MAX_TEXT} characters")
    return value


def _number(value, where: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} is not a finite number")
    if not lo <= value <= hi:
        raise ValueError(f"{where} is {value}, outside [{lo}, {hi}]")
    return float(value)


def _count(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ValueError(f"{where} is not a whole number >= 0")
    return value


def _list(value, where: str, length: int | None) -> list:
    if not isinstance(value, list) or len(value) > MAX_RATIOS:
        raise ValueError(f"{where} is not a list of at most {MAX_RATIOS} entries")
    if length is not None and len(value) != length:
        raise ValueError(f"{where} has {len(value)} entries, not {length} (one per ratio)")
    return value


def _numbers(value, where: str, length: int | None, lo: float, hi: float) -> list[float]:
    return [_number(v, f"{where}[{i}]", lo, hi) for i, v in enumerate(_list(value, where, length))]


def check_ratios(ratios: Iterable[float]) -> list[float]:
    """``ratios`` as a sorted list of distinct floats, each in (0, 1); ValueError otherwise (or when empty)."""
    values = []
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r < 1.0:
            raise ValueError(f"every sensitivity ratio must be a number in (0, 1), got {r!r}")
        values.append(float(r))
    if not values or len(values) > MAX_RATIOS:
        raise ValueError(f"give 1 to {MAX_RATIOS} sensitivity ratios, got {len(values)}")
    if len(set(values)) != len(values) or values != sorted(values):
        raise ValueError(f"the sensitivity ratios must rise, each once: got {values}")
    return values


# -- measurement


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _score(evaluate: Evaluate, model: nn.Module) -> tuple[float, float]:
    """``evaluate(model)`` checked: two finite numbers, the accuracy in [0, 1]."""
    accuracy, se = evaluate(model)
    accuracy, se = float(accuracy), float(se)
    if not (math.isfinite(accuracy) and 0.0 <= accuracy <= 1.0 and math.isfinite(se) and se >= 0.0):
        raise ValueError(f"evaluate returned ({accuracy}, {se}); it must return an accuracy in [0, 1] and its SE")
    return accuracy, se


class _Counter:
    """Calls ``progress(done, total, label)`` after each evaluation, when given."""

    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.total, self.done = progress, total, 0

    def step(self, label: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total, label)


def _structured_curves(
    model, input_shape, evaluate, ratios, baseline, importance, include, exclude, round_to, counter_for
) -> list[GroupCurve]:
    """One curve per structured group: a copy per group, pruned ratio after ratio (ratios rise).

    Channels removed at a lower ratio are the lowest-ranked ones and ranks are per channel on unchanged weights,
    so pruning the same copy further gives the same model as pruning a fresh copy to the higher ratio.
    """
    from .structured import StructuredPruner

    def pruner_of(net: nn.Module) -> StructuredPruner:
        return StructuredPruner(
            net, input_shape, importance=importance, scope="layer", include=include, exclude=exclude, round_to=round_to
        )

    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    groups = sorted(pruner_of(copy.deepcopy(model)).groups_info(), key=lambda g: order.get(g["root"], len(order)))
    counter = counter_for(len(groups))
    device = _device(model)
    curves = []
    for info in groups:
        root = info["root"]
        work = copy.deepcopy(model)
        pruner = pruner_of(work)
        curve = GroupCurve(root, list(info["layers"]), int(info["initial"]), list(ratios), [], [], [], [], [])
        for ratio in ratios:
            pruner.prune_ratios({root: ratio})
            _record(curve, evaluate, work, baseline, count_macs(work, input_shape, device), count_params(work))
            counter.step(f"{root} at {ratio:g}")
        curves.append(curve)
    return curves


def _record(curve: GroupCurve, evaluate: Evaluate, model: nn.Module, baseline: float, macs: int, params: int) -> None:
    accuracy, se = _score(evaluate, model)
    curve.accuracy.append(accuracy)
    curve.se.append(se)
    curve.drop.append((baseline - accuracy) * 100.0)
    curve.macs.append(int(macs))
    curve.params.append(int(params))


def _unstructured_curves(model, input_shape, evaluate, ratios, baseline, include, exclude, counter_for):
    """One curve per prunable weight tensor: its smallest weights zeroed on one working copy, then restored."""
    work = copy.deepcopy(model)
    weights = prunable_weights(work, include, exclude)
    if not weights:
        raise ValueError("no prunable weights (Conv/Linear) match prune.include/exclude")
    counter = counter_for(len(weights))
    device = _device(model)
    curves = []
    for name, weight in weights.items():
        original = weight.detach().clone()
        order = original.abs().flatten().argsort(stable=True)
        curve = GroupCurve(name, [name.removesuffix(".weight")], weight.numel(), list(ratios), [], [], [], [], [])
        try:
            for ratio in ratios:
                with torch.no_grad():
                    weight.copy_(original)
                    weight.view(-1)[order[: int(round(ratio * weight.numel()))]] = 0.0
                macs = count_sparse_macs(work, input_shape, device)
                _record(curve, evaluate, work, baseline, macs, count_nonzero(work))
                counter.step(f"{name} at {ratio:g}")
        finally:
            with torch.no_grad():
                weight.copy_(original)
        curves.append(curve)
    return curves


def measure_sensitivity(
    model: nn.Module,
    input_shape,
    evaluate: Evaluate,
    ratios: Iterable[float],
    *,
    method: str = "structured",
    importance: str = "l1",
    include: Iterable[str] = ("*",),
    exclude: Iterable[str] = (),
    round_to: int | None = None,
    progress: Progress | None = None,
) -> Sensitivity:
    """Prune each group of ``model`` alone at each of ``ratios`` and score it with ``evaluate``; see the module.

    ``evaluate(model) -> (accuracy, se)`` scores a model (the caller picks the images and puts it in eval mode);
    ``input_shape`` is one sample's shape, for tracing and counting MACs. ``ratios``: rising shares in (0, 1).
    ``importance``, ``include``, ``exclude`` and ``round_to`` are the pruner's (structured). ``progress(done,
    total, label)`` is called after every evaluation, the baseline's included. ``model`` is left unchanged (its
    copies are pruned). Raises ValueError on a bad ``method`` or ratio, or a model with nothing to prune.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    ratios = check_ratios(ratios)
    include, exclude = list(include), list(exclude)
    input_shape = tuple(int(d) for d in input_shape)
    device = _device(model)
    state: dict = {}

    def counter_for(groups: int) -> _Counter:
        state["counter"] = _Counter(progress, 1 + groups * len(ratios))
        state["counter"].step("unpruned")
        return state["counter"]

    accuracy, se = _score(evaluate, copy.deepcopy(model))
    if method == "structured":
        curves = _structured_curves(
            model, input_shape, evaluate, ratios, accuracy, importance, include, exclude, round_to, counter_for
        )
    else:
        curves = _unstructured_curves(model, input_shape, evaluate, ratios, accuracy, include, exclude, counter_for)
    return Sensitivity(
        method=method,
        importance=importance if method == "structured" else "magnitude",
        ratios=ratios,
        baseline_accuracy=accuracy,
        baseline_se=se,
        baseline_macs=count_macs(model, input_shape, device),
        baseline_params=count_params(model),
        groups=curves,
        round_to=round_to if method == "structured" else None,
    )
