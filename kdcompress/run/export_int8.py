"""The int8 export with ``export.int8_tolerance``: the nodes left in fp32 are chosen on data that is not the
test split, and the artifact row records what was measured.

The search data is the validation split when the recipe holds one out (``data.val_split`` > 0), else a
seeded sample of the training data (the model trained on those images, so both accuracies read high; the
difference between them is what the search uses). At most :data:`SEARCH_SAMPLES` images either way, chosen
by ``run.seed``. The test split is never read here; the export stage scores the file on it afterwards, as it
does every artifact. The search itself is :func:`kdcompress.export.int8_tolerance.search`.
"""

from __future__ import annotations

import time

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from ..export import int8
from ..export.int8_tolerance import search
from ..export.onnx_common import OrtModule, example_batch, export_onnx
from ..train import evaluate

__all__ = ["SEARCH_SAMPLES", "search_data", "encode_within_tolerance", "kept_text"]

SEARCH_SAMPLES = 3000  # images the search scores each candidate on: about 0.05 point per image changed


def search_data(data, seed: int, limit: int = SEARCH_SAMPLES):
    """``(split name, data, what it is)``: up to ``limit`` validation images, or training images when the recipe
    holds out none; a seeded choice (the same images for the same seed), never the test split."""
    if data.val is not None:
        split, pool, what = "val", data.val, "the validation split (data.val_split)"
    else:
        split, pool = "train", data.train
        what = "a seeded sample of the training data (data.val_split is 0; the model trained on these images)"
    if len(pool) > limit:
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed + 21))
        pool = pool.subset(order[:limit].sort().values)
    return split, pool, what


def encode_within_tolerance(model, source: dict, options: dict, calibration: list, data, recipe, console):
    """``(bytes, info, search record)``: the int8 file with the nodes the tolerance search keeps in fp32.

    The record (the artifact row's ``int8_search``): ``tolerance`` (points), ``split`` ("val" or "train"),
    ``split_note``, ``samples``, ``fp32_accuracy`` (the fp32 ONNX model), ``int8_accuracy_before`` (every node
    quantised), ``int8_accuracy`` (the file), ``fitted``, ``kept_fp32`` (each node left in fp32 with ``drop``:
    the points it cost when quantised), ``drops`` (every measured node's), ``evaluations`` and ``seconds``.
    """
    started = time.perf_counter()
    tolerance = float(options["int8_tolerance"])
    split, pool, what = search_data(data, recipe.run.seed)
    proto = export_onnx(model.eval(), example_batch(source, calibration), int8.FORMAT)
    threads = max(1, torch.get_num_threads())

    def accuracy(blob: bytes) -> float:
        with torch.no_grad():
            return evaluate(
                OrtModule(blob, {}, threads=threads), pool, recipe.data.eval_batch_size, torch.device("cpu")
            )["accuracy"]

    console.print(
        f"[bold]export[/]: int8 tolerance {tolerance:g} point(s), measured on {what} ({len(pool):,} images)",
        highlight=False,
    )
    with _SearchProgress(console) as progress:
        result = search(proto, calibration, accuracy, tolerance, progress=progress.update)
    blob, info = int8.encode(model, source, options, calibration, nodes_to_exclude=result.nodes, fp32=proto)
    record = {
        "tolerance": tolerance,
        "split": split,
        "split_note": what,
        "samples": len(pool),
        **{k: v for k, v in result.to_dict().items() if k not in ("tolerance", "excluded")},
        "kept_fp32": [{"node": e.node, "label": e.label, "op": e.op, "drop": e.drop} for e in result.excluded],
        "seconds": time.perf_counter() - started,
    }
    colour = "green" if result.fitted else "yellow"
    console.print(f"[{colour}]export[/]: int8: {kept_text(record)}", highlight=False)
    return blob, info, record


def kept_text(record: dict) -> str:
    """One line for people: what the int8 search kept in fp32 and why, and whether the file fits its tolerance.

    ``"2 nodes kept in fp32 (features.0 Conv: -1.20 points when quantised, ...), tolerance 0.5 point: int8
    90.10% vs fp32 90.40% on val (3,000 images)"``. The record is read as untrusted data (from artifacts.json):
    an entry of the wrong type reads as "?", never an error.
    """
    kept = [k for k in record.get("kept_fp32") or [] if isinstance(k, dict)]
    nodes = ", ".join(f"{str(k.get('label'))[:80]}: {_signed(k.get('drop'))} points when quantised" for k in kept)
    head = f"{len(kept)} node{'' if len(kept) == 1 else 's'} kept in fp32" + (f" ({nodes})" if nodes else "")
    tolerance = _number(record.get("tolerance"))
    fits = "" if record.get("fitted") is True else " NOT met"
    samples = _number(record.get("samples"))
    return (
        f"{head}, tolerance {'?' if tolerance is None else f'{tolerance:g}'} point"
        f"{'' if tolerance == 1 else 's'}{fits}: int8 {_percent(record.get('int8_accuracy'))} vs fp32 "
        f"{_percent(record.get('fp32_accuracy'))} on {str(record.get('split'))[:20]} "
        f"({'?' if samples is None else f'{int(samples):,}'} images)"
    )


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _signed(drop) -> str:
    value = _number(drop)
    return "?" if value is None else f"{-value:+.2f}"


def _percent(value) -> str:
    value = _number(value)
    return "?" if value is None else f"{value:.2%}"


class _SearchProgress:
    """A transient bar on a terminal (each model scored); nothing elsewhere, the lines before and after say it."""

    def __init__(self, console):
        self.console, self.bar, self.task = console, None, None

    def __enter__(self) -> "_SearchProgress":
        if self.console.is_terminal and not self.console.quiet:
            columns = (TextColumn("int8 search: {task.fields[phase]}"), BarColumn(bar_width=16), MofNCompleteColumn())
            self.bar = Progress(*columns, console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("int8", total=None, phase="")
        return self

    def update(self, phase: str, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total, phase=phase)

    def __exit__(self, kind, exc, tb) -> None:
        if self.bar is not None:
            self.bar.stop()
