"""Checkpoints that describe themselves, written atomically and loaded safely.

A checkpoint is a plain dict of tensors and plain data::

    {"format": "kdc-checkpoint", "format_version": 1, "kdc_version": str,
     "stage": str, "arch": {model spec}, "state_dict": {name: tensor},
     "fingerprint": str, "recipe": {resolved recipe}, "metrics": {...},
     "dataset": str, "preprocess": {...}, "inputs": {...}}

``inputs`` holds the stage inputs its fingerprint was made from (a supplied
teacher's file hash among them), so a rerun can say what changed.

``preprocess`` says how to feed the model (made by
:func:`kdcompress.data.preprocess_info`; :func:`kdcompress.load_model`
turns it into a callable). Its keys:

``version``      1
``dataset``      the recipe's ``data.dataset``
``known``        False for a user's own dataset: its inputs are whatever it
                 yields, through a transform kdc does not know, and the keys
                 from ``layout`` to ``std`` are None
``input_shape``  [C, H, W] of one input; the model takes a batch (N, C, H, W)
``layout``       "NCHW": batch, channels, height, width
``channels``     channel order as a PIL mode: "L" (grey) or "RGB"
``dtype``        "uint8": the raw images hold 0-255 values
``scale``        1/255, applied first (0-255 -> 0-1)
``mean``, ``std`` per-channel lists: the model's input is (x * scale - mean) / std
``classes``      class names in label order, or None when the dataset has none
``normalize``    an image folder only: how mean and std were chosen (measured,
                 imagenet, none, given)
``resize``       an image folder only: {"size": [H, W], "method": ...} or None
``channels_why`` an image folder only: why it has the channels it has

Checkpoints written before ``preprocess`` existed lack the key;
``load_model`` rebuilds it from ``dataset`` for the built-in sets and imagefolder.

It is loaded with ``torch.load(..., weights_only=True)``, so a file can hold
no code that runs on load. An unstructured pruned checkpoint is a dense
state_dict with zeros: it loads into the plain architecture. A structured
one also holds ``structure``: the pruning history (plain lists of layer
names and channel indices, see :meth:`kdcompress.prune.structured.StructuredPruner.history`)
that, replayed on the plain architecture, gives it the smaller shapes of its
weights; :func:`kdcompress.models.build_from_checkpoint` does both.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .bounds import first_oversized, value_children, value_size
from .errors import CheckpointError, describe
from .files import atomic_write, atomic_write_many, manifest_path, sha256_file, write_error

__all__ = [
    "save_checkpoint",
    "save_state",
    "load_checkpoint",
    "verify_checkpoint",
    "read_manifest",
    "refuse_oversized",
    "FORMAT",
    "FORMAT_VERSION",
]

FORMAT = "kdc-checkpoint"
FORMAT_VERSION = 1
# Plain values a checkpoint may hold once its shared parts are written out (tensors count 1 each). A real one
# holds far fewer (a 1,000-class confusion matrix is 1M); pickle's memo lets a 3 KB file name billions.
MAX_CHECKPOINT_VALUES = 20_000_000
MAX_RECIPE_VALUES = 1_000_000  # in each of its recipe-like parts, which reports write out as YAML and JSON


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomically save a checkpoint dict (see the module docstring for its keys), then its manifest.

    The manifest (``<file>.manifest.json``) records the file's size and
    SHA-256, so a truncated or altered checkpoint is found before it is used.
    """
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "kdc_version": __version__, **payload}
    buffer = io.BytesIO()
    try:
        torch.save(payload, buffer)
    except (OSError, RuntimeError) as exc:
        raise write_error(path, exc) from None
    blob = buffer.getvalue()
    manifest = {
        "file": Path(path).name,
        "bytes": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "stage": payload.get("stage"),
        "fingerprint": payload.get("fingerprint"),
        "fingerprint_version": payload.get("fingerprint_version"),
    }
    text = (json.dumps(manifest) + "\n").encode()
    # both files are fully on disk before either is renamed into place
    atomic_write_many([(Path(path), lambda fh: fh.write(blob)), (manifest_path(path), lambda fh: fh.write(text))])


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Atomically save a resume state (tensors and plain data)."""
    atomic_write(path, lambda fh: torch.save(state, fh))


def read_manifest(path: Path) -> dict:
    """The manifest of a checkpoint, after a cheap size check; raise CheckpointError if either is damaged."""
    path = Path(path)
    mpath = manifest_path(path)
    try:
        manifest = json.loads(mpath.read_text())
        expected_bytes = int(manifest["bytes"])
        str(manifest["sha256"])
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} has no manifest ({mpath.name}): it was not completely written by kdc; delete it, or rerun the "
            f"stage with --force"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, OverflowError, RecursionError):  # inf, deep nesting
        raise CheckpointError(
            f"the manifest {mpath} is damaged; delete it and {path.name}, or rerun with --force"
        ) from None
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint not found: {path} (its manifest {mpath.name} is there); rerun the stage with --force to "
            f"rebuild it"
        )
    size = path.stat().st_size
    if size != expected_bytes:
        raise CheckpointError(
            f"{path} is damaged: {size} bytes on disk, {expected_bytes} written (truncated?); rerun the stage with "
            f"--force to rebuild it"
        )
    return manifest


def verify_checkpoint(path: Path) -> None:
    """Check a checkpoint's size and SHA-256 against its manifest; raise CheckpointError if it is damaged."""
    manifest = read_manifest(path)
    if sha256_file(path) != manifest["sha256"]:
        raise CheckpointError(
            f"{path} is damaged: its SHA-256 differs from the one recorded when it was written; rerun the stage "
            f"with --force to rebuild it"
        )


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", verify: bool = True) -> dict[str, Any]:
    """Load a kdc checkpoint with ``weights_only=True``; raise CheckpointError with a clear message.

    With ``verify`` the file is first checked against its manifest.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if verify:
        verify_checkpoint(path)
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} was refused: it holds more than tensors and plain data, so loading it could run code "
            f"({describe(exc)}). Only load checkpoints kdc wrote; delete this file and rerun the stage"
        ) from None
    except Exception as exc:  # truncated zip, bad magic, ...
        raise CheckpointError(
            f"{path} is damaged or not a checkpoint ({type(exc).__name__}: {describe(exc)}); "
            f"delete it and rerun the stage"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a kdc checkpoint; delete it and rerun the stage")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by kdc {data.get('kdc_version', '?')} in checkpoint format "
            f"{data.get('format_version')!r}; this kdc reads format {FORMAT_VERSION}. Rerun the stage, or use the "
            f"kdc version that wrote it"
        )
    refuse_oversized(data, str(path), "delete it and rerun the stage")
    problem = _entries_problem(data)
    if problem:
        raise CheckpointError(f"{path} is damaged: {problem}; delete it and rerun the stage")
    return data


def refuse_oversized(data: Any, where: str, fix: str) -> None:
    """CheckpointError naming the part of ``data`` (loaded from ``where``) that is too big once written out.

    ``weights_only`` runs no code, but pickle's memo lets a few kilobytes name one list billions of
    times, and whoever compares, copies or writes the value out pays for every one. Checkpoints, resume
    states and caches all pass through here before anything walks them. ``fix`` ends the message.
    """
    parts = [((), data, MAX_CHECKPOINT_VALUES)]
    if isinstance(data, dict):
        parts += [
            ((key,), data[key], MAX_RECIPE_VALUES) for key in ("recipe", "inputs", "arch", "preprocess") if key in data
        ]
    for prefix, part, limit in parts:
        found = first_oversized(part, value_children, value_size, limit)
        if found is not None:
            inner, _, _, cyclic = found
            at = ".".join(map(str, prefix + inner)) or "its top level"
            what = "contains itself" if cyclic else f"holds more than {limit:,} values once written out"
            raise CheckpointError(f"{where} was refused: {at} {what}, which no file kdc writes does; {fix}")


# the entries of a stage checkpoint that kdc reads, by type; None stands for an entry older checkpoints lack
_ENTRY_TYPES = {
    "stage": str,
    "arch": dict,
    "state_dict": dict,
    "metrics": dict,
    "fingerprint": str,
    "recipe": dict,
    "inputs": dict,
    "history": list,
    "dataset": str,
    "preprocess": dict,
    "structure": list,
}
_REQUIRED_ENTRIES = ("arch", "state_dict", "metrics")
# the metrics kdc writes and reads back as numbers (absent or None in older checkpoints), and as text
_NUMBER_METRICS = (
    "test_accuracy",
    "test_loss",
    "test_samples",
    "seconds",
    "epochs",
    "params",
    "nonzero_params",
    "sparsity",
    "channel_sparsity",
    "target_sparsity",
    "pruning_steps",
    "bn_recalibrate_batches",
)
_TEXT_METRICS = ("train_device", "supplied_from", "supplied_format", "pretrained_from")


def _entries_problem(data: dict) -> str | None:
    """What makes a loaded checkpoint's entries other than kdc writes them, or None.

    The file is data from a run directory: a changed key or type must be refused here, with the file named,
    rather than fail wherever the entry is first used.
    """
    for key, kind in _ENTRY_TYPES.items():
        value = data.get(key)
        if value is None and key not in _REQUIRED_ENTRIES:
            continue
        if not isinstance(value, kind):
            return f"its '{key}' entry is {'missing' if value is None else f'a {type(value).__name__}, not a {kind.__name__}'}"
    metrics = data["metrics"]
    accuracy = metrics.get("test_accuracy")
    if not isinstance(accuracy, (int, float)) or isinstance(accuracy, bool):
        return "its metrics have no test accuracy"
    for key in _NUMBER_METRICS:
        value = metrics.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            return f"its metric '{key}' is a {type(value).__name__}, not a number"
    for key in _TEXT_METRICS:
        if metrics.get(key) is not None and not isinstance(metrics[key], str):
            return f"its metric '{key}' is a {type(metrics[key]).__name__}, not text"
    confusion = metrics.get("confusion")
    if confusion is not None and not (
        isinstance(confusion, list)
        and all(isinstance(row, list) and len(row) == len(confusion) for row in confusion)
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for row in confusion for n in row)
    ):
        return "its confusion matrix is not a square table of counts"
    return None
