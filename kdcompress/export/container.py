"""The byte layout shared by the ``sparse`` and ``shared`` artifacts: tensors + plain-JSON meta, compressed.

An artifact is::

    b"KDCA" | version (1 byte) | codec (1 byte) | raw size (uint32 LE) | CRC-32 of the raw bytes (uint32 LE) | payload

where the raw bytes are a safetensors file (``safetensors.torch.save``) whose
metadata entry ``"kdc"`` holds the meta dict as compact JSON, and the payload
is those raw bytes compressed with ``lzma`` (a raw LZMA2 stream, without the
xz container's headers and checks: the header above carries the size and the
CRC) or ``zlib`` (a raw deflate stream).

Reading never unpickles anything: the header is checked, the payload is
decompressed up to the size the header declares (so a small file cannot
expand into gigabytes: a decompression bomb stops at the declared size, which
is itself capped), the CRC is compared, and safetensors parses the tensors.
Anything malformed raises :class:`~kdcompress.errors.ArtifactError`.

Example::

    >>> import torch
    >>> blob = pack({"w": torch.arange(4.0)}, {"format": "demo"})
    >>> tensors, meta = unpack(blob)
    >>> tensors["w"].tolist(), meta
    ([0.0, 1.0, 2.0, 3.0], {'format': 'demo'})
"""

from __future__ import annotations

import json
import lzma
import struct
import zlib

import torch

from ..errors import ArtifactError, KdcError

__all__ = [
    "MAGIC",
    "CODECS",
    "MAX_RAW_BYTES",
    "MAX_DECODED_BYTES",
    "decoded_limit",
    "pack",
    "unpack",
    "model_meta",
    "rebuild_model",
]

MAGIC = b"KDCA"
VERSION = 1
CODECS = {"lzma": 1, "zlib": 2}
_CODEC_NAMES = {v: k for k, v in CODECS.items()}
HEADER = struct.Struct("<4sBBII")  # magic, version, codec, raw size, crc32
MAX_RAW_BYTES = 2**31  # a model of ~1e9 fp16 parameters; far beyond any kdc artifact, well within memory limits
# The weights an artifact may decode to (the sum over its layout of elements x bytes per element), checked before
# anything is allocated: at most MAX_DECODED_BYTES (~1e9 fp32 parameters), and at most DECODED_RATIO times the
# file's own size, though never less than DECODED_FLOOR. The ratio is what stops a small file from declaring a
# huge model: a bitmask of zeros compresses ~5000-fold, so a 3 KB file can declare 134M weights. A real model
# cannot get near it: a 99 % sparse one decodes to ~150x its file (its non-zeros and the bitmask's entropy are
# in the file), a 2-bit shared one ~300x.
MAX_DECODED_BYTES = 2**32
DECODED_RATIO = 1024
DECODED_FLOOR = 64 * 2**20

# lzma literal/position settings tried on a sample of the raw bytes: the defaults (lc=3, lp=0, pb=2) suit
# text, while packed bitmasks favour lc=0 (a byte says little about the next) and fp16 or fp32 values lp/pb
# of 1 or 2 (2- or 4-byte alignment). Measured on a 90 % pruned 784-100-10 MLP: 7 % smaller with sparse
# fp16, 9 % with sparse fp32, 5 % with shared 4-bit, than the defaults. The search uses a cheaper preset on
# at most 256 KiB, so it costs a few seconds at most whatever the model's size.
_LZMA_TRIES = [(lc, lp, pb) for lc in (0, 1, 3) for lp in (0, 1, 2) for pb in (0, 1, 2) if lc + lp <= 4]  # LZMA2 limit
_LZMA_SAMPLE = 1 << 18
_LZMA_SEARCH_PRESET = 6


def _dict_size(raw_size: int) -> int:
    """The LZMA2 dictionary for ``raw_size`` bytes: derived from the size, so the header need not store it."""
    return min(max(raw_size, 4096), 1 << 26)


def decoded_limit(blob_size: int) -> int:
    """The most bytes of weights an artifact of ``blob_size`` bytes may decode to (see ``DECODED_RATIO``).

    >>> decoded_limit(3_000) == DECODED_FLOOR, decoded_limit(10**9) == MAX_DECODED_BYTES
    (True, True)
    """
    return min(MAX_DECODED_BYTES, max(DECODED_FLOOR, DECODED_RATIO * int(blob_size)))


def _lzma_filters(raw_size: int, lc: int = 3, lp: int = 0, pb: int = 2) -> list[dict]:
    return [
        {
            "id": lzma.FILTER_LZMA2,
            "preset": 9 | lzma.PRESET_EXTREME,
            "dict_size": _dict_size(raw_size),
            "lc": lc,
            "lp": lp,
            "pb": pb,
        }
    ]


def _lzma_compress(raw: bytes) -> bytes:
    sample = raw[:_LZMA_SAMPLE]

    def size(settings):
        filters = _lzma_filters(len(raw), *settings)
        filters[0]["preset"] = _LZMA_SEARCH_PRESET
        return len(lzma.compress(sample, format=lzma.FORMAT_RAW, filters=filters))

    best = min(_LZMA_TRIES, key=size)
    # lc, lp and pb travel inside the LZMA2 stream; the decoder needs only the dictionary size
    return lzma.compress(raw, format=lzma.FORMAT_RAW, filters=_lzma_filters(len(raw), *best))


def _zlib_compress(raw: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -15, 9)  # raw deflate: the header has the size and the CRC
    return packer.compress(raw) + packer.flush()


def pack(tensors: dict[str, torch.Tensor], meta: dict, codec: str = "lzma") -> bytes:
    """The artifact bytes for ``tensors`` (contiguous CPU tensors) and ``meta`` (plain JSON), compressed by ``codec``.

    ``codec`` is ``"lzma"`` (smaller) or ``"zlib"`` (faster to write and read).
    """
    from safetensors.torch import save

    if codec not in CODECS:
        raise ValueError(f"codec must be one of {', '.join(CODECS)}, got {codec!r}")
    text = json.dumps(meta, separators=(",", ":"), allow_nan=False)
    raw = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"kdc": text})
    if len(raw) > MAX_RAW_BYTES:
        raise ValueError(
            f"the artifact would hold {len(raw):,} bytes before compression; the limit is {MAX_RAW_BYTES:,}"
        )
    payload = _lzma_compress(raw) if codec == "lzma" else _zlib_compress(raw)
    return HEADER.pack(MAGIC, VERSION, CODECS[codec], len(raw), zlib.crc32(raw)) + payload


def _not_ours(blob: bytes, where: str) -> ArtifactError:
    head = bytes(blob[:4])
    if head[:1] == b"\x80" or head[:2] == b"PK":
        kind = "a pickle or torch.save file"
    elif head[:1] == b"\x08":  # protobuf field 1 (ONNX's ir_version)
        kind = "probably an ONNX file"
    else:
        kind = "not a kdc artifact"
    return ArtifactError(
        f"{where}: {kind} (it starts with {head!r}, not {MAGIC!r}); kdc never unpickles artifacts, so it is "
        f"refused. Export the model again with 'kdc export'"
    )


def _decompress(codec: int, payload: bytes, raw_size: int, where: str) -> bytes:
    try:
        if codec == CODECS["lzma"]:
            unpacker = lzma.LZMADecompressor(
                format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "dict_size": _dict_size(raw_size)}]
            )
        else:
            unpacker = zlib.decompressobj(-15)
        # never more than the declared size: a bomb stops here instead of filling memory
        raw = unpacker.decompress(payload, raw_size + 1)
    except (lzma.LZMAError, zlib.error) as exc:
        raise ArtifactError(f"{where}: its compressed data is damaged ({exc}); export the model again") from None
    complete = unpacker.eof if codec == CODECS["lzma"] else unpacker.eof and not unpacker.unconsumed_tail
    if complete and unpacker.unused_data:
        raise ArtifactError(
            f"{where}: {len(unpacker.unused_data):,} unexpected bytes after its data; the file is damaged"
        )
    if len(raw) != raw_size or not complete:
        raise ArtifactError(
            f"{where}: its compressed data is truncated or damaged (expected {raw_size:,} bytes, got "
            f"{len(raw):,}{'' if complete else ' from an unfinished stream'}); export the model again"
        )
    return raw


def unpack(blob: bytes, where: str = "artifact") -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, meta)`` from artifact bytes made by :func:`pack`; ArtifactError on anything malformed.

    ``where`` names the artifact in error messages (its path, usually).
    """
    blob = bytes(blob)
    if len(blob) < HEADER.size or blob[:4] != MAGIC:
        if not blob:
            raise ArtifactError(f"{where}: the file is empty; export the model again")
        if len(blob) < HEADER.size and MAGIC.startswith(blob[:4]):
            raise ArtifactError(
                f"{where}: truncated ({len(blob)} bytes, shorter than the header); export the model again"
            )
        raise _not_ours(blob, where)
    _, version, codec, raw_size, crc = HEADER.unpack_from(blob)
    if version != VERSION:
        raise ArtifactError(
            f"{where}: artifact format version {version}, but this kdc reads version {VERSION}; use the kdc that "
            f"wrote it, or export the model again"
        )
    if codec not in _CODEC_NAMES:
        raise ArtifactError(
            f"{where}: unknown codec number {codec} in the header; the file is damaged or not one kdc wrote"
        )
    if raw_size > MAX_RAW_BYTES:
        raise ArtifactError(
            f"{where}: its header declares {raw_size:,} bytes of data, over the {MAX_RAW_BYTES:,} limit; refused"
        )
    raw = _decompress(codec, blob[HEADER.size :], raw_size, where)
    if zlib.crc32(raw) != crc:
        raise ArtifactError(f"{where}: its data fails the CRC check (the file is damaged); export the model again")
    return _parse(raw, where)


def _parse(raw: bytes, where: str) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load

    damaged = f"{where}: its tensor data is damaged"
    try:
        # safetensors' loader returns only the tensors: read the header's metadata ourselves (plain JSON)
        (length,) = struct.unpack_from("<Q", raw)
        if length > len(raw) - 8:
            raise ValueError("header longer than the data")
        header = json.loads(raw[8 : 8 + length])
        meta = json.loads(header["__metadata__"]["kdc"])
        tensors = load(raw)
    except Exception as exc:  # safetensors raises its own error types; any failure here means a damaged file
        raise ArtifactError(f"{damaged} ({type(exc).__name__}: {str(exc)[:200]}); export the model again") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{damaged} (its meta entry is not a JSON object); export the model again")
    return tensors, meta


def model_meta(source: dict) -> dict:
    """The parts of a stage checkpoint an artifact needs to rebuild its model: arch, structure, preprocess."""
    meta = {"arch": source["arch"]}
    if source.get("structure"):
        meta["structure"] = source["structure"]
    if source.get("preprocess") is not None:
        meta["preprocess"] = source["preprocess"]
    return meta


def rebuild_model(
    meta: dict, state_dict: dict[str, torch.Tensor], allow_import: bool, where: str, expected: str | None = None
) -> tuple[torch.nn.Module, dict]:
    """``(model in eval mode, preprocess dict)`` from an artifact's meta and its decoded state_dict.

    The model the file names is built only when it is ``expected`` (the recipe's name for it), or, with no
    recipe to compare with, a built-in one or, with ``allow_import``, your own: see
    :func:`kdcompress.models.check_model_name`.
    """
    from ..models import build_from_checkpoint

    arch = meta.get("arch")
    if not isinstance(arch, dict) or not isinstance(arch.get("model"), str):
        raise ArtifactError(f"{where}: it names no model architecture; the file is damaged or not one kdc wrote")
    ckpt = {"arch": arch, "structure": meta.get("structure"), "state_dict": state_dict}
    try:
        model = build_from_checkpoint(ckpt, where=where, expected=expected, allow_import=allow_import)
    except ArtifactError:
        raise
    except KdcError as exc:
        raise ArtifactError(str(exc)) from None
    except (KeyError, TypeError, ValueError) as exc:  # an arch entry of the wrong shape
        raise ArtifactError(
            f"{where}: its architecture entry is damaged ({type(exc).__name__}: {exc}); export the model again"
        ) from None
    preprocess = meta.get("preprocess")
    if isinstance(preprocess, dict) and preprocess.get("input_shape") != arch["input_shape"]:
        raise ArtifactError(
            f"{where}: its preprocessing entry describes inputs shaped {str(preprocess.get('input_shape'))[:100]}, its "
            f"model takes {arch['input_shape']}; the file is damaged. Export the model again"
        )
    return model.eval(), dict(preprocess) if isinstance(preprocess, dict) else {}
