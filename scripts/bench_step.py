"""What the per-step bookkeeping around a small model's training step costs: the optimiser call, clearing the
gradients, and the accuracy tally, each the old way and fit's way, in whole epochs, interleaved.

The setting is ``kdc distill``'s on the MLP recipe: the 784-100-10 MLP, batch 128, fused SGD (lr 0.05,
momentum 0.9, weight decay 1e-4) under a cosine schedule, kdc's in-memory data path and its closed-form KD loss
against a teacher table (random logits: the cost does not depend on them). Each variant trains whole epochs;
they take turns round after round, and each ratio is the median over rounds of the variant's epoch against the
same round's old-way epoch.

* ``old``: ``optimizer.zero_grad(set_to_none=True)``, ``optimizer.step()``, and ``(argmax == y).sum()`` added
  to a running count every batch (kdc before the change);
* ``step``: only the step changed, to :func:`kdcompress.train.step_function` (torch's functional fused SGD
  on the optimiser's own lists);
* ``zero``: only the clearing changed, to ``p.grad = None`` for each parameter;
* ``tally``: only the count changed, to one comparison of the window's predictions every 10 batches;
* ``fit``: all three (what :func:`kdcompress.train.fit` does).

Then the calls alone, in microseconds: ``optimizer.step()`` against the step function, ``zero_grad`` against
setting the gradients to None. It runs in ``kdc``'s training environment: libgomp's ``GOMP_SPINCOUNT`` as
``kdc`` sets it (:data:`kdcompress.cli.TRAIN_SPINCOUNT`) unless ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` is set.
Worker threads that spin that briefly fall asleep during a long enough stretch of Python between two parallel
operations, so bookkeeping between steps costs more than its own time. Run::

    python scripts/bench_step.py                    # full Fashion-MNIST, 6 rounds, 2 threads
    python scripts/bench_step.py --dataset fashion-mnist-mini --rounds 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from kdcompress.cli import TRAIN_SPINCOUNT
from kdcompress.data import load_data
from kdcompress.distill import kd_loss_from_log_probs, teacher_log_probs
from kdcompress.recipe import DataSection, TrainSettings
from kdcompress.train import make_optimizer, make_scheduler, step_function

SETTINGS = TrainSettings(epochs=20, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4, schedule="cosine")
VARIANTS = {"old": (0, 0, 0), "step": (1, 0, 0), "zero": (0, 1, 0), "tally": (0, 0, 1), "fit": (1, 1, 1)}


class Trainer:
    """The student, its optimiser and schedule, the data and the teacher table, shared by every variant."""

    def __init__(self, dataset: str):
        self.train = load_data(DataSection(dataset=dataset), seed=0).train
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(784, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10)
        )
        self.table = teacher_log_probs(torch.randn(len(self.train), 10), 4.0)
        self.optimizer = make_optimizer(self.model, SETTINGS)
        self.scheduler = make_scheduler(self.optimizer, SETTINGS)
        self.step = step_function(self.optimizer)  # after the schedule, as fit makes it
        self.params = list(self.model.parameters())

    def epoch(self, fast_step: bool, fast_zero: bool, fast_tally: bool) -> float:
        """Seconds of one training pass with the chosen bookkeeping."""
        correct = torch.zeros((), dtype=torch.long)
        losses, predicted, labels = [], [], []
        generator = torch.Generator().manual_seed(0)
        started = time.perf_counter()
        for x, y, idx in self.train.batches(128, shuffle=True, generator=generator):
            logits = self.model(x)
            loss = kd_loss_from_log_probs(logits, self.table.index_select(0, idx), y, 4.0, 0.5)
            if fast_zero:
                for p in self.params:
                    p.grad = None
            else:
                self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.step() if fast_step else self.optimizer.step()
            losses.append(loss.detach())
            if fast_tally:
                predicted.append(logits.detach().argmax(1))
                labels.append(y)
            else:
                correct += (logits.detach().argmax(1) == y).sum()
            if len(losses) >= 10:  # fit reads the window back once per 10 batches
                if fast_tally:
                    correct += torch.cat(predicted).eq_(torch.cat(labels)).sum()
                    predicted.clear()
                    labels.clear()
                torch.cat([torch.stack(losses).double(), correct.view(1).double()]).tolist()
                losses.clear()
        self.scheduler.step()
        return time.perf_counter() - started


def call_microseconds(trainer: Trainer, calls: int = 2000) -> dict[str, float]:
    """Median microseconds per call (5 repeats) of the two optimiser calls and the two ways to clear gradients."""
    grads = [p.grad for p in trainer.params]

    def restore():
        for p, g in zip(trainer.params, grads):
            p.grad = g

    def zero_grad():
        trainer.optimizer.zero_grad(set_to_none=True)
        restore()

    def set_none():
        for p in trainer.params:
            p.grad = None
        restore()

    result = {}
    for name, fn in (
        ("optimizer.step()", trainer.optimizer.step),
        ("step_function", trainer.step),
        ("zero_grad + put back", zero_grad),
        ("grad = None + put back", set_none),
    ):
        for _ in range(100):
            fn()
        times = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - started) / calls * 1e6)
        result[name] = statistics.median(times)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:  # libgomp reads it at start
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GOMP_SPINCOUNT": TRAIN_SPINCOUNT})
    torch.set_num_threads(args.threads)
    trainer = Trainer(args.dataset)
    trainer.epoch(True, True, True)  # warm-up, and the momentum buffers exist from here on
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        order = list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]
        for name in order:
            seconds[name].append(trainer.epoch(*map(bool, VARIANTS[name])))
    spin = f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
    print(f"{args.dataset}, {args.threads} threads, {spin}, {args.rounds} rounds; seconds per epoch:")
    for name, values in seconds.items():
        ratios = [old / new for old, new in zip(seconds["old"], values)]
        print(
            f"  {name:6s} median {statistics.median(values):.3f} s  [{min(values):.3f}-{max(values):.3f}]  "
            f"old / this, paired: {statistics.median(ratios):.2f}x"
        )
    print("per call:")
    for name, us in call_microseconds(trainer).items():
        print(f"  {name:24s} {us:6.1f} us")


if __name__ == "__main__":
    main()
