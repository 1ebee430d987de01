"""Artifacts you can ship: a stage's model written as a small file, loaded back and measured.

Four formats, each a codec module here with ``encode`` (model -> bytes) and ``decode`` (bytes ->
ready model), and none of which unpickles anything when it is loaded:

``sparse``  only the non-zero weights (a packed bitmask plus values, fp32 or fp16), entropy-coded
``shared``  weight sharing (Deep Compression): per-layer k-means codebooks, ``bits`` per weight index
``int8``    post-training quantisation of Linear and Conv, calibrated on training batches
``onnx``    the graph for ONNX Runtime (an unstructured-sparse model stays dense-sized: ONNX stores
            dense tensors; a structured-pruned one is a smaller graph)

The export stage (:func:`kdcompress.run.export.export_stage`) writes them to ``<run dir>/export/``, each
with a manifest (size and SHA-256) by :func:`write_artifact`, loads each back through :func:`load_artifact`
(the code a user deploys with), evaluates it on the test split and records the result in
``export/artifacts.json``; the report measures their latency and shows them beside the stages. Example::

    >>> from kdcompress.export import load_artifact
    >>> model = load_artifact("runs/quickstart/export/pruned-shared-4bit.kdca")  # doctest: +SKIP
    >>> model(model.preprocess(images)).argmax(1)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

from .._version import __version__
from ..errors import ArtifactError, KdcError, did_you_mean
from ..files import atomic_write_files, manifest_path

__all__ = [
    "FORMATS",
    "codec",
    "load_artifact",
    "verify_artifact",
    "write_artifact",
    "artifact_name",
    "format_options",
    "check_formats",
]

FORMATS = ("sparse", "shared", "int8", "onnx")
ARTIFACT_FORMAT = "kdc-artifact"
ONNX_EXTRA = "pip install 'kdcompress[onnx]'"
_NEEDS_ONNX = ("int8", "onnx")


def codec(fmt: str):
    """The codec module of format ``fmt`` (imported on first use: onnx pulls in onnxruntime)."""
    if fmt not in FORMATS:
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
    if fmt == "int8":  # the tolerance only when set: files exported before it existed keep their options
        options = {"calibration_batches": int(section.calibration_batches)}
        tolerance = getattr(section, "int8_tolerance", None)
        return options if tolerance is None else {**options, "int8_tolerance": float(tolerance)}
    return {}


def artifact_name(stage: str, fmt: str, options: dict) -> str:
    """The file name of an artifact: one per stage, format and setting that changes the bytes."""
    suffix = getattr(codec(fmt), "SUFFIX", ".kdca")
    if fmt == "sparse":
        return f"{stage}-sparse-{options['dtype']}{suffix}"
    if fmt == "shared":
        return f"{stage}-shared-{options['bits']}bit{suffix}"
    return f"{stage}{suffix}" if fmt == "onnx" else f"{stage}-{fmt}{suffix}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_artifact(path: Path, blob: bytes, fmt: str, extra: dict | None = None) -> dict:
    """Write an artifact and its manifest (size, SHA-256, format) atomically; return the manifest."""
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
        model, preprocess = codec(manifest["format"]).decode(blob, allow_import=allow_import, expected=expected)
    except ArtifactError as exc:  # the codecs say what is wrong; the file they were given is named here
        raise ArtifactError(f"{path} was refused: {exc}") from None
    try:
        model.preprocess = Preprocess(preprocess)
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path}: its preprocessing entry is damaged ({type(exc).__name__}: {exc})") from None
    model.artifact = manifest
    return model.eval()
