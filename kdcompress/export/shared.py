"""The ``shared`` artifact: weight sharing as in Deep Compression (Han et al. 2016), in the sparse layout.

For each Linear and Conv weight, the non-zero weights are clustered by 1-D
k-means into ``2**bits`` centroids (``bits`` from 2 to 8), initialised
linearly between the smallest and the largest non-zero weight (the
initialisation the paper found best: it keeps the rare large weights, which
matter most), then refined by Lloyd iterations. The codebook is stored in
fp16 and every weight is assigned to its nearest fp16 centroid, so a decoded
weight equals ``codebook[index]`` exactly. A weight is stored as
``NAME|m``, the bitmask of its non-zeros (as in :mod:`.sparse`), ``NAME|c``,
its codebook, and ``NAME|i``, the index of each non-zero packed at ``bits``
bits each. Zeros stay exactly zero. Biases, BatchNorm and every other
floating tensor are stored whole in fp16; integer tensors as they are.

Example::

    >>> blob, info = encode(model, source, {"bits": 4}, [])  # doctest: +SKIP
    >>> model, preprocess = decode(blob)  # doctest: +SKIP
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import ArtifactError
from ..prune.unstructured import prunable_weights
from .container import decoded_limit, model_meta, pack, rebuild_model, unpack
from .sparse import (
    CODEC_CHOICES,
    check_format,
    check_options,
    dense,
    dtype_name,
    layout_entries,
    mask_count,
    pack_mask,
    scatter,
    state_of,
    tensor,
    to_storage,
    unpack_mask,
)

SUFFIX = ".kdca"  # kdc's container: compressed safetensors behind a KDCA header

__all__ = ["FORMAT", "BITS", "encode", "decode", "kmeans_codebook", "pack_indices", "unpack_indices"]

FORMAT = "shared"
BITS = tuple(range(2, 9))
LLOYD_ITERATIONS = 30


def _assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for each value; ``centroids`` sorted ascending."""
    return torch.bucketize(values, (centroids[1:] + centroids[:-1]) / 2)


def kmeans_codebook(
    values: torch.Tensor, bits: int, iterations: int = LLOYD_ITERATIONS
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fp16 codebook of 2**bits sorted centroids, int64 index of each value)`` for 1-D float ``values``.

    Linear initialisation between min and max, then Lloyd iterations (an
    empty cluster keeps its centroid). The indices are assigned against the
    fp16 codebook itself, so ``codebook[index]`` is exactly the decoded weight.

        >>> codebook, index = kmeans_codebook(torch.tensor([-1.0, -0.9, 0.5, 1.0]), bits=2)
        >>> codebook[index].tolist()  # -1.0 and -0.9 share one centroid, their mean in fp16
        [-0.9501953125, -0.9501953125, 0.5, 1.0]
    """
    k = 2**bits
    values = values.detach().reshape(-1).float()
    if values.numel() == 0:
        return torch.zeros(k, dtype=torch.float16), torch.zeros(0, dtype=torch.int64)
    centroids = torch.linspace(values.min().item(), values.max().item(), k)
    for _ in range(iterations):
        index = _assign(values, centroids)
        sums = torch.zeros(k).index_add_(0, index, values)
        counts = torch.bincount(index, minlength=k)
        updated = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        if torch.equal(updated, centroids):
            break
        centroids = updated
    codebook = centroids.half().sort().values
    return codebook, _assign(values, codebook.float())


def pack_indices(index: torch.Tensor, bits: int) -> torch.Tensor:
    """Indices below ``2**bits`` packed at ``bits`` bits each, most significant bit first (uint8, ceil(n*bits/8) long).

    >>> pack_indices(torch.tensor([3, 0, 1, 2]), bits=2).tolist()
    [198]
    """
    small = index.reshape(-1, 1).to(torch.uint8).numpy()
    planes = np.unpackbits(small, axis=1)[:, 8 - bits :]
    return torch.from_numpy(np.packbits(planes.reshape(-1)))


def unpack_indices(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The ``count`` indices :func:`pack_indices` packed, as int64; ValueError when the length does not fit."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != math.ceil(count * bits / 8):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {count} indices of {bits} bits")
    planes = np.unpackbits(packed.numpy(), count=count * bits).reshape(count, bits)
    full = np.pad(planes, ((0, 0), (8 - bits, 0)))
    return torch.from_numpy(np.packbits(full, axis=1).reshape(-1).astype(np.int64))


def encode(model: torch.nn.Module, source: dict, options: dict, calibration: list[torch.Tensor]) -> tuple[bytes, dict]:
    """The ``shared`` artifact of ``model`` and the settings used.

    ``options``: ``bits`` (2 to 8, default 4: a codebook of 2**bits centroids
    per layer) and ``codec`` (``lzma``, the default, or ``zlib``). Only the
    weights of Linear and Conv layers are clustered; ``calibration`` is not used.
    """
    settings = check_options(options, {"bits": (4, BITS), "codec": ("lzma", CODEC_CHOICES)})
    bits = settings["bits"]
    clustered = set(prunable_weights(model))
    tensors, layout = {}, {}
    nonzeros = 0
    for name, t in state_of(model).items():
        entry = [dtype_name(t.dtype), list(t.shape)]
        if name in clustered and t.is_floating_point():
            mask = t.reshape(-1) != 0
            codebook, index = kmeans_codebook(t.reshape(-1)[mask], bits)
            tensors[f"{name}|m"] = pack_mask(mask)
            tensors[f"{name}|c"] = codebook
            tensors[f"{name}|i"] = pack_indices(index, bits)
            layout[name] = ["k", *entry]
            nonzeros += index.numel()
        else:
            tensors[name] = to_storage(
                t, torch.float16, name, "the shared format stores it in fp16: use the sparse format with dtype fp32"
            )
            layout[name] = ["d", *entry]
    meta = {"format": FORMAT, **model_meta(source), "options": settings, "layout": layout}
    blob = pack(tensors, meta, settings["codec"])
    return blob, {
        **settings,
        "clustered_tensors": sum(kind == "k" for kind, *_ in layout.values()),
        "nonzeros": nonzeros,
    }


def decode(
    blob: bytes, allow_import: bool = False, where: str = "shared artifact", expected: str | None = None
) -> tuple[torch.nn.Module, dict]:
    """``(model in eval mode, preprocess dict)`` from a ``shared`` artifact's bytes; ArtifactError if malformed.

    Nothing is unpickled. The model the file names is built only when it is
    ``expected`` (the recipe's name for it); without ``expected``, one built by
    the user's own factory is imported only with ``allow_import=True``.
    """
    tensors, meta = unpack(blob, where)
    check_format(meta, FORMAT, where)
    bits = (meta.get("options") or {}).get("bits") if isinstance(meta.get("options"), dict) else None
    if bits not in BITS:
        raise ArtifactError(f"{where}: its options name no valid bit width (got {bits!r}); the file is damaged")
    state = {}
    for name, kind, dtype, shape, numel in layout_entries(meta, where, decoded_limit(len(blob))):
        if kind == "d":
            state[name] = dense(tensors, name, dtype, shape, where)
        elif kind == "k":
            packed = tensor(tensors, f"{name}|m", where)
            count = mask_count(packed, numel, where)
            codebook = tensor(tensors, f"{name}|c", where)
            if codebook.dtype != torch.float16 or list(codebook.shape) != [2**bits]:
                raise ArtifactError(
                    f"{where}: the codebook of {name!r} is not {2**bits} fp16 values; the file is damaged"
                )
            try:  # checks the packed length against the count before anything is unpacked
                index = unpack_indices(tensor(tensors, f"{name}|i", where), bits, count)
            except ValueError as exc:
                raise ArtifactError(f"{where}: the indices of {name!r} are damaged ({exc})") from None
            state[name] = scatter(unpack_mask(packed, numel, where), codebook[index], dtype, shape, name, where)
        else:
            raise ArtifactError(f"{where}: unknown storage kind {kind!r} for {name!r}; the file is damaged")
    return rebuild_model(meta, state, allow_import, where, expected)
