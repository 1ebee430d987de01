"""Teachers you bring: your own trained weights (``teacher.checkpoint``) or torchvision's (``teacher.pretrained``).

``teacher.checkpoint: PATH`` names a file the teacher stage uses instead of training one: a plain
state_dict (``torch.save(model.state_dict(), PATH)``) of the recipe's ``teacher.model``/``teacher.args``,
or a kdc checkpoint (``<run dir>/teacher/model.pt`` of another run), whose architecture, pruned structure
and preprocessing come from the file. Either is read with ``torch.load(..., weights_only=True)``: a file
that holds code is refused, and the code never runs::

    >>> model, spec, info = supplied_teacher(recipe, num_classes=10, input_shape=(1, 28, 28))  # doctest: +SKIP
    >>> info["supplied_from"], info["supplied_format"]  # doctest: +SKIP
    ('/home/me/teacher.pt', 'state_dict')

``teacher.pretrained: true`` starts a ``torchvision:NAME`` teacher from torchvision's ImageNet weights,
read from the local torch hub cache (``torch.hub.get_dir()/checkpoints/<file>``) and never downloaded.
A dataset with other than 1000 classes gets a new, freshly initialised classifier head (the weights
whose shape is [1000, ...] in the file and [classes, ...] in the model); grey images get the first
convolution's RGB weights summed over the colour channels, so a grey image gives what the same image
in RGB (R = G = B) would. The teacher then trains for ``teacher.epochs`` from there.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from .checkpoint import FORMAT
from .errors import CheckpointError, ModelError, describe
from .models import build_model, check_model_name, model_spec
from .run.stages import file_sha256

__all__ = ["read_weights_file", "supplied_teacher", "pretrained_file", "load_pretrained"]


def read_weights_file(path: str | Path, where: str) -> dict:
    """The dict a weights file holds, loaded with ``weights_only=True``; CheckpointError (naming ``where``) if not."""
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{where}: {path} was refused: it holds more than tensors and plain data, so loading it could run "
            f"code, and kdc loads weights only ({describe(exc).splitlines()[0][:200]}). Save the weights alone: "
            f"torch.save(model.state_dict(), PATH)"
        ) from None
    except Exception as exc:  # not a torch file, truncated, ...
        raise CheckpointError(
            f"{where}: {path} is not a weights file torch can read ({type(exc).__name__}: "
            f"{describe(exc).splitlines()[0][:200]}); save one with torch.save(model.state_dict(), PATH)"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{where}: {path} holds {type(data).__name__}, not a state_dict or a kdc checkpoint; save one with "
            f"torch.save(model.state_dict(), PATH)"
        )
    return data


def _is_state_dict(data: dict) -> bool:
    return bool(data) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items())


def _first_mismatch(model: nn.Module, weights: dict) -> str | None:
    """The first key of ``model``'s state_dict that ``weights`` lacks or gives another shape, in words; else None."""
    own = model.state_dict()
    for key, tensor in own.items():
        if key not in weights:
            return f"the file has no '{key}'"
        if tuple(weights[key].shape) != tuple(tensor.shape):
            return f"'{key}' is {list(weights[key].shape)} in the file, {list(tensor.shape)} in the model"
    extra = [k for k in weights if k not in own]
    if extra:
        return f"the file has '{extra[0]}', which the model has not" + (
            f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        )
    return None


def _same_preprocess(theirs: dict, ours: dict) -> bool:
    """Whether a teacher fed as ``theirs`` says sees what the run feeds it (``ours``): shape, scale, mean, std."""
    if not (theirs.get("known") and ours.get("known")):
        return True  # a user's own dataset: kdc cannot tell, and does not guess

    def close(a, b):
        return (
            a is None
            and b is None
            or (a is not None and b is not None and len(a) == len(b) and all(abs(x - y) < 1e-6 for x, y in zip(a, b)))
        )

    return (
        list(theirs.get("input_shape") or []) == list(ours.get("input_shape") or [])
        and close([theirs.get("scale")], [ours.get("scale")])
        and close(theirs.get("mean"), ours.get("mean"))
        and close(theirs.get("std"), ours.get("std"))
    )


def supplied_teacher(recipe, num_classes: int, input_shape, preprocess: dict | None = None):
    """The teacher ``teacher.checkpoint`` names, weights loaded: ``(model, spec, info)``, on the CPU.

    ``info`` holds ``supplied_from`` (the file), ``supplied_sha256``, ``supplied_format`` (``state_dict``
    or ``kdc checkpoint``) and, for a structurally pruned kdc checkpoint, ``structure``. ``preprocess`` is
    the run's (:func:`kdcompress.data.preprocess_info`): a kdc checkpoint that was fed other inputs is
    refused. Weights that do not fit raise ModelError naming the first mismatching key.
    """
    t = recipe.teacher
    path = Path(t.checkpoint)
    where = "teacher.checkpoint"
    data = read_weights_file(path, where)
    info = {"supplied_from": str(path), "supplied_sha256": file_sha256(str(path))}
    shape = [int(d) for d in input_shape]
    if data.get("format") == FORMAT:
        spec, weights = data.get("arch"), data.get("state_dict")
        if not isinstance(spec, dict) or not isinstance(spec.get("model"), str) or not isinstance(weights, dict):
            raise ModelError(
                f"{where}: {path} is a kdc checkpoint without an architecture or weights; give a "
                f"stage checkpoint (<run dir>/<stage>/model.pt)"
            )
        name = spec["model"]
        # a recipe is code its user chose to run; a file is not: build only the model the recipe names (the
        # teacher stage's checkpoint then names teacher.model, as every later stage expects)
        check_model_name(
            name,
            t.model,
            f"{where}: {path}",
            fix=f"set teacher.model: {name} (and teacher.args) if that is your teacher and you trust it",
        )
        if list(spec.get("input_shape") or []) != shape or int(spec.get("num_classes", -1)) != int(num_classes):
            raise ModelError(
                f"{where}: {path} holds a {name} for inputs {spec.get('input_shape')} and {spec.get('num_classes')} "
                f"classes; {recipe.data.dataset} has inputs {shape} and {num_classes} classes. Give a teacher "
                f"trained on this kind of data"
            )
        theirs = data.get("preprocess")
        if preprocess is not None and isinstance(theirs, dict) and not _same_preprocess(theirs, preprocess):
            raise ModelError(
                f"{where}: {path} was trained on {theirs.get('dataset')} inputs normalised with mean "
                f"{theirs.get('mean')}, std {theirs.get('std')}; this run feeds {recipe.data.dataset} inputs with mean "
                f"{preprocess.get('mean')}, std {preprocess.get('std')}, which the teacher would misread. Give a "
                f"teacher trained with this run's normalisation"
            )
        if data.get("structure"):
            info["structure"] = data["structure"]
        info["supplied_format"] = "kdc checkpoint"
    elif _is_state_dict(data):
        spec, weights = model_spec(t.model, t.args, num_classes, shape), data
        info["supplied_format"] = "state_dict"
    else:
        keys = ", ".join(repr(k) for k in list(data)[:5])
        raise ModelError(
            f"{where}: {path} is neither a state_dict (names -> tensors) nor a kdc checkpoint (its keys: {keys}); "
            f"save the weights alone with torch.save(model.state_dict(), PATH)"
        )
    model = build_model(spec, where="teacher.model")
    if info.get("structure"):
        from .prune.structured import apply_structure  # torch-pruning is imported only for structured checkpoints

        try:
            apply_structure(model, info["structure"], shape)
        except ValueError as exc:
            raise ModelError(f"{where}: {path}: its 'structure' entry cannot be rebuilt ({exc})") from None
    mismatch = _first_mismatch(model, weights)
    if mismatch:
        fix = (
            "set teacher.model and teacher.args to the architecture the weights were saved from"
            if info["supplied_format"] == "state_dict"
            else "the checkpoint is damaged; rerun its stage"
        )
        raise ModelError(
            f"{where}: the weights in {path} do not fit {spec['model']} {spec.get('args') or ''} "
            f"({num_classes} classes, inputs {shape}): {mismatch}; {fix}"
        )
    model.load_state_dict(weights)
    return model, spec, info


def pretrained_file(model_name: str) -> tuple[Path, str]:
    """Where torchvision keeps the default ImageNet weights of ``model_name`` (``resnet18``), and their URL.

    The file is ``torch.hub.get_dir()/checkpoints/<the last part of the URL>``: where torchvision itself
    caches them (``TORCH_HOME`` moves it).
    """
    from torchvision import models as tvm

    try:
        weights = tvm.get_model_weights(model_name).DEFAULT
    except Exception as exc:  # a model torchvision has no weights for
        raise ModelError(
            f"teacher.pretrained: torchvision has no pretrained weights for {model_name} "
            f"({describe(exc)}); set teacher.pretrained: false"
        ) from None
    url = weights.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1], url


def load_pretrained(model: nn.Module, model_name: str) -> dict:
    """Load torchvision's default weights for ``model_name`` into ``model`` from the local hub cache; never download.

    ``model`` was built by kdc for the run's classes and channels. Weights of another shape are taken
    only where that is meant: the classifier head ([1000, ...] in the file, freshly initialised in the
    model) and a grey first convolution (the RGB weights summed). Returns what to record in the metrics.
    """
    path, url = pretrained_file(model_name)
    if not path.is_file():
        raise ModelError(
            f"teacher.pretrained: the weights of torchvision:{model_name} are not in the torch hub cache: looked for "
            f'{path}. kdc never downloads; fetch {url} on a machine with internet (or run python -c "import '
            f"torchvision; torchvision.models.get_model('{model_name}', weights='DEFAULT')\" there) and copy the "
            f"file to that path (TORCH_HOME moves the cache)"
        )
    weights = read_weights_file(path, "teacher.pretrained")
    own = model.state_dict()
    first_conv = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    loaded, head = {}, []
    for key, tensor in own.items():
        theirs = weights.get(key)
        if theirs is None:
            raise ModelError(
                f"teacher.pretrained: {path} has no '{key}' for torchvision:{model_name}; is the file "
                f"the one torchvision gives for {model_name}?"
            )
        if theirs.shape == tensor.shape:
            loaded[key] = theirs
        elif key == f"{first_conv}.weight" and theirs.dim() == 4 and tensor.shape[1] == 1 and theirs.shape[1] == 3:
            loaded[key] = theirs.sum(dim=1, keepdim=True)  # grey = R = G = B: the same response as the RGB image
        elif theirs.shape[0] == 1000 and theirs.shape[1:] == tensor.shape[1:]:
            loaded[key] = tensor  # the classifier head, for the run's classes: left as the model initialised it
            head.append(key)
        else:
            raise ModelError(
                f"teacher.pretrained: '{key}' is {list(theirs.shape)} in {path}, {list(tensor.shape)} in "
                f"torchvision:{model_name} as built for this data; pretrained weights do not fit it"
            )
    model.load_state_dict(loaded)
    info = {"pretrained_from": str(path)}
    if head:
        info["pretrained_new_head"] = head
    return info
