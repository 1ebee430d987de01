"""Int8 that keeps its accuracy: find the nodes to leave in fp32 so that the int8 model loses at most
``tolerance`` accuracy points against its fp32 ONNX model.

The search (:func:`search`) quantises every node first. If that loses more than the tolerance, it measures
each quantisable node's **leave-one-out** effect: everything quantised except that node, scored by the
caller's ``evaluate``. Each node's effect is the accuracy that leaving it in fp32 gives back, that is the
points it costs when quantised among all the others. Then it excludes nodes in that order, most damaging
first, re-measuring the whole model after each, until the loss fits or nothing is left to exclude. An
exclusion that lowers the re-measured accuracy is undone. Then each excluded node is quantised again, the
last excluded first, and stays quantised when the model still fits (or, when it does not fit, when that
costs no accuracy): a node in fp32 costs size and speed, and one that gives nothing back (it only looked
useful beside the others) is not worth them.

Why leave-one-out and not "quantise each node alone": the greedy search asks "which exclusion helps the
fully quantised model most", and leave-one-out measures exactly that, with every other node quantised
around it as it will be, so the errors a node's rounding adds to the rounding of the ops after it are
counted. Quantising a node alone measures its error on a clean fp32 graph, which underrates nodes that are
harmless alone but damaging behind other quantised ones. Both cost one quantisation and one evaluation per
node; the greedy part adds one per node it tries and one per exclusion it takes back (it re-measures the
model, not every node again): at most three times the number of nodes, plus two (the fp32 model and the
fully quantised one).

The search never excludes the last quantised weight node (Conv, Gemm or MatMul with a weight): a file
with none would not be int8 at all. When the loss still does not fit, ``fitted`` is false and the
exclusions made are returned; the caller decides what to write.

Example::

    >>> result = search(fp32_proto, calibration, evaluate, tolerance=0.5)  # doctest: +SKIP
    >>> result.fitted, [e.label for e in result.excluded]  # doctest: +SKIP
    (True, ['features.0 Conv'])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

from . import int8

__all__ = ["Exclusion", "ToleranceResult", "search", "EPSILON"]

EPSILON = 1e-9  # points: a loss this close to the tolerance fits (float sums of accuracies)


@dataclass(frozen=True)
class Exclusion:
    """A node left in fp32: its name in the graph, a label for people, its op type and ``drop``: accuracy
    points the model loses when this node is quantised with all the others (measured leave-one-out)."""

    node: str
    label: str
    op: str
    drop: float


@dataclass(frozen=True)
class ToleranceResult:
    """What :func:`search` found. Accuracies are shares (0-1) on the caller's search data; drops are points.

    ``int8_accuracy_before``: everything quantised; ``int8_accuracy``: with ``excluded`` left in fp32.
    ``drops``: every measured node's leave-one-out drop ``{label: points}`` (empty when no search was needed).
    ``evaluations``: how many models were scored (the fp32 one included).
    """

    tolerance: float
    fp32_accuracy: float
    int8_accuracy_before: float
    int8_accuracy: float
    excluded: list[Exclusion]
    fitted: bool
    drops: dict[str, float] = field(default_factory=dict)
    evaluations: int = 0

    @property
    def nodes(self) -> list[str]:
        """The graph names of the excluded nodes, for ``nodes_to_exclude``."""
        return [e.node for e in self.excluded]

    def to_dict(self) -> dict:
        """Plain JSON data (for artifacts.json)."""
        out = asdict(self)
        out["excluded"] = [asdict(e) for e in self.excluded]
        return out


def _points(fp32: float, int8_accuracy: float) -> float:
    return (fp32 - int8_accuracy) * 100.0


def search(
    proto,
    calibration: list,
    evaluate: Callable[[bytes], float],
    tolerance: float,
    progress: Callable[[str, int, int], None] | None = None,
) -> ToleranceResult:
    """The nodes of fp32 ``proto`` to keep in fp32 so int8 loses at most ``tolerance`` points (see the module).

    ``calibration``: the batches :func:`kdcompress.export.int8.quantize` calibrates on (the same the file is
    made with). ``evaluate(model bytes) -> accuracy`` (0-1) scores an ONNX model on the search data, which
    must not be the test split. ``progress(phase, done, total)`` is told of each evaluation: "sensitivity"
    once per node, then "exclude" and "re-quantise" once per node tried.
    """
    state = _Search(proto, calibration, evaluate, tolerance, progress)
    done = dict(tolerance=float(tolerance), fp32_accuracy=state.fp32, int8_accuracy_before=state.before)
    if state.fits(state.before):
        return ToleranceResult(**done, int8_accuracy=state.before, excluded=[], fitted=True, evaluations=2)
    drops = state.sensitivities()
    order = sorted(state.candidates, key=lambda n: (-drops[n], state.candidates.index(n)))  # ties: graph order
    excluded, accuracy = state.exclude(order)
    excluded, accuracy = state.requantise(excluded, accuracy)
    labels, ops = state.labels, state.ops
    return ToleranceResult(
        **done,
        int8_accuracy=accuracy,
        excluded=[Exclusion(n, labels[n], ops[n], round(drops[n], 4)) for n in excluded],
        fitted=state.fits(accuracy),
        drops={labels[n]: round(d, 4) for n, d in drops.items()},
        evaluations=state.evaluations,
    )


class _Search:
    """The graph, its quantisable nodes and the scoring that :func:`search` steps through."""

    def __init__(self, proto, calibration, evaluate, tolerance, progress):
        self.calibration, self.evaluate, self.tolerance = calibration, evaluate, float(tolerance)
        self.tell = progress or (lambda phase, done, total: None)
        self.pre = int8.preprocess(proto)
        self.labels, self.ops = int8.node_labels(self.pre), {n.name: n.op_type for n in self.pre.graph.node}
        self.candidates = int8.quantisable_nodes(self.pre)
        initialisers = {t.name for t in self.pre.graph.initializer}
        self.weights = {
            n.name
            for n in self.pre.graph.node
            if n.name in self.candidates
            and n.op_type in int8.WEIGHT_OPS
            and any(i in initialisers for i in n.input[1:])
        }
        self.fp32 = float(evaluate(proto.SerializeToString()))
        self.evaluations = 1
        self.before = self.score([])

    def score(self, excluded) -> float:
        """The accuracy with the nodes ``excluded`` in fp32 and every other quantised."""
        quantised = int8.quantize(self.pre, self.calibration, nodes_to_exclude=list(excluded), preprocessed=True)
        self.evaluations += 1
        return float(self.evaluate(quantised.SerializeToString()))

    def fits(self, accuracy: float) -> bool:
        return _points(self.fp32, accuracy) <= self.tolerance + EPSILON

    def sensitivities(self) -> dict[str, float]:
        """``{node: points}``: what leaving each node alone in fp32 gives back to the fully quantised model."""
        drops = {}
        for i, node in enumerate(self.candidates):
            self.tell("sensitivity", i, len(self.candidates))
            drops[node] = _points(self.score([node]), self.before)
        return drops

    def exclude(self, order: list[str]) -> tuple[list[str], float]:
        """Exclude nodes in ``order`` until the loss fits: ``(excluded nodes, accuracy)``.

        A node whose exclusion lowers the accuracy is quantised again; one that leaves it equal stays in fp32
        for now, since a chain of nodes may only help together (:meth:`requantise` takes back the useless ones).
        """
        excluded, accuracy = [], self.before
        for step, node in enumerate(order):
            if self.fits(accuracy):
                break
            if node in self.weights and self.weights <= {*excluded, node}:
                continue  # the last int8 weight node stays: without one the file would not be int8
            self.tell("exclude", step, len(order))
            after = self.score([*excluded, node])
            if after >= accuracy:
                excluded.append(node)
                accuracy = after
        return excluded, accuracy

    def requantise(self, excluded: list[str], accuracy: float) -> tuple[list[str], float]:
        """Quantise again each excluded node the model does without, the last excluded first: one it still fits
        without, or, when it does not fit, one whose quantisation costs no accuracy."""
        kept, fitted = list(excluded), self.fits(accuracy)
        for step, node in enumerate(reversed(excluded)):
            self.tell("re-quantise", step, len(excluded))
            others = [n for n in kept if n != node]
            after = self.score(others)
            if self.fits(after) if fitted else after >= accuracy:
                kept, accuracy = others, after
        return kept, accuracy
