"""When to prune, and to which sparsity: one plan, in batches, for ``kdc validate`` and the run.

:func:`plan_schedule` reads a recipe's ``prune`` section and the number of
training batches per epoch and returns a :class:`Schedule`: the global batch
indices (0-based, over all epochs of retraining) at which to prune, and the
sparsity to reach at each. Both ``kdc validate`` (through
:func:`kdcompress.run.checks.check_recipe`) and the pruning stage call it, so a
recipe that validates also runs, and one that cannot reach its target fails
before any training with the reason.

The kinds (``prune.sparsity_schedule``):

* ``iterative``: each step removes ``rate`` of the weights still left, so
  after step k (from 1) the sparsity is ``1 - (1 - rate)^k``, the last step
  trimmed to ``target_sparsity``. :func:`~kdcompress.recipe.pruning_steps_needed`
  steps.
* ``agp`` (Zhu & Gupta 2017, "To prune, or not to prune"):
  ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3`` for
  ``t = t0, t0 + dt, ..., t0 + n dt``, with ``t0`` the first batch,
  ``s_i = initial_sparsity`` (default 0: the step at ``t0`` prunes nothing
  and is left out), ``s_f = target_sparsity``. ``n`` is ``prune.steps``;
  ``auto`` takes as many steps as ``iterative`` would at ``rate``, so
  ``--rate`` sets how gradual pruning is for both. Large steps early, small
  ones late, when fewer weights are left to lose.
* ``one-shot``: one step to the target at the first batch, then fine-tuning.

Spacing (``prune.every``): ``auto`` spaces the steps evenly, a whole number
``d`` of batches apart, with the first at batch 0 and the last within the
first two thirds of retraining, so the last third recovers at the target
(``d = floor(window / slots)``, ``window = ceil(2/3 * batches)``; when there
are more steps than batches in that window they come one per batch). A
number is epochs between steps, rounded to whole batches (at least 1), as
before. A schedule that does not fit in retraining is a
:class:`~kdcompress.errors.ScheduleError` that says what to change.

Example::

    >>> from kdcompress.recipe import PruneSection
    >>> s = plan_schedule(PruneSection(rate=0.5, target_sparsity=0.75, epochs=3), batches_per_epoch=10)
    >>> s.at, s.sparsity
    ((0, 10), (0.5, 0.75))
    >>> s.due(10), s.due(11)
    (0.75, None)
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from ..errors import ScheduleError
from ..recipe import PruneSection, pruning_steps_needed

__all__ = ["Schedule", "plan_schedule", "AUTO_SHARE"]

# Share of retraining that auto-spaced steps fall in; the rest recovers at the target sparsity.
AUTO_SHARE = 2 / 3


@dataclass(frozen=True)
class Schedule:
    """Pruning steps in global batch indices of retraining, with the sparsity to reach at each.

    ``at`` is strictly increasing; ``sparsity`` is non-decreasing and ends at
    the target (both empty for a target of 0). ``batches_per_epoch`` and
    ``batches`` (all of retraining) are what it was planned for.
    """

    kind: str
    at: tuple[int, ...]
    sparsity: tuple[float, ...]
    batches_per_epoch: int = 1
    batches: int = 0

    def __post_init__(self):
        if len(self.at) != len(self.sparsity):
            raise ValueError(f"{len(self.at)} step positions but {len(self.sparsity)} sparsities")
        if any(b <= a for a, b in zip(self.at, self.at[1:])):
            raise ValueError(f"step positions must increase strictly, got {self.at}")
        if any(b < a for a, b in zip(self.sparsity, self.sparsity[1:])):
            raise ValueError(f"sparsities must not decrease, got {self.sparsity}")

    def due(self, step: int) -> float | None:
        """The sparsity to prune to before global batch ``step``, or None when no step falls there."""
        i = bisect.bisect_left(self.at, step)
        return self.sparsity[i] if i < len(self.at) and self.at[i] == step else None

    @property
    def target(self) -> float:
        """The sparsity after the last step (0.0 with no steps)."""
        return self.sparsity[-1] if self.sparsity else 0.0

    def describe(self) -> str:
        """The plan in one line: kind, steps, where they fall (batches and epochs), sparsities, recovery."""
        if not self.at:
            return f"{self.kind}: target sparsity 0, nothing to prune"
        bpe = max(1, self.batches_per_epoch)
        epochs = self.batches / bpe
        left = self.batches - self.at[-1] - 1
        tail = f"; then {left} batch(es) ({_epochs(round(left / bpe, 2))}) at the target"
        if len(self.at) == 1:
            return (
                f"{self.kind}: 1 step at batch {self.at[0]} to sparsity {self.target:g}, of {self.batches} batches "
                f"({_epochs(epochs)} x {bpe}){tail}"
            )
        gaps = sorted({b - a for a, b in zip(self.at, self.at[1:])})
        every = f"every {gaps[0]} batch(es)" if len(gaps) == 1 else f"{gaps[0]}-{gaps[-1]} batches apart"
        return (
            f"{self.kind}: {len(self.at)} steps {every}, batches {self.at[0]}..{self.at[-1]} (epochs "
            f"{self.at[0] / bpe:.3g}..{self.at[-1] / bpe:.3g}) of {self.batches} ({_epochs(epochs)} x {bpe}), "
            f"sparsity {self.sparsity[0]:.3g} -> {self.target:g}{tail}"
        )


def plan_schedule(prune: PruneSection, batches_per_epoch: int) -> Schedule:
    """The pruning steps of ``prune`` over ``prune.epochs`` epochs of ``batches_per_epoch`` batches.

    Raises :class:`~kdcompress.errors.ScheduleError` (one message: which key,
    why, what to change) when the steps do not fit in retraining: not even
    at one step per batch, or not at the spacing ``prune.every`` asks for.
    """
    kind = prune.sparsity_schedule
    bpe = max(0, int(batches_per_epoch))
    batches = prune.epochs * bpe
    target = prune.target_sparsity
    if target <= 0:
        return Schedule(kind, (), (), bpe, batches)
    if kind == "one-shot":
        n = slots = 1
    elif kind == "iterative":
        n = slots = pruning_steps_needed(prune.rate, target)
    else:  # agp: slot 0 is t0, at s_i; steps 1..n follow
        n = pruning_steps_needed(prune.rate, target) if prune.steps == "auto" else int(prune.steps)
        slots = n + 1
    if slots > batches:
        raise ScheduleError(_too_few_batches(prune, n, slots, bpe, batches))
    if kind == "one-shot":
        interval = 1
    elif prune.every == "auto":
        window = math.ceil(AUTO_SHARE * batches)
        interval = max(1, window // slots)
    else:
        interval = max(1, int(round(float(prune.every) * bpe)))
        last = (slots - 1) * interval
        if last >= batches:
            raise ScheduleError(_every_too_wide(prune, n, slots, interval, bpe, batches))
    at = [k * interval for k in range(slots)]
    if kind == "one-shot":
        levels = [target]
    elif kind == "iterative":
        levels = [1.0 - (1.0 - prune.rate) ** (k + 1) for k in range(n - 1)] + [target]
        levels = [min(level, target) for level in levels]
    else:
        s_i, s_f = prune.initial_sparsity, target
        levels = [s_f + (s_i - s_f) * (1.0 - k / n) ** 3 for k in range(n)] + [s_f]
        if levels[0] <= 0.0:  # s_i = 0: the step at t0 would prune nothing
            at, levels = at[1:], levels[1:]
    return Schedule(kind, tuple(at), tuple(levels), bpe, batches)


def _steps_phrase(prune: PruneSection, n: int) -> str:
    if prune.sparsity_schedule == "iterative":
        return f"rate {prune.rate} needs {n} pruning steps to reach target_sparsity {prune.target_sparsity}"
    if prune.sparsity_schedule == "agp":
        source = f"prune.steps {n}" if prune.steps != "auto" else f"steps: auto takes {n} at rate {prune.rate}"
        return f"agp ({source}) needs {n + 1} batches for t0 and its {n} steps"
    return "one-shot pruning needs one batch"


def _retraining(prune: PruneSection, bpe: int, batches: int) -> str:
    return f"{batches} batches of retraining ({_epochs(prune.epochs)} x {bpe} batches per epoch)"


def _epochs(count: float) -> str:
    return f"{count:g} epoch{'' if count == 1 else 's'}"


def _too_few_batches(prune: PruneSection, n: int, slots: int, bpe: int, batches: int) -> str:
    if batches == 0:
        why = "prune.epochs is 0" if prune.epochs == 0 else "the training split gives no batches"
        return (
            f"prune.epochs: too few epochs: {why}, so there is no retraining to prune in; raise prune.epochs "
            f"(or set prune.target_sparsity: 0 to keep the model dense)"
        )
    fixes = {
        "iterative": "raise prune.rate or prune.epochs, or use prune.sparsity_schedule: agp (set its steps) or one-shot",
        "agp": "lower prune.steps (or raise prune.rate for steps: auto), or raise prune.epochs",
        "one-shot": "raise prune.epochs",
    }[prune.sparsity_schedule]
    return (
        f"prune.epochs: too few epochs to reach the target even at one pruning step per batch: "
        f"{_steps_phrase(prune, n)}, but there are only {_retraining(prune, bpe, batches)}; {fixes}"
    )


def _every_too_wide(prune: PruneSection, n: int, slots: int, interval: int, bpe: int, batches: int) -> str:
    need_epochs = math.ceil(((slots - 1) * interval + 1) / bpe)
    widest = (batches - 1) // (slots - 1)  # batches between steps that still fit
    return (
        f"prune.every: too few epochs for steps {prune.every} epoch(s) apart: {_steps_phrase(prune, n)}; "
        f"{prune.every} epoch(s) is {interval} batch(es) at {bpe} batches per epoch, so the last step would come "
        f"at batch {(slots - 1) * interval + 1}, after the {_retraining(prune, bpe, batches)}; set prune.every: "
        f"auto, lower prune.every to {widest / bpe:.3g} or less, or raise prune.epochs to {need_epochs}"
    )
