"""Load a stage checkpoint for use: the model in eval mode and the preprocessing it was trained with.

A model trained by kdc expects normalised input, ``(x / 255 - mean) / std``
per channel; fed plain 0-1 tensors it still runs, just less accurately,
and nothing says so. ``load_model`` returns the model together with a
``preprocess`` callable that turns raw uint8 images into exactly the batch
the model saw in training. Example::

    >>> import kdcompress
    >>> model, preprocess = kdcompress.load_model("runs/quickstart/pruned/model.pt")  # doctest: +SKIP
    >>> with torch.no_grad():  # doctest: +SKIP
    ...     logits = model(preprocess(images))  # images: uint8, (N, 28, 28), 0-255
    >>> [preprocess.classes[i] for i in logits.argmax(1)]  # doctest: +SKIP
    ['Ankle boot', 'Pullover', ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_checkpoint
from .data import preprocess_info
from .errors import CheckpointError
from .models import build_from_checkpoint

__all__ = ["load_model", "Preprocess"]


class Preprocess:
    """Raw images -> the normalised float batch (N, C, H, W) a kdc model expects.

    Takes uint8 images with values 0-255 only: a torch tensor or numpy array
    shaped (H, W), (C, H, W), (H, W, C), (N, H, W), (N, C, H, W) or
    (N, H, W, C), a PIL image (converted to the model's channel mode, "L"
    or "RGB"), or a list of these. Height and width must already be the
    model's (``input_shape``); nothing is resized. Float input is refused,
    because 0-1 (ToTensor) and already-normalised tensors look alike and
    either would be silently normalised twice.

    Attributes: ``classes`` (names in label order, or None), ``mean``,
    ``std``, ``scale``, ``input_shape`` (C, H, W), ``channels``, ``known``
    and ``info`` (the plain dict stored in the checkpoint). When ``known`` is
    False (a user's own dataset) kdc does not know the transform, and
    calling raises an error that says so.
    """

    def __init__(self, info: dict, device: str | torch.device = "cpu"):
        self.info = dict(info)
        self.known = bool(info.get("known"))
        self.dataset = info.get("dataset")
        self.input_shape = tuple(int(d) for d in info["input_shape"])
        self.channels = info.get("channels")
        self.scale = info.get("scale")
        self.mean = tuple(info["mean"]) if info.get("mean") is not None else None
        self.std = tuple(info["std"]) if info.get("std") is not None else None
        self.classes = list(info["classes"]) if info.get("classes") is not None else None
        self.device = torch.device(device)
        if self.known:
            # the same affine form as TensorData.normalise, so inputs match training bit for bit
            std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
            mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
            self._mul = (1.0 / (255.0 * std)).to(self.device)
            self._add = (-mean / std).to(self.device)

    def __repr__(self) -> str:
        if not self.known:
            return f"Preprocess(dataset={self.dataset!r}, known=False, input_shape={self.input_shape})"
        return (
            f"Preprocess(dataset={self.dataset!r}, uint8 0-255 -> (x/255 - mean)/std, mean={self.mean}, "
            f"std={self.std}, input_shape={self.input_shape}, layout=NCHW)"
        )

    def __call__(self, images) -> torch.Tensor:
        """Return the float32 batch (N, C, H, W) on the model's device for raw uint8 ``images``."""
        if not self.known:
            raise ValueError(
                f"kdc does not know how inputs of '{self.dataset}' were preprocessed: it is your own dataset, and "
                f"the model saw whatever that dataset yields. Apply the same transform yourself and call the "
                f"model directly on a batch shaped (N, {', '.join(map(str, self.input_shape))})"
            )
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("preprocess got an empty list; give it at least one image")
            return torch.cat([self(image) for image in images])
        batch = self._as_batch(self._as_uint8_tensor(images))
        return batch.to(self.device).float().mul_(self._mul).add_(self._add).contiguous()

    def _as_uint8_tensor(self, images) -> torch.Tensor:
        if _is_pil_image(images):
            import numpy as np

            mode = self.channels or images.mode
            images = np.asarray(images.convert(mode) if images.mode != mode else images)  # (H, W) or (H, W, C)
        np = sys.modules.get("numpy")  # an array can only exist if numpy was imported
        if np is not None and isinstance(images, np.ndarray):
            if images.dtype != np.uint8:
                raise TypeError(self._dtype_message(f"a numpy array of {images.dtype}"))
            if not images.flags.writeable:  # torch warns about read-only arrays (PIL's are)
                images = images.copy()
            return torch.from_numpy(np.ascontiguousarray(images))
        if isinstance(images, torch.Tensor):
            if images.dtype != torch.uint8:
                raise TypeError(self._dtype_message(f"a {str(images.dtype).replace('torch.', '')} tensor"))
            return images
        raise TypeError(
            f"preprocess takes a uint8 tensor, a numpy uint8 array, a PIL image or a list of them; got "
            f"{type(images).__name__}"
        )

    def _dtype_message(self, got: str) -> str:
        return (
            f"preprocess takes raw images with uint8 values 0-255 (as image files and idx files hold them); got "
            f"{got}. If it holds 0-1 values (ToTensor), pass (x * 255).round().to(torch.uint8); if it is already "
            f"normalised, give it to the model directly"
        )

    def _as_batch(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) from any of the accepted layouts, chosen by matching the model's input shape."""
        c, h, w = self.input_shape
        shape = tuple(x.shape)
        if x.dim() == 2 and c == 1 and shape == (h, w):
            return x.view(1, 1, h, w)
        if x.dim() == 3:
            if shape == (c, h, w):
                return x.unsqueeze(0)
            if c == 1 and shape[1:] == (h, w):  # (N, H, W): a stack of grey images
                return x.unsqueeze(1)
            if shape == (h, w, c):
                return x.permute(2, 0, 1).unsqueeze(0)
        if x.dim() == 4:
            if shape[1:] == (c, h, w):
                return x
            if shape[1:] == (h, w, c):
                return x.permute(0, 3, 1, 2)
        grey = "(H, W), (N, H, W), " if c == 1 else ""
        raise ValueError(
            f"preprocess got images shaped {shape}; this model takes {c} channel(s) of {h}x{w}: pass {grey}"
            f"(C, H, W), (H, W, C), (N, C, H, W) or (N, H, W, C) with C={c}, H={h}, W={w} (resize them first; "
            f"nothing is resized here)"
        )


def _is_pil_image(obj) -> bool:
    try:
        from PIL import Image
    except ImportError:
        return False
    return isinstance(obj, Image.Image)


def _stored_preprocess(ckpt: dict) -> dict:
    """The checkpoint's preprocess entry; for an older checkpoint, rebuilt from its dataset name."""
    info = ckpt.get("preprocess")
    if isinstance(info, dict):
        return info
    # Checkpoints from before the entry existed: the built-in sets' statistics and imagefolder's
    # transform are fixed in kdc's code, so they are known from the name alone.
    dataset = ckpt.get("dataset") or ckpt.get("recipe", {}).get("data", {}).get("dataset") or "?"
    return preprocess_info(str(dataset), ckpt["arch"]["input_shape"])


def load_model(
    path: str | Path, device: str | torch.device = "cpu", allow_import: bool = False
) -> tuple[nn.Module, Preprocess]:
    """Load a kdc stage checkpoint: ``(model, preprocess)``, the model in eval mode on ``device``.

    The checkpoint is checked against its manifest and loaded with
    ``weights_only=True``; the network is rebuilt from its architecture spec.
    ``preprocess(images)`` turns raw uint8 images (0-255) into the normalised
    batch the model was trained on; ``preprocess.classes`` names the labels
    (see :class:`Preprocess`). For a checkpoint written before kdc recorded
    preprocessing, it is rebuilt from the dataset name for the built-in sets
    and imagefolder; for a user's own dataset ``preprocess.known`` is False
    and calling it raises an error, since kdc never knew that transform.

    A model built by your own factory (``package.module:factory``) means
    importing and calling code named in the file; kdc does that only with
    ``allow_import=True``, for checkpoints you trust.

    Example::

        >>> model, preprocess = load_model("runs/quickstart/pruned/model.pt")  # doctest: +SKIP
        >>> model(preprocess(images)).argmax(1)  # doctest: +SKIP
    """
    path = Path(path)
    ckpt = load_checkpoint(path)
    arch = ckpt.get("arch")
    if not isinstance(arch, dict) or not isinstance(arch.get("model"), str) or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{path} has no model architecture or weights; is it a stage checkpoint (<stage>/model.pt)?"
        )
    model = build_from_checkpoint(ckpt, where=str(path), allow_import=allow_import)
    try:
        preprocess = Preprocess(_stored_preprocess(ckpt), device)
        if preprocess.input_shape != tuple(arch["input_shape"]):
            raise ValueError(
                f"it describes inputs shaped {preprocess.input_shape}, the model takes {tuple(arch['input_shape'])}"
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: its 'preprocess' entry is damaged ({type(exc).__name__}: {exc}); rerun the stage with --force"
        ) from None
    return model.to(device).eval(), preprocess
