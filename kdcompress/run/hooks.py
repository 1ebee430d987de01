"""The training hooks a stage hands to :func:`kdcompress.train.fit`: pruning on its schedule, TensorBoard
scalars, the epoch clock DKD's warm-up reads, and the meter of the feature-distillation loss."""

from __future__ import annotations

from pathlib import Path

import torch

from ..progress import tensorboard_writer_class
from ..prune import Schedule
from ..train import Hook

__all__ = ["Pruning", "TensorBoard", "EpochClock", "FeatureMeter"]


class Pruning(Hook):
    """Prunes on its schedule (:func:`kdcompress.prune.plan_schedule`) and keeps masks applied.

    At global batch ``step`` it prunes to ``schedule.due(step)`` when a step
    falls there. Its state (the pruner's, and the steps taken) plus the
    schedule, planned again from the recipe, resume mid-schedule exactly.
    """

    def __init__(self, pruner, schedule: Schedule):
        self.pruner, self.schedule = pruner, schedule
        self.steps_taken = 0

    def on_batch_start(self, step: int, batches_per_epoch: int) -> bool:
        if batches_per_epoch != self.schedule.batches_per_epoch:  # planned with another count: a kdc bug
            raise RuntimeError(
                f"the pruning schedule was planned for {self.schedule.batches_per_epoch} batches per epoch, but "
                f"training has {batches_per_epoch}"
            )
        target = self.schedule.due(step)
        if target is None:
            return False
        self.pruner.prune_to(target)
        self.steps_taken += 1
        return bool(self.pruner.changes_parameters)  # fit rebuilds its optimiser for new parameters

    def after_optimizer_step(self, step: int) -> None:
        self.pruner.apply()

    def state_dict(self) -> dict:
        return {"pruner": self.pruner.state_dict(), "steps_taken": self.steps_taken}

    def load_state_dict(self, state: dict) -> None:
        self.pruner.load_state_dict(state["pruner"])
        self.steps_taken = state["steps_taken"]

    def epoch_metrics(self) -> dict:
        return {"sparsity": self.pruner.sparsity(), "pruning_steps": self.steps_taken}


class TensorBoard(Hook):
    """Writes every epoch's metrics as TensorBoard scalars to ``log_dir`` (``report.tensorboard: true``).

    Tags: ``loss/train``, ``loss/test`` (``loss/val`` with a validation split), ``accuracy/...``, ``lr``,
    ``sparsity`` when pruning, ``seconds``; the step is the epoch. A stage that starts over (from epoch 1)
    first removes the event files an earlier run of it left, so its curves are not drawn twice; a resumed
    one adds to them.
    """

    _SKIP = ("stage", "epoch", "pruning_steps")

    def __init__(self, log_dir: Path):
        self.writer_class = tensorboard_writer_class()  # check_recipe has checked; this names it for fit's users
        self.log_dir = Path(log_dir)
        self.writer = None

    def on_epoch_end(self, record: dict) -> None:
        if self.writer is None:
            if record["epoch"] == 1 and self.log_dir.is_dir():
                for old in self.log_dir.glob("events.out.tfevents.*"):
                    old.unlink()
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.writer = self.writer_class(log_dir=str(self.log_dir))
        for key, value in record.items():
            if key in self._SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            split, _, what = key.partition("_")
            tag = f"{what}/{split}" if what in ("loss", "accuracy") and split in ("train", "val", "test") else key
            self.writer.add_scalar(tag, value, record["epoch"])
        self.writer.flush()  # an interrupted run keeps the epochs it finished

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class EpochClock(Hook):
    """Knows which epoch :func:`fit` is in (from the global step, so it is right after a resume too)."""

    epoch = 0

    def on_batch_start(self, step: int, batches_per_epoch: int) -> None:
        self.epoch = step // max(1, batches_per_epoch)


class FeatureMeter(Hook):
    """Records the mean weighted feature loss of each epoch (``feature_loss`` in metrics.jsonl)."""

    def __init__(self):
        self.total, self.batches = 0.0, 0

    def add(self, value: torch.Tensor) -> None:
        self.total = self.total + value.detach()  # a tensor: no device sync per batch
        self.batches += 1

    def epoch_metrics(self) -> dict:
        mean = float(self.total) / max(1, self.batches)
        self.total, self.batches = 0.0, 0
        return {"feature_loss": mean}
