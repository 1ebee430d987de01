"""What a run shows while it trains: a progress bar per stage, one line per epoch, the time left.

On a terminal each stage gets one live bar (its batches over all its epochs, the running loss and
accuracy, the time left for the stage and for the whole run); the epoch lines print above it and the bar
goes when the stage ends. When the console is not a terminal (stderr sent to a log file, CI) there is no
live display at all, so a log holds no redraws, carriage returns or escape codes: one plain line per
epoch. A quiet console (``kdc ... --quiet``) shows neither.

The time left is said only once it has been measured: after a whole epoch of the stage, or
:data:`ETA_MIN_BATCHES` batches, whichever comes first. The stage's is its batches still to train at its
own rate so far (evaluation and saving included). The run's adds the epochs of the stages still to come
(the plan :func:`kdcompress.run.pipeline.run_pipeline` makes), each at the rate measured for stages that
train the same model; it is refined as batches and epochs finish. While a model still to be trained has
no measured rate (the student, during the teacher stage), the run's time is a lower bound that says so,
``run >2:43 (38 student epochs not timed yet)``, rather than a guess from another model's speed: the
quickstart's CNN teacher trains about 100 times slower per batch than its MLP student.
Example::

    >>> from rich.console import Console
    >>> progress = RunProgress(Console(stderr=True), plan={"teacher": (2, "teacher"), "student": (2, "student")})
    >>> with progress.stage("teacher", epochs=2, first_epoch=0, batches_per_epoch=79):  # doctest: +SKIP
    ...     ...  # fit() calls begin_epoch, advance and end_epoch
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from .errors import MissingPackageError

__all__ = [
    "RunProgress",
    "ETA_MIN_BATCHES",
    "EPOCH_LINE_WIDTH",
    "clock_text",
    "tensorboard_writer_class",
    "TENSORBOARD_MISSING",
]

EPOCH_LINE_WIDTH = 100  # an epoch's line, and its ETA's when they do not fit on one, fit a 100-column terminal
ETA_MIN_BATCHES = 50  # batches of a stage that give a rate worth quoting, when an epoch is longer than that

TENSORBOARD_MISSING = (
    "report.tensorboard is true, but tensorboard is not installed; install it with `pip install tensorboard`, "
    "or set report.tensorboard: false (--set report.tensorboard=false)"
)


def tensorboard_writer_class():
    """torch's ``SummaryWriter``; :class:`MissingPackageError` (exit 2) with what to do when tensorboard is absent."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MissingPackageError(TENSORBOARD_MISSING) from None
    return SummaryWriter


def clock_text(seconds: float) -> str:
    """``m:ss`` under an hour, ``h:mm:ss`` from there: ``clock_text(65) == '1:05'``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass
class _Stage:
    """The stage being trained: what it has to do and what it has done since it (re)started."""

    name: str
    epochs: int
    first_epoch: int  # epochs done before this process started it (a resumed stage)
    batches_per_epoch: int
    group: str
    started: float
    epoch: int = 0  # the epoch in progress, 0-based
    batches: int = 0  # batches trained since it started, in finished epochs plus the one in progress
    epoch_base: int = 0  # ``batches`` when the epoch in progress began

    @property
    def to_train(self) -> int:
        return (self.epochs - self.first_epoch) * self.batches_per_epoch


class RunProgress:
    """The training-time terminal output of one run (or one stage): bars, epoch lines and ETAs.

    ``plan`` is ``{stage: (epochs still to train, model it trains)}`` in run order; a stage not in it
    counts only itself. ``clock`` and ``min_batches`` are there for tests.
    """

    def __init__(
        self,
        console: Console,
        plan: dict[str, tuple[int, str]] | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
        min_batches: int = ETA_MIN_BATCHES,
    ):
        self.console = console
        self.plan = dict(plan or {})
        self.clock = clock
        self.min_batches = max(1, int(min_batches))
        # a live display only where someone watches it: a redraw per refresh would flood a log file
        self.live = console.is_terminal and not console.quiet
        self._finished: set[str] = set()
        self._measured: dict[str, list[float]] = {}  # model group -> [batches, seconds] of finished stages
        self._stage: _Stage | None = None
        self._bar: Progress | None = None
        self._task = None

    @contextlib.contextmanager
    def stage(self, name: str, epochs: int, first_epoch: int, batches_per_epoch: int):
        """Show the training of stage ``name`` (``epochs`` in all, from ``first_epoch``) while the block runs."""
        group = self.plan.get(name, (0, name))[1]
        names = list(self.plan)
        if name in names:  # the stages planned before this one are over, trained or skipped
            self._finished.update(names[: names.index(name)])
        self._stage = _Stage(
            name, epochs, first_epoch, max(1, batches_per_epoch), group, self.clock(), epoch=first_epoch
        )
        if self.live and epochs > first_epoch:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(bar_width=16),  # with the rest, fits 80 columns
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TextColumn("{task.fields[eta]}"),
                console=self.console,
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self._description(), total=self._stage.to_train, status="", eta="")
        try:
            yield self
        finally:
            if self._bar is not None:
                self._bar.stop()
            self._bar = self._task = None
            stage, self._stage = self._stage, None
            self._finished.add(name)
            if stage.batches:
                seen = self._measured.setdefault(stage.group, [0.0, 0.0])
                seen[0] += stage.batches
                seen[1] += self.clock() - stage.started

    def _description(self) -> str:
        s = self._stage
        return f"{s.name} {min(s.epoch + 1, s.epochs)}/{s.epochs}"

    def begin_epoch(self, epoch: int) -> None:
        """Epoch ``epoch`` (0-based) of the stage starts."""
        s = self._stage
        s.epoch, s.epoch_base = epoch, s.batches
        self._refresh()

    def advance(self, batches_in_epoch: int, status: str = "") -> None:
        """``batches_in_epoch`` batches of the current epoch are done; ``status``: the running loss and accuracy."""
        s = self._stage
        s.batches = s.epoch_base + batches_in_epoch
        self._refresh(status)

    def _refresh(self, status: str | None = None) -> None:
        if self._bar is None:
            return
        stage_left, run_left = self.eta()
        fields = {"eta": self._eta_text(stage_left, run_left, bar=True)}
        if status is not None:
            fields["status"] = status
        self._bar.update(self._task, completed=self._stage.batches, description=self._description(), **fields)

    def end_epoch(self, record: dict, eval_name: str = "test") -> None:
        """The epoch of ``record`` (fit's metrics: losses, accuracies, lr, seconds, sparsity) ended: print its line."""
        s = self._stage
        s.batches = s.epoch_base + s.batches_per_epoch
        s.epoch = record["epoch"]
        fields = [
            f"{s.name} epoch {record['epoch']}/{s.epochs}",
            f"loss {record['train_loss']:.4f}",
            f"train acc {record['train_accuracy']:.4f}",
            f"{eval_name} acc {record[f'{eval_name}_accuracy']:.4f}",
            f"lr {record['lr']:.3g}",
            *([f"sparsity {record['sparsity']:.3f}"] if "sparsity" in record else []),
            f"{record['seconds']:.1f} s",
        ]
        line = "  ".join(fields)
        if len(line) > EPOCH_LINE_WIDTH:  # many epochs, a large loss, a long time: single spaces, then no "epoch"
            line = " ".join(fields)
            if len(line) > EPOCH_LINE_WIDTH:
                line = " ".join([f"{s.name} {record['epoch']}/{s.epochs}", *fields[1:]])
        eta = self._eta_text(*self.eta())
        if eta and len(line) + 2 + len(eta) <= EPOCH_LINE_WIDTH:
            line, eta = f"{line}  {eta}", ""
        # soft_wrap: one epoch, one line (and its ETA on the next when both do not fit), whatever the console's width
        for text in (line, f"  {eta}" if eta else None):
            if text:
                self.console.print(text, soft_wrap=True, markup=False, highlight=False)
        self._refresh()

    def eta(self) -> tuple[float | None, float | None]:
        """Seconds left for the current stage and for the run; None until a rate has been measured.

        The run's covers the stages to come whose model has a measured rate; the epochs of the others are
        in :meth:`untimed` (the teacher's rate says little about the student's: 100 times slower in the
        quickstart), so the run's time is then a lower bound.
        """
        s = self._stage
        if s is None:
            return None, None
        elapsed = self.clock() - s.started
        if s.batches < min(s.batches_per_epoch, self.min_batches) or s.batches <= 0 or elapsed <= 0:
            return None, None
        stage_left = max(0, s.to_train - s.batches) * elapsed / s.batches
        later = 0.0
        for epochs, group in self._later():
            batches, seconds = self._rate_of(group, elapsed)
            if batches:
                later += epochs * s.batches_per_epoch * seconds / batches
        return stage_left, stage_left + later

    def untimed(self) -> dict[str, int]:
        """``{model: epochs}`` of the stages to come that train a model no rate has been measured for yet."""
        left: dict[str, int] = {}
        elapsed = self.clock() - self._stage.started if self._stage else 0.0
        for epochs, group in self._later():
            if not self._rate_of(group, elapsed)[0]:
                left[group] = left.get(group, 0) + epochs
        return left

    def _later(self) -> list[tuple[int, str]]:
        """``(epochs, model)`` of the planned stages after the current one that have epochs to train."""
        current = self._stage.name if self._stage else None
        return [
            (epochs, group)
            for name, (epochs, group) in self.plan.items()
            if name != current and name not in self._finished and epochs > 0
        ]

    def _rate_of(self, group: str, elapsed: float) -> tuple[float, float]:
        """(batches, seconds) measured for ``group``: its finished stages', plus the current one if it trains it."""
        batches, seconds = self._measured.get(group, [0.0, 0.0])
        if self._stage is not None and group == self._stage.group:
            batches, seconds = batches + self._stage.batches, seconds + elapsed
        return (batches, seconds) if batches and seconds > 0 else (0.0, 0.0)

    def _eta_text(self, stage_left: float | None, run_left: float | None, bar: bool = False) -> str:
        """``ETA stage 0:12, run 1:05``: each part while something is left of it; empty before a rate is known.

        With stages to come whose speed is not known yet: ``run >0:12 (38 student epochs not timed yet)``
        (on the bar: ``run >0:12``).
        """
        if stage_left is None:
            return ""
        parts = [f"{'' if bar else 'stage '}{clock_text(stage_left)}"] if stage_left > 0 or bar else []
        untimed = self.untimed()
        if untimed:
            what = ", ".join(f"{epochs} {group} epoch{'s' if epochs != 1 else ''}" for group, epochs in untimed.items())
            if run_left >= 1:
                parts.append(f"run >{clock_text(run_left)}" + ("" if bar else f" ({what} not timed yet)"))
            else:
                parts.append("run ?" if bar else f"run: {what} not timed yet")
        elif run_left is not None and run_left > stage_left:  # stages to come after this one
            parts.append(f"run {clock_text(run_left)}")
        return f"ETA {', '.join(parts)}" if parts else ""
