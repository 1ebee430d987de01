"""Artifacts you can ship: a stage's model written as a small file, loaded back and measured.

Four formats, each a codec module here with ``encode`` (model -> bytes) and ``decode`` (bytes ->
ready model), and none of which unpickles anything when it is loaded:

``sparse``  only the non-zero weights (a packed bitmask plus values, fp32 or fp16), entropy-coded
``shared``  weight sharing (Deep Compression): per-layer k-means codebooks, ``bits`` per weight index
``int8``    post-training quantisation of Linear and Conv, calibrated on training batches
``onnx``    the graph for ONNX Runtime (an unstructured-sparse model stays dense-sized: ONNX stores
            dense tensors; a structured-pruned one is a smaller graph)

:func:`export_stage` writes them to ``<run dir>/export/``, each with a manifest (size and SHA-256),
loads each back through :func:`load_artifact` (the code a user deploys with), evaluates it on the
test split and records the result in ``export/artifacts.json``; the report measures their latency
and shows them beside the stages. Example::

    >>> from kdcompress.export import load_artifact
    >>> model = load_artifact("runs/quickstart/export/pruned-shared-4bit.kdca")  # doctest: +SKIP
    >>> model(model.preprocess(images)).argmax(1)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from pathlib import Path

from ..errors import ArtifactError, KdcError, StageOrderError
from ..files import atomic_write_files, atomic_write_text, manifest_path
from ..runlock import run_dir_lock
from ..stages import stage_named

__all__ = [
    "FORMATS",
    "EXPORT_DIR",
    "ARTIFACTS_FILE",
    "export_stage",
    "load_artifact",
    "verify_artifact",
    "read_artifacts",
    "artifact_name",
    "format_options",
    "check_formats",
]

FORMATS = ("sparse", "shared", "int8", "onnx")
EXPORT_DIR = "export"
ARTIFACTS_FILE = "artifacts.json"
ARTIFACT_FORMAT = "kdc-artifact"
ONNX_EXTRA = "pip install 'kdcompress[onnx]'"
_NEEDS_ONNX = ("int8", "onnx")


def _codec(fmt: str):
    """The codec module of format ``fmt`` (imported on first use: onnx pulls in onnxruntime)."""
    if fmt not in FORMATS:
        from ..errors import did_you_mean

        raise KdcError(f"unknown export format {fmt!r}{did_you_mean(fmt, FORMATS)} (known: {', '.join(FORMATS)})")
    try:
        return importlib.import_module(f"{__name__}.{fmt}")
    except ModuleNotFoundError as exc:
        if fmt in _NEEDS_ONNX and exc.name and exc.name.split(".")[0] in ("onnx", "onnxruntime", "onnxscript"):
            raise KdcError(
                f"the {fmt} format needs onnx, onnxscript and onnxruntime ({exc.name} is not installed); "
                f"install them with: {ONNX_EXTRA}"
            ) from None
        raise


def check_formats(formats) -> None:
    """Raise KdcError, before any training, when a listed format needs packages that are not installed."""
    import importlib.util

    needs = [fmt for fmt in formats if fmt in _NEEDS_ONNX]
    missing = [
        name for name in ("onnx", "onnxscript", "onnxruntime") if needs and importlib.util.find_spec(name) is None
    ]
    if missing:
        raise KdcError(
            f"export.formats lists {' and '.join(needs)}, which need{'s' if len(needs) == 1 else ''} "
            f"{', '.join(missing)} (not installed); install them with: {ONNX_EXTRA}, or drop "
            f"{'it' if len(needs) == 1 else 'them'} from export.formats"
        )


def format_options(fmt: str, section) -> dict:
    """The recipe's ``export`` settings that format ``fmt`` reads (plain data; part of its file name)."""
    if fmt == "sparse":
        return {"dtype": section.dtype, "codec": section.codec}
    if fmt == "shared":
        return {"bits": int(section.bits), "codec": section.codec}
    if fmt == "int8":
        return {"calibration_batches": int(section.calibration_batches)}
    return {}


def artifact_name(stage: str, fmt: str, options: dict) -> str:
    """The file name of an artifact: one per stage, format and setting that changes the bytes."""
    suffix = getattr(_codec(fmt), "SUFFIX", ".kdca")
    if fmt == "sparse":
        return f"{stage}-sparse-{options['dtype']}{suffix}"
    if fmt == "shared":
        return f"{stage}-shared-{options['bits']}bit{suffix}"
    return f"{stage}{suffix}" if fmt == "onnx" else f"{stage}-{fmt}{suffix}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_artifact(path: Path, blob: bytes, fmt: str, extra: dict | None = None) -> dict:
    """Write an artifact and its manifest (size, SHA-256, format) atomically; return the manifest."""
    from .._version import __version__

    manifest = {
        "file": Path(path).name,
        "kind": ARTIFACT_FORMAT,
        "format": fmt,
        "bytes": len(blob),
        "sha256": _sha256(blob),
        "kdc_version": __version__,
        **(extra or {}),
    }
    atomic_write_files({Path(path): blob, manifest_path(path): json.dumps(manifest) + "\n"})  # both or neither
    return manifest


def verify_artifact(path: str | Path) -> tuple[dict, bytes]:
    """Check an artifact against its manifest (size, SHA-256, format); return ``(manifest, bytes)``.

    Raises ArtifactError, naming the file and what to do, when either is missing, damaged or replaced.
    """
    path = Path(path)
    mpath = manifest_path(path)
    again = "export it again (kdc export RUN_DIR --format FORMAT --force)"
    if not path.is_file():
        raise ArtifactError(f"artifact not found: {path}")
    try:
        manifest = json.loads(mpath.read_text())
        fmt, size, digest = manifest["format"], int(manifest["bytes"]), str(manifest["sha256"])
        if manifest.get("kind") != ARTIFACT_FORMAT:
            raise ValueError
    except FileNotFoundError:
        raise ArtifactError(
            f"{path} has no manifest ({mpath.name}), so kdc cannot tell that it wrote it; it was not loaded. "
            f"Delete it and {again}"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, OverflowError, RecursionError):  # inf, deep nesting
        raise ArtifactError(
            f"the manifest {mpath} is damaged or not a kdc artifact's; delete both and {again}"
        ) from None
    if fmt not in FORMATS:
        raise ArtifactError(f"{mpath} names an unknown format {fmt!r}; this kdc reads {', '.join(FORMATS)}")
    blob = path.read_bytes() if path.stat().st_size == size else b""  # a file of another size is not read at all
    if len(blob) != size or _sha256(blob) != digest:
        raise ArtifactError(
            f"{path} was refused: its {'size' if len(blob) != size else 'SHA-256'} differs from the one recorded "
            f"when kdc wrote it (damaged or replaced), so it was not loaded. Delete it and {again}"
        )
    return manifest, blob


def load_artifact(path: str | Path, allow_import: bool = False, expected: str | None = None):
    """A ready model (eval mode, CPU) from an artifact file, with ``.preprocess`` and ``.artifact`` attached.

    The file is checked against its manifest first and decoded without unpickling anything: a crafted
    or damaged file raises ArtifactError and runs nothing. For ``onnx`` and ``int8`` the model wraps
    an onnxruntime session (install ``kdcompress[onnx]``). ``model.preprocess(images)`` turns raw uint8
    images into the batch the model takes (see :class:`kdcompress.loading.Preprocess`). The model name in
    the file is data: given ``expected`` (your recipe's name for the model), no other model is built; without
    it, one built by your own factory (``package.module:factory``) is imported only with ``allow_import=True``.

    Example::

        >>> model = load_artifact("runs/quickstart/export/pruned-sparse-fp16.kdca")  # doctest: +SKIP
        >>> model(model.preprocess(images)).argmax(1)  # doctest: +SKIP
    """
    from ..loading import Preprocess

    manifest, blob = verify_artifact(path)
    try:
        model, preprocess = _codec(manifest["format"]).decode(blob, allow_import=allow_import, expected=expected)
    except ArtifactError as exc:  # the codecs say what is wrong; the file they were given is named here
        raise ArtifactError(f"{path} was refused: {exc}") from None
    try:
        model.preprocess = Preprocess(preprocess)
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path}: its preprocessing entry is damaged ({type(exc).__name__}: {exc})") from None
    model.artifact = manifest
    return model.eval()


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
    (:func:`kdcompress.files.confined_path`).
    """
    path = Path(run_dir) / EXPORT_DIR / ARTIFACTS_FILE
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
    atomic_write_text(run_dir / EXPORT_DIR / ARTIFACTS_FILE, json.dumps({"artifacts": rows}, indent=2) + "\n")


def _calibration_batches(data, batch_size: int, count: int, seed: int) -> list:
    """``count`` shuffled training batches (preprocessed, as the model takes them), the same for a given seed."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    out = []
    for x, _, _ in data.train.batches(batch_size, shuffle=True, generator=generator):
        out.append(x.float())
        if len(out) >= count:
            break
    return out


def _source(recipe, stage: str):
    """The checkpoint of ``stage`` (up to date with the recipe) and its fingerprint."""
    from ..checkpoint import load_checkpoint, read_manifest
    from ..pipeline import COMMAND_OF, _recipe_hint, checkpoint_path, stage_status

    status = stage_status(recipe, stage)
    if not status.done:
        hint = _recipe_hint(recipe)
        raise StageOrderError(
            f"cannot export the '{stage}' stage: {status.reason}; run `{COMMAND_OF[stage]} {hint}` (or `kdc run "
            f"{hint}`) first, or export another stage with --stage"
        )
    path = checkpoint_path(recipe.run_dir, stage)
    return path, load_checkpoint(path), read_manifest(path)["fingerprint"]


# a live run's stage is unfinished: the export waits for it rather than reporting it interrupted
EXPORT_WAIT_ADVICE = "wait for it to finish, then export"


def export_stage(recipe, formats: list[str] | None = None, force: bool = False, console=None) -> list[dict]:
    """Write, load back and evaluate each artifact of ``recipe.export.stage``; return their rows.

    ``formats`` defaults to ``recipe.export.formats``. An artifact whose file still matches its
    manifest and was made from the current checkpoint with the same settings is kept (``force``
    writes it again). Each row (also in ``export/artifacts.json``): ``stage``, ``format``, ``path``
    (relative to the run directory), ``bytes``, ``accuracy`` measured from the loaded artifact on the
    test split, ``stage_accuracy`` (the checkpoint's), ``options`` (the settings that made the file),
    ``info`` (what the codec reports about it) and ``source_fingerprint``. Holds the run directory's lock
    (:func:`kdcompress.runlock.run_dir_lock`): while another kdc writes there it is refused at once.
    """
    with run_dir_lock(recipe.run_dir, advice=EXPORT_WAIT_ADVICE, create=False):
        return _export_stage(recipe, formats, force, console)


def _export_stage(recipe, formats: list[str] | None, force: bool, console) -> list[dict]:
    """:func:`export_stage`'s work, done while holding the run directory's lock."""
    import torch
    from rich.console import Console

    from .._version import __version__
    from ..data import load_data
    from ..models import build_from_checkpoint
    from ..pipeline import _write_resolved_recipe
    from ..train import evaluate, seed_everything

    console = console or Console(stderr=True)
    section = recipe.export
    formats = list(dict.fromkeys(formats if formats is not None else section.formats))
    if not formats:
        raise KdcError(
            "nothing to export: name a format (kdc export RUN_DIR --format sparse, with shared, int8 or onnx), "
            "or list them in the recipe's export.formats"
        )
    codecs = {fmt: _codec(fmt) for fmt in formats}  # a missing extra is reported before any work
    stage = section.stage
    ckpt_path, ckpt, fingerprint = _source(recipe, stage)
    run_dir = recipe.run_dir
    out_dir = run_dir / EXPORT_DIR
    rows = {r["path"]: r for r in read_artifacts(run_dir)}
    todo = []
    for fmt in formats:
        options = format_options(fmt, section)
        rel = f"{EXPORT_DIR}/{artifact_name(stage, fmt, options)}"
        old = rows.get(rel)
        if not force and old and old.get("source_fingerprint") == fingerprint and old.get("options") == options:
            try:
                verify_artifact(run_dir / rel)
                console.print(f"[green]export[/]: {rel} is up to date, kept (--force writes it again)")
                continue
            except ArtifactError as exc:
                console.print(f"[yellow]export[/]: writing {rel} again ({exc})")
        todo.append((fmt, options, rel))
    if not todo:
        return [rows[rel] for rel in rows if rows[rel]["stage"] == stage and rows[rel]["format"] in formats]

    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    data = load_data(recipe.data, seed=recipe.run.seed)
    model_name = stage_named(stage).model(recipe)  # the recipe's name: the only model built from these files
    model = build_from_checkpoint(ckpt, where=f"{stage} checkpoint", expected=model_name).eval()
    stage_accuracy = float(ckpt["metrics"]["test_accuracy"])
    calibration = None
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_resolved_recipe(recipe)  # the run directory records the export settings, as it does the stages'
    written = []
    for fmt, options, rel in todo:
        started = time.perf_counter()
        console.print(f"[bold]export[/]: writing {rel} ({fmt}{_options_text(options)})")
        if fmt == "int8" and calibration is None:
            calibration = _calibration_batches(
                data, recipe.data.batch_size, options["calibration_batches"], recipe.run.seed
            )
        seed_everything(recipe.run.seed)
        try:
            with torch.no_grad():
                blob, info = codecs[fmt].encode(model, ckpt, options, calibration or [])
        except ValueError as exc:  # a setting the model cannot be written with (an fp16 overflow, ...)
            raise KdcError(f"cannot export {stage} as {fmt}{_options_text(options)}: {exc}") from None
        manifest = write_artifact(run_dir / rel, blob, fmt, {"stage": stage, "source_fingerprint": fingerprint})
        # measured from the file, loaded the way a user deploys it: never copied from the checkpoint
        loaded = load_artifact(run_dir / rel, expected=model_name)
        with torch.no_grad():
            test = evaluate(loaded, data.test, recipe.data.eval_batch_size, torch.device("cpu"))
        row = {
            "stage": stage,
            "format": fmt,
            "path": rel,
            "bytes": manifest["bytes"],
            "sha256": manifest["sha256"],
            "accuracy": test["accuracy"],
            "test_loss": test["loss"],
            "test_samples": len(data.test),
            "stage_accuracy": stage_accuracy,
            "accuracy_change_vs_stage": test["accuracy"] - stage_accuracy,
            "stage_checkpoint_bytes": ckpt_path.stat().st_size,
            "options": options,
            "info": info,
            "source_fingerprint": fingerprint,
            "seconds": time.perf_counter() - started,
            "kdc_version": __version__,
        }
        rows[rel] = row
        written.append(row)
        _write_artifacts(run_dir, list(rows.values()))  # after each one: an interrupted export keeps its work
        console.print(
            f"[green]export[/]: {rel}: {row['bytes']:,} bytes ({row['stage_checkpoint_bytes'] / row['bytes']:.1f}x "
            f"smaller than {stage}/model.pt), test accuracy {row['accuracy']:.4f} "
            f"({row['accuracy_change_vs_stage'] * 100:+.2f} points vs the checkpoint)"
        )
    return [rows[rel] for rel in rows if rows[rel]["stage"] == stage and rows[rel]["format"] in formats]


def _options_text(options: dict) -> str:
    return "".join(f", {k} {v}" for k, v in options.items())
