"""The ``sparse`` artifact: only the non-zero weights, as a packed bitmask plus the non-zero values.

Every floating tensor of the state_dict whose zeros are worth skipping (the
bitmask costs one bit per element, a skipped zero saves a whole value: so a
tensor is stored sparse when more than 1/16 of it is zero in fp16, 1/32 in
fp32) becomes two tensors: ``NAME|m``, the bitmask of its non-zeros packed
eight to a byte (row-major, ``numpy.packbits``), and ``NAME|v``, its non-zero
values in order. Every other tensor is stored whole. Floating tensors are
written in ``dtype``: ``fp32`` keeps every bit (the round trip is
bit-identical, signed zeros included), ``fp16`` halves the values. Integer
tensors (BatchNorm's counters) stay as they are. The whole is packed by
:mod:`.container` (safetensors, then lzma or zlib).

Example::

    >>> model, preprocess = decode(encode(model, source, {"dtype": "fp32"}, [])[0])  # doctest: +SKIP
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import ArtifactError
from .container import decoded_limit, model_meta, pack, rebuild_model, unpack

SUFFIX = ".kdca"  # kdc's container: compressed safetensors behind a KDCA header

__all__ = ["FORMAT", "encode", "decode", "pack_mask", "unpack_mask", "mask_count", "layout_entries"]

FORMAT = "sparse"
DTYPES = {"fp16": torch.float16, "fp32": None}  # None: each tensor keeps its own floating dtype
CODEC_CHOICES = ("lzma", "zlib")

# the dtypes a state_dict may hold, by the names the layout stores
_DTYPE_NAMES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_BIT_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def dtype_name(dtype: torch.dtype) -> str:
    """The layout's name for a tensor dtype (``"float32"``)."""
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPE_NAMES:
        raise ValueError(f"cannot export a tensor of dtype {name} (kdc artifacts hold {', '.join(_DTYPE_NAMES)})")
    return name


def named_dtype(name, where: str) -> torch.dtype:
    """The dtype a layout entry names; ArtifactError for anything else."""
    if name not in _DTYPE_NAMES:
        raise ArtifactError(f"{where}: its layout names an unknown dtype {name!r}; the file is damaged")
    return _DTYPE_NAMES[name]


def nonzero_mask(t: torch.Tensor) -> torch.Tensor:
    """Flat bool mask of the elements whose bits are not all zero (so -0.0 counts as a value and round-trips)."""
    flat = t.detach().reshape(-1).contiguous()
    return flat.view(_BIT_VIEWS[flat.element_size()]) != 0


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A flat bool mask packed eight to a byte (uint8, ``ceil(n / 8)`` long, first element in the top bit)."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy()))


def mask_count(packed: torch.Tensor, numel: int, where: str) -> int:
    """How many elements a packed bitmask of ``numel`` elements marks, counted without unpacking it.

    ArtifactError when its length does not fit ``numel`` or a padding bit after the last element is set (kdc
    writes them as zeros), so the count is the number of values the file must hold for it.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != math.ceil(numel / 8):
        raise ArtifactError(f"{where}: a bitmask does not fit its tensor's {numel:,} elements; the file is damaged")
    array = packed.numpy()
    if numel % 8 and array[-1] & (0xFF >> (numel % 8)):
        raise ArtifactError(f"{where}: a bitmask marks elements past its tensor's {numel:,}; the file is damaged")
    return int(_POPCOUNT[array].sum(dtype=np.int64))


def unpack_mask(packed: torch.Tensor, numel: int, where: str) -> torch.Tensor:
    """The flat bool mask of ``numel`` elements that :func:`pack_mask` packed; ArtifactError on a length mismatch."""
    mask_count(packed, numel, where)
    # unpackbits gives 0/1 bytes: viewed as bool, not copied (a mask costs one byte per element, once)
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=numel).view(np.bool_))


def to_storage(
    t: torch.Tensor, dtype: torch.dtype | None, name: str, advice: str = "export it with dtype fp32"
) -> torch.Tensor:
    """``t`` cast to ``dtype`` for storage if it is floating (None keeps it); ValueError for values it cannot hold."""
    t = t.detach().cpu()
    if dtype is None or not t.is_floating_point() or t.dtype == dtype:
        return t.contiguous()
    out = t.to(dtype)
    if bool((torch.isinf(out) & torch.isfinite(t)).any()):
        raise ValueError(
            f"{name} holds values beyond what {dtype_name(dtype)} can store (largest |value| "
            f"{t.abs().max().item():.4g}); {advice}"
        )
    return out.contiguous()


def check_options(options: dict, allowed: dict) -> dict:
    """``options`` with defaults filled in; ValueError for an unknown key or value. ``allowed``: key -> (default, choices)."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for this format; it takes {', '.join(allowed)}")
    settings = {}
    for key, (default, choices) in allowed.items():
        value = options.get(key, default)
        if not any(value == c and type(value) is type(c) for c in choices):  # 4.0 or True is not a bit width
            raise ValueError(f"option {key} must be one of {', '.join(map(str, choices))}, got {value!r}")
        settings[key] = value
    return settings


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict as detached CPU tensors."""
    return {name: t.detach().cpu() for name, t in model.state_dict().items()}


def encode(model: torch.nn.Module, source: dict, options: dict, calibration: list[torch.Tensor]) -> tuple[bytes, dict]:
    """The ``sparse`` artifact of ``model`` and the settings used.

    ``options``: ``dtype`` (``fp16``, the default, or ``fp32``: bit-identical)
    and ``codec`` (``lzma``, the default, or ``zlib``). ``source`` is the
    stage checkpoint (its arch, structure and preprocess entries are kept);
    ``calibration`` is not used.
    """
    settings = check_options(options, {"dtype": ("fp16", tuple(DTYPES)), "codec": ("lzma", CODEC_CHOICES)})
    store = DTYPES[settings["dtype"]]
    tensors, layout = {}, {}
    sparse_count = nonzeros = 0
    for name, t in state_of(model).items():
        kept = to_storage(t, store, name)
        entry = [dtype_name(t.dtype), list(t.shape)]
        mask = nonzero_mask(t) if t.is_floating_point() else None
        zeros = 0 if mask is None else mask.numel() - int(mask.sum())
        if mask is not None and zeros * kept.element_size() * 8 > mask.numel():
            tensors[f"{name}|m"] = pack_mask(mask)
            tensors[f"{name}|v"] = kept.reshape(-1)[mask]
            layout[name] = ["s", *entry]
            sparse_count += 1
            nonzeros += mask.numel() - zeros
        else:
            tensors[name] = kept
            layout[name] = ["d", *entry]
    meta = {"format": FORMAT, **model_meta(source), "options": settings, "layout": layout}
    blob = pack(tensors, meta, settings["codec"])
    return blob, {**settings, "sparse_tensors": sparse_count, "nonzeros": nonzeros}


def layout_entries(meta: dict, where: str, limit: int) -> list[tuple[str, str, torch.dtype, list, int]]:
    """``(name, kind, dtype, shape, numel)`` for each entry of an artifact's layout; ArtifactError if malformed.

    Every entry is checked before any is returned, so before anything is allocated: its shape, its dtype, and
    its size in bytes (elements x bytes per element) alone and summed over the layout, which must not pass
    ``limit`` (:func:`kdcompress.export.container.decoded_limit` of the file's size).
    """
    layout = meta.get("layout")
    if not isinstance(layout, dict):
        raise ArtifactError(f"{where}: it has no tensor layout; the file is damaged or not one kdc wrote")
    entries, total = [], 0
    for name, entry in layout.items():
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and isinstance(entry[2], list)
            and len(entry[2]) <= 64
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry[2])
        ):
            raise ArtifactError(f"{where}: its layout entry for {name[:100]!r} is damaged")
        kind, dtype, shape = entry
        dtype = named_dtype(dtype, where)
        numel = math.prod(shape)
        size = numel * dtype.itemsize
        total += size
        if total > limit:
            raise ArtifactError(
                f"{where}: its layout declares {'a tensor' if size > limit else 'tensors'} of more than {limit:,} "
                f"bytes ({name[:100]!r}: {size:,} bytes, {numel:,} elements), more than a file of its size can "
                f"hold; it is damaged or crafted, and nothing was allocated. Export the model again"
            )
        entries.append((name, kind, dtype, shape, numel))
    return entries


def tensor(tensors: dict, key: str, where: str) -> torch.Tensor:
    """``tensors[key]``, or ArtifactError naming the missing tensor."""
    if key not in tensors:
        raise ArtifactError(f"{where}: tensor {key!r} is missing; the file is damaged")
    return tensors[key]


def dense(tensors: dict, name: str, dtype: torch.dtype, shape: list, where: str) -> torch.Tensor:
    """A tensor stored whole, checked against its layout shape and cast back to its own dtype."""
    t = tensor(tensors, name, where)
    if list(t.shape) != shape:
        raise ArtifactError(
            f"{where}: tensor {name!r} is shaped {list(t.shape)}, its layout says {shape}; the file is damaged"
        )
    return t.to(dtype)


def check_values(values: torch.Tensor, count: int, name: str, where: str) -> None:
    """ArtifactError unless ``values`` is a flat tensor of ``count`` elements (the non-zeros a bitmask marks)."""
    if values.dim() != 1 or values.numel() != count:
        raise ArtifactError(
            f"{where}: {name!r} has {values.numel():,} values for {count:,} non-zeros; the file is damaged"
        )


def scatter(
    mask: torch.Tensor, values: torch.Tensor, dtype: torch.dtype, shape: list, name: str, where: str
) -> torch.Tensor:
    """The dense tensor with ``values`` at the mask's positions and zeros elsewhere, in ``dtype`` and ``shape``."""
    check_values(values, int(mask.sum()), name, where)
    # made in its final dtype at once: casting each value first gives the same bits as casting the whole
    out = torch.zeros(mask.numel(), dtype=dtype)
    out[mask] = values.to(dtype)
    return out.reshape(shape)


def check_format(meta: dict, expected: str, where: str) -> None:
    """ArtifactError unless the artifact's meta says it is of the ``expected`` format."""
    if meta.get("format") != expected:
        raise ArtifactError(
            f"{where}: it is a {meta.get('format')!r} artifact, not {expected!r}; load it with load_artifact, "
            f"which reads the format from the file"
        )


def decode(
    blob: bytes, allow_import: bool = False, where: str = "sparse artifact", expected: str | None = None
) -> tuple[torch.nn.Module, dict]:
    """``(model in eval mode, preprocess dict)`` from a ``sparse`` artifact's bytes; ArtifactError if malformed.

    Nothing is unpickled. The model the file names is built only when it is
    ``expected`` (the recipe's name for it); without ``expected``, one built by
    the user's own factory is imported only with ``allow_import=True``.
    """
    tensors, meta = unpack(blob, where)
    check_format(meta, FORMAT, where)
    state = {}
    for name, kind, dtype, shape, numel in layout_entries(meta, where, decoded_limit(len(blob))):
        if kind == "d":
            state[name] = dense(tensors, name, dtype, shape, where)
        elif kind == "s":
            packed, values = tensor(tensors, f"{name}|m", where), tensor(tensors, f"{name}|v", where)
            check_values(values, mask_count(packed, numel, where), name, where)  # before the mask is unpacked
            state[name] = scatter(unpack_mask(packed, numel, where), values, dtype, shape, name, where)
        else:
            raise ArtifactError(f"{where}: unknown storage kind {kind!r} for {name!r}; the file is damaged")
    return rebuild_model(meta, state, allow_import, where, expected)
