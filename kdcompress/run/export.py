"""The export stage: each artifact the recipe's ``export`` section asks for, written from the stage it names
with the codecs of :mod:`kdcompress.export`, loaded back the way a user deploys it, evaluated on the test
split and recorded in ``<run dir>/export/artifacts.json``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console

from .. import __version__
from ..checkpoint import load_checkpoint, read_manifest
from ..data import load_data
from ..errors import ArtifactError, KdcError, RecipeError, StageOrderError, UsageError
from ..export import FORMATS, artifact_name, codec, format_options, load_artifact, verify_artifact, write_artifact
from ..files import atomic_write_text
from ..models import build_from_checkpoint
from ..recipe import recipe_from_dict, recipe_to_dict
from ..train import evaluate, seed_everything
from .export_int8 import encode_within_tolerance
from .layout import EXPORT_DIR, MODEL_FILE, artifacts_path, checkpoint_path, export_dir
from .lock import run_dir_lock
from .marker import write_resolved_recipe
from .stages import COMMAND_OF, stage_named
from .state import Origin, stage_status

__all__ = ["EXPORT_WAIT_ADVICE", "export_stage", "read_artifacts", "size_change"]


_NUMBER = (int, float)


# the types of the row entries kdc writes and reads back (None allowed for each but path, stage and format)
_ROW_TYPES = {
    "path": str,
    "stage": str,
    "format": str,
    "accuracy": _NUMBER,
    "test_loss": _NUMBER,
    "test_samples": int,
    "stage_accuracy": _NUMBER,
    "accuracy_change_vs_stage": _NUMBER,
    "stage_checkpoint_bytes": int,
    "bytes": int,
    "options": dict,
    "info": dict,
    "source_fingerprint": str,
    "sha256": str,
    "int8_search": dict,
}


_REQUIRED = ("path", "stage", "format")


def _row_ok(row) -> bool:
    if not isinstance(row, dict) or not all(isinstance(row.get(key), str) for key in _REQUIRED):
        return False
    return all(
        row.get(key) is None or (isinstance(row[key], types) and not isinstance(row[key], bool))
        for key, types in _ROW_TYPES.items()
    )


def read_artifacts(run_dir: str | Path) -> list[dict]:
    """The rows of ``<run dir>/export/artifacts.json`` (empty when nothing was exported).

    ArtifactError when the file is damaged, a row included (an entry of the wrong type). A row's ``path`` is
    the file's path as written; confine it to the run directory before opening it
    (:func:`kdcompress.checkpoint.confined_path`).
    """
    path = artifacts_path(run_dir)
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text())["artifacts"]
        if not isinstance(rows, list) or not all(_row_ok(r) for r in rows):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise ArtifactError(f"{path} is damaged; delete it and export again (kdc export RUN_DIR --force)") from None
    return rows


def _write_artifacts(run_dir: Path, rows: list[dict]) -> None:
    rows = sorted(
        rows,
        key=lambda r: (r.get("stage", ""), FORMATS.index(r["format"]) if r.get("format") in FORMATS else 9, r["path"]),
    )
    atomic_write_text(artifacts_path(run_dir), json.dumps({"artifacts": rows}, indent=2) + "\n")


def _calibration_batches(data, batch_size: int, count: int, seed: int) -> list:
    """``count`` shuffled training batches (preprocessed, as the model takes them), the same for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for x, _, _ in data.train.batches(batch_size, shuffle=True, generator=generator):
        out.append(x.float())
        if len(out) >= count:
            break
    return out


def _source(recipe, stage: str, origin: Origin):
    """The checkpoint of ``stage`` (up to date with the recipe), the checkpoint itself and its fingerprint."""
    status = stage_status(recipe, stage)
    if not status.done:
        hint = origin.hint()
        raise StageOrderError(
            f"cannot export the '{stage}' stage: {status.reason}; run `{COMMAND_OF[stage]} {hint}` (or `kdc run "
            f"{hint}`) first, or export another stage with --stage"
        )
    path = checkpoint_path(recipe.run_dir, stage)
    return path, load_checkpoint(path), read_manifest(path)["fingerprint"]


# a live run's stage is unfinished: the export waits for it rather than reporting it interrupted
EXPORT_WAIT_ADVICE = "wait for it to finish, then export"


def export_stage(
    recipe, formats: list[str] | None = None, force: bool = False, console=None, origin: Origin = Origin()
) -> list[dict]:
    """Write, load back and evaluate each artifact of ``recipe.export.stage``; return their rows.

    ``formats`` defaults to ``recipe.export.formats``. An artifact whose file still matches its
    manifest and was made from the current checkpoint with the same settings is kept (``force``
    writes it again). Each row (also in ``export/artifacts.json``): ``stage``, ``format``, ``path``
    (relative to the run directory), ``bytes``, ``accuracy`` measured from the loaded artifact on the
    test split, ``stage_accuracy`` (the checkpoint's), ``options`` (the settings that made the file),
    ``info`` (what the codec reports about it) and ``source_fingerprint``. Holds the run directory's lock
    (:func:`kdcompress.run.lock.run_dir_lock`): while another kdc writes there it is refused at once. ``origin``:
    the command line the recipe came from, for the commands messages suggest.
    """
    with run_dir_lock(recipe.run_dir, advice=EXPORT_WAIT_ADVICE, create=False):
        return _export_stage(recipe, formats, force, console, origin)


def _export_stage(recipe, formats: list[str] | None, force: bool, console, origin: Origin) -> list[dict]:
    """:func:`export_stage`'s work, done while holding the run directory's lock."""
    console = console or Console(stderr=True)
    section = recipe.export
    formats = list(dict.fromkeys(formats if formats is not None else section.formats))
    rows = {r["path"]: r for r in read_artifacts(recipe.run_dir)}
    stage = section.stage
    if not formats and not any(r["stage"] == stage for r in rows.values()):
        raise UsageError(
            "nothing to export: name a format (kdc export RUN_DIR --format sparse, with shared, int8 or onnx), "
            "or list them in the recipe's export.formats"
        )
    for fmt in formats:
        codec(fmt)  # a missing extra is reported before any work
    source = _source(recipe, stage, origin)
    # every artifact of the stage made from an older checkpoint is written again, whatever formats were asked for
    wanted = [(fmt, section) for fmt in formats] + _stale_settings(section, rows, source[2])
    todo = _pending(recipe.run_dir, wanted, rows, source[2], force, console)
    if todo:
        _write_pending(recipe, todo, {fmt: codec(fmt) for fmt, _, _ in todo}, source, rows, console)
    paths = {f"{EXPORT_DIR}/{artifact_name(stage, fmt, format_options(fmt, settings))}" for fmt, settings in wanted}
    return [rows[rel] for rel in rows if rel in paths]


def _stale_settings(section, rows: dict, fingerprint: str) -> list[tuple]:
    """``(format, export settings)`` of each artifact of ``section.stage`` made from another checkpoint than the
    current one: its recorded options, checked as a recipe's ``export`` section (the row is data), over
    ``section``. A row whose options or path kdc would not write is left alone (the report flags it)."""
    stale = []
    for rel, row in rows.items():
        if (
            row["stage"] != section.stage
            or row.get("source_fingerprint") == fingerprint
            or row["format"] not in FORMATS
        ):
            continue
        try:
            settings = recipe_from_dict({"export": {**recipe_to_dict(section), **(row.get("options") or {})}}).export
        except RecipeError:
            continue
        if (
            rel
            == f"{EXPORT_DIR}/{artifact_name(section.stage, row['format'], format_options(row['format'], settings))}"
        ):
            stale.append((row["format"], settings))
    return stale


def _pending(run_dir: Path, wanted: list[tuple], rows: dict, fingerprint: str, force: bool, console) -> list[tuple]:
    """``(format, options, path in the run directory)`` of each artifact to write, from ``wanted`` ``(format, export
    settings)`` pairs: every one with ``force``, else those not made from the current checkpoint with the same
    settings, or no longer matching their manifest."""
    todo = []
    for fmt, section in wanted:
        options = format_options(fmt, section)
        rel = f"{EXPORT_DIR}/{artifact_name(section.stage, fmt, options)}"
        if any(rel == item[2] for item in todo):
            continue
        old = rows.get(rel)
        if not force and old and old.get("source_fingerprint") == fingerprint and old.get("options") == options:
            try:
                verify_artifact(run_dir / rel)
                console.print(f"[green]export[/]: {rel} is up to date, kept (--force writes it again)")
                continue
            except ArtifactError as exc:
                console.print(f"[yellow]export[/]: writing {rel} again ({exc})")
        todo.append((fmt, options, rel))
    return todo


def _write_pending(recipe, todo: list[tuple], codecs: dict, source: tuple, rows: dict, console) -> None:
    """Write, load back and evaluate each artifact of ``todo``; ``rows`` and artifacts.json get its row."""
    ckpt_path, ckpt, fingerprint = source
    stage, run_dir = recipe.export.stage, recipe.run_dir
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    data = load_data(recipe.data, seed=recipe.run.seed)
    model_name = stage_named(stage).model(recipe)  # the recipe's name: the only model built from these files
    model = build_from_checkpoint(ckpt, where=f"{stage} checkpoint", expected=model_name).eval()
    stage_accuracy = float(ckpt["metrics"]["test_accuracy"])
    calibration = None
    export_dir(run_dir).mkdir(parents=True, exist_ok=True)
    write_resolved_recipe(recipe)  # the run directory records the export settings, as it does the stages'
    for fmt, options, rel in todo:
        started = time.perf_counter()
        console.print(f"[bold]export[/]: writing {rel} ({fmt}{_options_text(options)})")
        if fmt == "int8" and calibration is None:
            calibration = _calibration_batches(
                data, recipe.data.batch_size, options["calibration_batches"], recipe.run.seed
            )
        seed_everything(recipe.run.seed)
        blob, info, search = _encode(codecs[fmt], fmt, options, (model, ckpt, calibration), data, recipe, console)
        manifest = write_artifact(run_dir / rel, blob, fmt, {"stage": stage, "source_fingerprint": fingerprint})
        # measured from the file, loaded the way a user deploys it: never copied from the checkpoint
        loaded = load_artifact(run_dir / rel, expected=model_name)
        with torch.no_grad():
            test = evaluate(loaded, data.test, recipe.data.eval_batch_size, torch.device("cpu"))
        row = _artifact_row(
            stage, fmt, rel, manifest, test, len(data.test), stage_accuracy, ckpt_path, options, info, fingerprint
        )
        row.update(seconds=time.perf_counter() - started, kdc_version=__version__)
        if search is not None:
            row["int8_search"] = search
        rows[rel] = row
        _write_artifacts(run_dir, list(rows.values()))  # after each one: an interrupted export keeps its work
        console.print(
            f"[green]export[/]: {rel}: {row['bytes']:,} bytes "
            f"({size_change(row['stage_checkpoint_bytes'], row['bytes'], f'{stage}/{MODEL_FILE}')}), "
            f"test accuracy {row['accuracy']:.4f} "
            f"({row['accuracy_change_vs_stage'] * 100:+.2f} points vs the checkpoint)"
        )


def _encode(fmt_codec, fmt: str, options: dict, source: tuple, data, recipe, console) -> tuple:
    """``(bytes, info, int8 search record or None)`` of one artifact; ``source`` is (model, checkpoint, calibration).

    int8 with ``int8_tolerance`` searches the nodes to keep in fp32 on the validation (or training) data, never
    on the test split (:func:`kdcompress.run.export_int8.encode_within_tolerance`)."""
    model, ckpt, calibration = source
    try:
        with torch.no_grad():
            if fmt == "int8" and options.get("int8_tolerance") is not None:
                return encode_within_tolerance(model, ckpt, options, calibration, data, recipe, console)
            return (*fmt_codec.encode(model, ckpt, options, calibration or []), None)
    except ValueError as exc:  # a setting the model cannot be written with (an fp16 overflow, ...)
        raise KdcError(f"cannot export {recipe.export.stage} as {fmt}{_options_text(options)}: {exc}") from None


def size_change(before: int, after: int, than: str) -> str:
    """``"4.2x smaller than X"``, ``"1.3x larger than X"``, or ``"the same size as X"`` when within 5 %."""
    ratio = before / max(1, after)
    if 1 / 1.05 < ratio < 1.05:
        return f"the same size as {than}"
    return f"{ratio:.1f}x smaller than {than}" if ratio > 1 else f"{1 / ratio:.1f}x larger than {than}"


def _artifact_row(
    stage: str,
    fmt: str,
    rel: str,
    manifest: dict,
    test: dict,
    samples: int,
    stage_accuracy: float,
    ckpt_path: Path,
    options: dict,
    info: dict,
    fingerprint: str,
) -> dict:
    """An artifact's row in artifacts.json, but for the seconds it took and the kdc version."""
    return {
        "stage": stage,
        "format": fmt,
        "path": rel,
        "bytes": manifest["bytes"],
        "sha256": manifest["sha256"],
        "accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "test_samples": samples,
        "stage_accuracy": stage_accuracy,
        "accuracy_change_vs_stage": test["accuracy"] - stage_accuracy,
        "stage_checkpoint_bytes": ckpt_path.stat().st_size,
        "options": options,
        "info": info,
        "source_fingerprint": fingerprint,
    }


def _options_text(options: dict) -> str:
    return "".join(f", {k} {v}" for k, v in options.items())
