"""Checkpoints that describe themselves, written atomically and loaded safely.

A checkpoint is a plain dict of tensors and plain data::

    {"format": "kdc-checkpoint", "format_version": 1, "kdc_version": str,
     "stage": str, "arch": {model spec}, "state_dict": {name: tensor},
     "fingerprint": str, "recipe": {resolved recipe}, "metrics": {...}}

It is loaded with ``torch.load(..., weights_only=True)``, so a file can hold
no code that runs on load. A pruned checkpoint is a dense state_dict with
zeros: it loads into the plain architecture.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

__all__ = ["save_checkpoint", "load_checkpoint", "atomic_write_bytes", "atomic_write_text", "FORMAT", "FORMAT_VERSION"]

FORMAT = "kdc-checkpoint"
FORMAT_VERSION = 1


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, flush, then rename into place."""
    _atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomically save a checkpoint dict (see the module docstring for its keys)."""
    from . import __version__

    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "kdc_version": __version__, **payload}
    _atomic_write(path, lambda fh: torch.save(payload, fh))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a kdc checkpoint with ``weights_only=True``; raise CheckpointError with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} was refused: it holds more than tensors and plain data, so loading it could run code "
            f"({str(exc).splitlines()[0][:200]}). Only load checkpoints kdc wrote; delete this file and rerun the stage"
        ) from None
    except Exception as exc:  # truncated zip, bad magic, ...
        raise CheckpointError(
            f"{path} is damaged or not a checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
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
    return data


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line and flush it to disk."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
