"""Models by name: built-in nets, torchvision classifiers, and a user's own factory.

A model entry in a recipe is a name plus keyword arguments::

    model: mlp                      # built-in: mlp, cnn, lenet5
    args: {hidden: [100]}

    model: torchvision:resnet18     # any torchvision classification model

    model: mypkg.nets:build         # your own factory, imported from your code
    args: {width: 64}

Import paths are looked up as ``python -m`` would: in the current directory
and in the folders of the recipes loaded (see :func:`kdcompress.names.add_import_dir`), then on
``sys.path``.

Every factory receives ``num_classes`` and ``input_shape`` (C, H, W) when its
signature accepts them, so a user's factory can size itself to the data.

Example::

    >>> from kdcompress.models import build_model
    >>> net = build_model({"model": "mlp", "args": {"hidden": [100]}, "num_classes": 10, "input_shape": [1, 28, 28]})
    >>> sum(p.numel() for p in net.parameters())
    79510
"""

from __future__ import annotations

import difflib
import inspect
from typing import Callable

import torch
from torch import nn

from .errors import CheckpointError, ModelError
from .names import import_factory, names_user_code, torchvision_name_problem, unknown_model

__all__ = [
    "MLP",
    "MaxPool2x2",
    "SmallCNN",
    "LeNet5",
    "BUILTIN_MODELS",
    "build_model",
    "build_from_checkpoint",
    "check_architecture",
    "model_spec",
    "check_model_name",
]


class MLP(nn.Module):
    """Fully connected classifier: flatten, then ``hidden`` layers with ReLU and dropout."""

    def __init__(self, input_shape=(1, 28, 28), num_classes=10, hidden=(100,), dropout=0.0):
        super().__init__()
        in_features = 1
        for d in input_shape:
            in_features *= int(d)
        layers: list[nn.Module] = [nn.Flatten()]
        for width in hidden:
            layers += [nn.Linear(in_features, int(width)), nn.ReLU(inplace=True)]
            if dropout:
                layers.append(nn.Dropout(float(dropout)))
            in_features = int(width)
        layers.append(nn.Linear(in_features, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class MaxPool2x2(nn.MaxPool2d):
    """A 2x2, stride-2 max-pool (``nn.MaxPool2d(2)``) that, on CPU without gradients, takes two elementwise maxima.

    ATen's CPU max-pool kernel is not vectorised in the default (NCHW) layout: it was nearly half of the CNN
    student's forward pass. The maximum of a 2x2 window is the maximum of its two rows' maxima, and
    ``torch.maximum`` over row pairs and then column pairs runs vectorised along each row: a 64x32x28x28 batch
    pooled in 0.93 ms against 9.0 ms for ``nn.MaxPool2d`` (and 2.5 ms through a channels-last copy) on this
    project's 2-core machine (``scripts/bench_pool.py``, docs/speed.md). A maximum is exact, so inference outputs are the same
    numbers. Training takes ``nn.MaxPool2d``'s own path (its gradient goes to one element of a tied window, where
    ``torch.maximum``'s would be split), as do other devices and tracing for export.
    """

    def __init__(self):
        super().__init__(2)

    def forward(self, x):
        if (
            x.device.type == "cpu"
            and x.dim() == 4
            and min(x.shape[2:]) >= 2  # smaller: nn.MaxPool2d's own error
            and not torch.is_grad_enabled()
            and not torch.jit.is_tracing()
            and not torch.jit.is_scripting()
            and not torch.compiler.is_compiling()
        ):
            h, w = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2  # floor mode: an odd last row or column is dropped
            rows = torch.maximum(x[:, :, 0:h:2, :w], x[:, :, 1:h:2, :w])
            return torch.maximum(rows[..., 0::2], rows[..., 1::2])
        return super().forward(x)


class SmallCNN(nn.Module):
    """Two or more 3x3 conv blocks (conv, BN, ReLU, 2x2 max-pool), then a hidden linear layer."""

    def __init__(self, input_shape=(1, 28, 28), num_classes=10, channels=(32, 64), hidden=128, dropout=0.0):
        super().__init__()
        c, h, w = (int(d) for d in input_shape)
        blocks: list[nn.Module] = []
        for out in channels:
            blocks += [
                nn.Conv2d(c, int(out), 3, padding=1, bias=False),
                nn.BatchNorm2d(int(out)),
                nn.ReLU(inplace=True),
            ]
            blocks.append(MaxPool2x2())
            c, h, w = int(out), h // 2, w // 2
        self.features = nn.Sequential(*blocks)
        head: list[nn.Module] = [nn.Flatten(), nn.Linear(c * h * w, int(hidden)), nn.ReLU(inplace=True)]
        if dropout:
            head.append(nn.Dropout(float(dropout)))
        head.append(nn.Linear(int(hidden), num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x):
        return self.classifier(self.features(x))


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling, for 28x28 or 32x32 inputs."""

    def __init__(self, input_shape=(1, 28, 28), num_classes=10):
        super().__init__()
        c, h, _ = (int(d) for d in input_shape)
        pad = 2 if h == 28 else 0
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=pad),
            nn.ReLU(inplace=True),
            MaxPool2x2(),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(inplace=True),
            MaxPool2x2(),
        )
        side = ((h + 2 * pad - 4) // 2 - 4) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * side * side, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "cnn": SmallCNN, "lenet5": LeNet5}


def model_spec(name: str, args: dict, num_classes: int, input_shape) -> dict:
    """The architecture spec stored in checkpoints: enough to rebuild the network."""
    return {
        "model": name,
        "args": dict(args),
        "num_classes": int(num_classes),
        "input_shape": [int(d) for d in input_shape],
    }


def check_model_name(
    name: str, expected: str | None, where: str, allow_import: bool = False, fix: str | None = None
) -> None:
    """Refuse to build the model a file names unless the recipe names it too: CheckpointError naming both.

    A model name read from a checkpoint or an artifact is data, never an instruction. ``expected`` is the
    name the recipe the user gave has for that model (``teacher.model`` or ``student.model``); any other
    name is refused, a built-in one included. With no recipe to compare with (``expected=None``) a built-in
    or torchvision model is built, and one of your own code only with ``allow_import=True``, the library's
    explicit opt-in (:func:`kdcompress.load_model`, :func:`kdcompress.export.load_artifact`).
    ``fix`` replaces the advice for a mismatch (by default: make the file again, or remove it).
    Example: ``check_model_name("evil:build", "mlp", "pruned checkpoint")`` raises, naming both.
    """
    if expected is not None:
        if name != expected:
            raise CheckpointError(
                f"{where} names the model '{name}' but the recipe says '{expected}'; kdc builds only the models "
                f"your recipe names: "
                + (fix or "rerun the stage with --force (kdc export --force for an exported file), or remove the file")
            )
    elif names_user_code(name) and not allow_import:
        raise CheckpointError(
            f"{where} names the model '{name}', built by your own code; kdc imports code a file names only when "
            f"asked: give the recipe that names it, or pass allow_import=True if you trust this file"
        )


def build_model(spec: dict, where: str = "model") -> nn.Module:
    """Build a network from an architecture spec (see :func:`model_spec`).

    ``where`` names the recipe section in error messages (``teacher.model``).
    """
    name, args = spec["model"], dict(spec.get("args") or {})
    num_classes, input_shape = spec["num_classes"], tuple(spec["input_shape"])
    if name.startswith("torchvision:"):
        return _torchvision_model(name.split(":", 1)[1], args, num_classes, input_shape, where)
    if ":" in name:
        factory = import_factory(name, where)
    elif name in BUILTIN_MODELS:
        factory = BUILTIN_MODELS[name]
    else:
        raise ModelError(f"{where}: {unknown_model(name)}")
    return _call_factory(factory, name, args, num_classes, input_shape, where)


def build_from_checkpoint(
    ckpt: dict, where: str = "checkpoint", expected: str | None = None, allow_import: bool = False
) -> nn.Module:
    """The network a stage checkpoint holds: built from its spec, given its pruned shapes, weights loaded.

    ``ckpt`` is the dict of a kdc checkpoint (loaded with
    ``weights_only=True``): ``arch`` (the spec), ``state_dict`` and, for a
    model pruned structurally, ``structure``, the pruning history that
    :func:`kdcompress.prune.structured.apply_structure` replays on the fresh build
    so the smaller weights fit. ``where`` names the checkpoint in error
    messages. Weights that do not fit raise CheckpointError. The model is
    returned on the CPU, in training mode.

    The model name in ``arch`` is data: it is built only when it equals
    ``expected``, the name your recipe gives that model; without ``expected``,
    a model of your own code needs ``allow_import=True``
    (see :func:`check_model_name`).

    Example::

        >>> ckpt = load_checkpoint(Path("runs/quickstart/pruned/model.pt"))  # doctest: +SKIP
        >>> model = build_from_checkpoint(ckpt, where="pruned checkpoint").eval()  # doctest: +SKIP
    """
    problem = _spec_problem(ckpt.get("arch"))  # the name is read only from a spec of the right shape
    if problem:
        raise CheckpointError(f"{where}: its architecture entry is damaged ({problem}); rerun the stage with --force")
    check_model_name(ckpt["arch"]["model"], expected, where, allow_import)  # before anything is built, meta too
    check_architecture(ckpt, where)  # the file's entries are data: checked before the network takes any memory
    model = build_model(ckpt["arch"], where=where)
    structure = ckpt.get("structure")
    if structure:
        from .prune.structured import apply_structure  # torch-pruning is imported only for structured checkpoints

        try:
            apply_structure(model, structure, ckpt["arch"]["input_shape"])
        except ValueError as exc:
            raise CheckpointError(
                f"{where}: its 'structure' entry cannot be rebuilt ({exc}); rerun the stage with --force"
            ) from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        # load_state_dict names the first mismatch on its second line
        detail = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])[:300]
        raise CheckpointError(
            f"{where}: its weights do not fit the architecture it names ({detail}); rerun the stage with --force"
        ) from None
    return model


# The bytes of weights the architecture named in a checkpoint or artifact may hold, at most: ARCH_RATIO times the
# weights the file holds, but never less than ARCH_FLOOR. An architecture is sized by its arguments, so a 2 KB file
# naming mlp with hidden [200000] would otherwise make kdc allocate 600 MB before finding that no weights fit it.
# A file's weights fill its architecture exactly, or, pruned structurally, a part of it far above 1/1024.
ARCH_RATIO = 1024
ARCH_FLOOR = 64 * 2**20


def _spec_problem(arch) -> str | None:
    """What makes an architecture spec read from a file unbuildable before any code runs, or None."""
    if not isinstance(arch, dict):
        return "it is not a mapping"
    if not isinstance(arch.get("model"), str):
        return "its 'model' is not a name"
    if not isinstance(arch.get("args") or {}, dict):
        return "its 'args' are not a mapping"
    classes, shape = arch.get("num_classes"), arch.get("input_shape")
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
        return "its 'num_classes' is not a positive whole number"
    if (
        not isinstance(shape, (list, tuple))
        or not 1 <= len(shape) <= 4
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
    ):
        return "its 'input_shape' is not a list of 1 to 4 positive whole numbers"
    return None


def check_architecture(ckpt: dict, where: str = "checkpoint") -> None:
    """CheckpointError, before anything is built, when a checkpoint's architecture and weights cannot be kdc's.

    ``ckpt`` is read from a file, so it is checked as data: ``arch`` must be a spec of the right shape, and
    ``state_dict`` a mapping of names to tensors. Then the network is built on PyTorch's meta device (shapes
    without memory) and its parameters and buffers are weighed against the weights the file holds (see
    ``ARCH_RATIO``). A factory that cannot be built there is left to the real build, which reports whatever
    is wrong with it.
    """
    again = "rerun the stage with --force (or export the model again)"
    problem = _spec_problem(ckpt.get("arch"))
    if problem:
        raise CheckpointError(f"{where}: its architecture entry is damaged ({problem}); {again}")
    state = ckpt.get("state_dict")
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{where}: its weights are damaged (not a mapping of names to tensors); {again}")
    try:
        with torch.device("meta"):
            skeleton = build_model(ckpt["arch"], where=where)
    except Exception:  # the real build raises the same error with its message, or builds what meta could not
        return
    declared = sum(t.numel() * t.element_size() for t in skeleton.state_dict().values())
    present = sum(t.numel() * t.element_size() for t in state.values())
    if declared > max(ARCH_FLOOR, ARCH_RATIO * present):
        raise CheckpointError(
            f"{where}: the architecture it names ({ckpt['arch']['model']!r} with args "
            f"{str(ckpt['arch'].get('args'))[:200]}) holds {declared:,} bytes of weights, far more than the "
            f"{present:,} it holds; it is damaged or crafted, and the model was not built. {again[0].upper()}{again[1:]}"
        )


def _call_factory(factory, name, args, num_classes, input_shape, where) -> nn.Module:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = dict(args)
    if "num_classes" in params or takes_any:
        kwargs.setdefault("num_classes", num_classes)
    if "input_shape" in params or takes_any:
        kwargs.setdefault("input_shape", input_shape)
    unknown = [k for k in args if params and k not in params and not takes_any]
    if unknown:
        accepted = [p for p in params if p not in ("self", "num_classes", "input_shape")]
        hint = "".join(
            f"; did you mean '{c[0]}' for '{k}'?" for k in unknown if (c := difflib.get_close_matches(k, accepted, n=1))
        )
        raise ModelError(
            f"{where}.args: {name} does not take {', '.join(map(repr, unknown))}{hint} (it takes: "
            f"{', '.join(accepted) or 'no arguments'})"
        )
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise ModelError(f"{where}: building '{name}' with args {args} failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{where}: '{name}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _torchvision_model(name, args, num_classes, input_shape, where) -> nn.Module:
    from torchvision import models as tvm  # only here: importing torchvision takes a second or two

    error = torchvision_name_problem(name)
    if error:
        raise ModelError(f"{where}: {error}")
    if args.get("weights"):
        raise ModelError(
            f"{where}.args.weights: pretrained weights are downloaded at run time, which kdc does not do; "
            f"drop 'weights' (training starts from scratch), or, for the teacher, set teacher.pretrained: true (the "
            f"weights then come from the local torch hub cache)"
        )
    try:
        model = tvm.get_model(name, weights=None, num_classes=num_classes, **args)
    except Exception as exc:
        raise ModelError(f"{where}: building torchvision:{name} with args {args} failed: {exc}") from None
    _adapt_input_channels(model, int(input_shape[0]))
    return model


def _adapt_input_channels(model: nn.Module, channels: int) -> None:
    """Swap the first Conv2d for one that takes ``channels`` inputs (e.g. grayscale)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != channels:
                    setattr(
                        parent,
                        child_name,
                        nn.Conv2d(
                            channels,
                            child.out_channels,
                            child.kernel_size,
                            child.stride,
                            child.padding,
                            child.dilation,
                            child.groups,
                            child.bias is not None,
                        ),
                    )
                return
