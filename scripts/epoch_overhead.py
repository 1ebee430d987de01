"""What a training epoch costs besides its training steps, piece by piece, on a real kdc stage.

Runs one stage of a recipe in-process, exactly as ``kdc train-student`` would
(:func:`kdcompress.run.pipeline.run_stage`; the student baseline by default: the
same loop, model, data and per-epoch work as ``kdc distill`` without needing a
teacher), with timers around what :func:`kdcompress.train.fit` does once per
epoch besides the training pass:

* ``evaluate``: the epoch's evaluation on the validation (else test) split
  (the report's learning curve and early-stopping-free checks read it);
* ``save_state``: the resume state (model, optimiser, schedule, RNG, history;
  written to a temporary file, fsynced, renamed into place);
* ``append_jsonl``: the epoch's line in ``metrics.partial.jsonl`` (fsynced);
* ``epoch_line``: the progress display's end of epoch (its line and ETA);
* ``progress``: the progress display during the pass (``begin_epoch``, and
  ``advance`` every 10 batches): part of the training pass, shown apart; with
  ``--terminal`` the console is a terminal, so the live bar is drawn too
  (rich also refreshes it from a thread, ten times a second);
* ``other``: the epoch's wall time minus its training pass and the pieces
  outside it (scheduler step, the metrics record, loop bookkeeping).

An epoch's wall time runs from one ``begin_epoch`` to the next, so the last
epoch is not timed. ``train_seconds`` is ``fit``'s own figure for the
training pass. Means over the stage's epochs but the first (it warms caches
and allocators) and the last (no epoch starts after it): a piece that does not
run every epoch counts at its average.
TensorBoard (``report.tensorboard``, off by default) is not timed: its package
is not installed on this project's machine.

Run::

    python scripts/epoch_overhead.py                                   # full Fashion-MNIST MLP recipe, 6 epochs
    python scripts/epoch_overhead.py --terminal                        # with the live progress bar
    python scripts/epoch_overhead.py --set data.dataset=fashion-mnist-mini --epochs 3   # seconds

Prints a table to stdout and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

import kdcompress.train as train
from kdcompress.progress import RunProgress
from kdcompress.recipe import load_recipe
from kdcompress.run import RUNNING_LOG, checkpoint_path, run_stage

ROOT = Path(__file__).resolve().parent.parent
OUTSIDE = ("evaluate", "save_state", "append_jsonl", "epoch_line")  # after the training pass
PIECES = (*OUTSIDE, "progress")


class Timers:
    """Seconds spent in each wrapped function, per epoch (an epoch starts at ``RunProgress.begin_epoch``)."""

    def __init__(self):
        self.epochs: list[dict[str, float]] = []
        self.starts: list[float] = []

    def add(self, name: str, seconds: float) -> None:
        if self.epochs:
            self.epochs[-1][name] = self.epochs[-1].get(name, 0.0) + seconds

    def wrap(self, owner, name: str, piece: str, starts_epoch: bool = False) -> None:
        real = getattr(owner, name)

        @functools.wraps(real)
        def timed(*args, **kwargs):
            if starts_epoch:
                self.starts.append(time.perf_counter())
                self.epochs.append({})
            started = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.add(piece, time.perf_counter() - started)

        setattr(owner, name, timed)


def measure(recipe_path: str, overrides: list[str], stage: str, terminal: bool) -> dict:
    timers = Timers()
    timers.wrap(train, "evaluate", "evaluate")
    timers.wrap(train, "save_state", "save_state")
    timers.wrap(train, "append_jsonl", "append_jsonl")
    timers.wrap(RunProgress, "begin_epoch", "progress", starts_epoch=True)
    timers.wrap(RunProgress, "advance", "progress")
    timers.wrap(RunProgress, "end_epoch", "epoch_line")
    sink = io.StringIO()
    console = Console(file=sink, force_terminal=terminal, width=120)
    with tempfile.TemporaryDirectory(prefix="kdc-overhead-") as tmp:
        recipe = load_recipe(recipe_path, [*overrides, f"run.out_dir={tmp}"])
        run_stage(recipe, stage, console=console)
        history = [
            json.loads(line)
            for line in (checkpoint_path(recipe.run_dir, stage).parent / "metrics.jsonl").read_text().splitlines()
        ]
        assert not (checkpoint_path(recipe.run_dir, stage).parent / RUNNING_LOG).exists()
    rows = []
    for k, (record, pieces) in enumerate(zip(history, timers.epochs)):
        wall = timers.starts[k + 1] - timers.starts[k] if k + 1 < len(timers.starts) else None
        row = {
            "epoch": record["epoch"],
            "wall": wall,
            "train_seconds": record["train_seconds"],
            **{piece: pieces.get(piece, 0.0) for piece in PIECES},
        }
        if wall is not None:
            row["other"] = wall - row["train_seconds"] - sum(row[piece] for piece in OUTSIDE)
        rows.append(row)
    timed = rows[1:-1]  # the first epoch warms up; the last has no next start
    mean = {key: statistics.fmean(r[key] for r in timed) for key in ("wall", "train_seconds", *PIECES, "other")}
    return {
        "recipe": recipe_path,
        "overrides": overrides,
        "stage": stage,
        "terminal": terminal,
        "dataset": recipe.data.dataset,
        "epochs": len(history),
        "epochs_timed": len(timed),
        "mean_seconds": mean,
        "per_epoch": rows,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("recipe", nargs="?", default=str(ROOT / "recipes" / "fashion-mnist-mlp.yaml"))
    p.add_argument("--stage", default="student", help="stage to run (default: student, the baseline)")
    p.add_argument("--epochs", type=int, default=6, help="epochs of that stage (default 6)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    p.add_argument("--terminal", action="store_true", help="the console is a terminal: live progress bar")
    args = p.parse_args(argv)
    section = (
        "distill" if args.stage in ("student", "distilled") else {"teacher": "teacher", "pruned": "prune"}[args.stage]
    )
    overrides = [f"{section}.epochs={args.epochs}", "run.device=cpu", *args.set]
    result = measure(args.recipe, overrides, args.stage, args.terminal)
    mean = result["mean_seconds"]
    print(
        f"{result['stage']} on {result['dataset']}, {result['epochs']} epochs ({result['epochs_timed']} timed), "
        f"console {'terminal' if args.terminal else 'not a terminal'}; mean seconds per epoch:"
    )
    for key in ("wall", "train_seconds", *PIECES, "other"):
        share = f"{100 * mean[key] / mean['wall']:5.1f} %" if mean["wall"] else ""
        print(f"  {key:14s} {mean[key] * 1000:8.1f} ms  {share}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main(sys.argv[1:])
