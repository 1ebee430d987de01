"""The one training loop every stage uses, and evaluation.

A stage differs only in the loss it hands to :func:`fit` and in the hooks it
adds (the pruner re-applies its masks after each optimiser step and takes a
pruning step on its schedule). Example::

    >>> import torch.nn.functional as F
    >>> from kdcompress.train import fit
    >>> history = fit(model, lambda logits, y, idx, x: F.cross_entropy(logits, y), splits, settings,
    ...               batch_size=128, stage="student")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn
from torch.optim.sgd import sgd

from . import distributed
from .checkpoint import refuse_oversized, save_state
from .data import Augment, DataSplits, TensorData
from .errors import CheckpointError, KdcError, describe
from .files import append_jsonl, atomic_write_text
from .progress import RunProgress
from .recipe import TrainSettings

__all__ = [
    "fit",
    "evaluate",
    "device_words",
    "recalibrate_batchnorm",
    "has_batchnorm",
    "Hook",
    "make_optimizer",
    "make_scheduler",
    "step_function",
    "resolve_device",
    "seed_everything",
    "Runtime",
    "CHECK_EVERY",
]

CHECK_EVERY = 10  # batches between the loss checks (and progress updates): one device sync each

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Hook:
    """Callbacks into :func:`fit`; every method is optional."""

    def on_batch_start(self, step: int, batches_per_epoch: int) -> bool | None:
        """Before the forward pass of global batch ``step`` (0-based, counted over all epochs).

        Return True when the model's parameters were replaced (structured
        pruning removed channels): :func:`fit` then builds a new optimiser for
        them. None or False: they are the same tensors as before.
        """

    def after_optimizer_step(self, step: int) -> None:
        """Right after ``optimizer.step()``."""

    def epoch_metrics(self) -> dict:
        """Extra values recorded with each epoch's metrics."""
        return {}

    def on_epoch_end(self, record: dict) -> None:
        """After an epoch, with its complete metrics record (what metrics.jsonl gets), on every process."""

    def state_dict(self) -> dict:
        """What the hook needs to resume (tensors and plain data only)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available, else cpu; ``cpu``, ``cuda``, ``cuda:N`` as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KdcError(f"run.device: '{name}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdcError("run.device: cuda was asked for but no CUDA GPU is available; use device: auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise KdcError(
            f"run.device: {name} was asked for but this machine has {torch.cuda.device_count()} CUDA GPU(s), "
            f"numbered from 0; use device: cuda or cuda:0"
        )
    if device.type not in ("cpu", "cuda"):
        raise KdcError(f"run.device: '{name}' is not supported; use auto, cpu, cuda or cuda:N")
    return device


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    """The recipe's optimiser, with torch's fused kernel where the parameters' device has one.

    A fused step is one kernel for all parameters instead of several per
    parameter (measured on this project's 2-core CPU for the 784-100-10 MLP:
    SGD 39 -> 23 us, Adam 116 -> 46 us per step); the update is the same
    formula. Where fusing is not supported (older torch, other devices, mixed
    dtypes), the plain implementation is used.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if s.optimizer == "sgd":
        cls, kwargs = torch.optim.SGD, dict(lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    elif s.optimizer == "adam":
        cls, kwargs = torch.optim.Adam, dict(lr=s.lr, weight_decay=s.weight_decay)
    else:
        cls, kwargs = torch.optim.AdamW, dict(lr=s.lr, weight_decay=s.weight_decay)
    if params and all(p.is_floating_point() for p in params):
        try:
            return cls(params, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):
            pass
    return cls(params, **kwargs)


def step_function(optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """A call that does ``optimizer.step()``; for fused SGD, torch's functional update without the method's
    per-call bookkeeping.

    ``Optimizer.step`` wraps every call in a profiler range, looks for step
    hooks, switches grad mode and regroups the parameters and momentum
    buffers; for the 784-100-10 MLP on this project's 2-core CPU a call took
    66 us, this one 43 us (``python scripts/bench_step.py``). With the short
    spin ``kdc`` trains with, the worker threads also fall asleep during such
    a stretch of Python, so the whole epoch gained more than the calls' own
    time. The update is the same call SGD.step makes, on the same
    tensors, so the weights are bit for bit the same; the optimiser's state
    (its momentum buffers, updated in place) stays what ``state_dict`` saves.
    kdc registers no optimiser hooks. Until every parameter has a gradient
    and a momentum buffer (the first step creates the buffers), and for other
    optimisers, ``optimizer.step`` itself runs.
    """
    groups = optimizer.param_groups
    if type(optimizer) is not torch.optim.SGD or len(groups) != 1:
        return optimizer.step
    group = groups[0]
    if not group.get("fused") or group.get("differentiable") or group["momentum"] == 0:
        return optimizer.step
    params, state = group["params"], optimizer.state

    def step() -> None:
        grads = [p.grad for p in params]
        buffers = [state[p].get("momentum_buffer") if p in state else None for p in params]
        if any(t is None for t in grads) or any(t is None for t in buffers):
            optimizer.step()
            return
        sgd(
            params,
            grads,
            buffers,
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            fused=True,
        )

    return step


def make_scheduler(optimizer: torch.optim.Optimizer, s: TrainSettings):
    """Per-epoch learning-rate schedule."""
    if s.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=s.step_size, gamma=s.gamma)
    if s.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, s.epochs))
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


@torch.no_grad()
def evaluate(
    model: nn.Module, data: TensorData, batch_size: int, device: torch.device, confusion: bool = False
) -> dict:
    """Mean cross-entropy and accuracy (0-1) of ``model`` on ``data``.

    With ``confusion``, also ``"confusion"``: the confusion matrix as a list of lists of ints, one row per
    true class and one column per predicted class (as many as the model has outputs), so that
    ``confusion[i][j]`` counts the images of class i predicted as j. Example::

        >>> evaluate(model, splits.test, 1000, torch.device("cpu"), confusion=True)["confusion"][0][:3]  # doctest: +SKIP
        [812, 3, 21]
    """
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    counts = None  # on the device, flattened (true * classes + predicted): one transfer at the end
    for x, y, _ in data.batches(batch_size):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        predicted = logits.argmax(1)
        correct += int((predicted == y).sum())
        n += len(y)
        if confusion:
            classes = logits.shape[1]
            batch_counts = torch.bincount(y * classes + predicted, minlength=classes * classes)
            counts = batch_counts if counts is None else counts + batch_counts
    model.train(was_training)
    result = {"loss": loss_sum / max(1, n), "accuracy": correct / max(1, n)}
    if confusion:
        flat = counts.tolist() if counts is not None else []
        classes = int(len(flat) ** 0.5 + 0.5)
        result["confusion"] = [[int(c) for c in flat[i * classes : (i + 1) * classes]] for i in range(classes)]
    return result


def device_words(device: torch.device | str) -> str:
    """The device a model ran on, for reports: ``"cpu"`` or ``"cuda:0 (NVIDIA H200)"``.

    >>> device_words("cpu")
    'cpu'
    """
    device = torch.device(device)
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer that keeps running statistics."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


def recalibrate_batchnorm(
    model: nn.Module, data: TensorData, batches: int, batch_size: int, device: torch.device | str = "cpu", seed: int = 0
) -> int:
    """Recompute every BatchNorm layer's running mean and variance from ``batches`` training batches.

    BatchNorm evaluates with running statistics that follow the weights only
    slowly (torchvision's MobileNetV3 uses momentum 0.01): after a few epochs
    they can lag so far behind that the model sits at chance on the test set
    while its training accuracy is high. This resets them and averages over
    the batches (momentum None: a cumulative average, every batch counts the
    same), in train mode without gradients, then restores the momenta and the
    model's mode (``torch.optim.swa_utils.update_bn``). Batches are
    unaugmented and drawn in a fixed shuffled order from ``seed``, so every
    process of a distributed run computes the same statistics. Weights are
    untouched. Returns the number of batches used (0 when the model has no
    BatchNorm or ``batches`` is 0).

    Example::

        >>> recalibrate_batchnorm(model, splits.train, batches=100, batch_size=128)  # doctest: +SKIP
        79
    """
    if batches <= 0 or not has_batchnorm(model):
        return 0
    from itertools import islice

    from torch.optim.swa_utils import update_bn

    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    used = 0

    def inputs():  # one batch in memory at a time
        nonlocal used
        for x, _, _ in islice(data.batches(batch_size, shuffle=True, generator=generator), batches):
            used += 1
            yield x

    update_bn(inputs(), model, device=device)
    return used


def _rng_state() -> dict:
    """Every RNG a training step touches, as tensors and plain data (safe for weights_only loading)."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "state": list(state), "gauss": py_gauss},
    }


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def _load_state(path: Path, tag: str, console: Console, stage: str) -> dict | None:
    """The resume state at ``path`` if it belongs to this run (same ``tag``), else None."""
    if path is None or not Path(path).is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"the resume state {path} is damaged or unsafe ({type(exc).__name__}: {describe(exc)}); "
            f"rerun with --restart to start the '{stage}' stage over"
        ) from None
    if not isinstance(state, dict) or not {"tag", "epoch", "model"} <= set(state):
        raise CheckpointError(f"the resume state {path} is not a kdc resume state; rerun with --restart")
    refuse_oversized(state, f"the resume state {path}", f"rerun with --restart to start the '{stage}' stage over")
    if state.get("tag") != tag:
        console.print(f"[yellow]{stage}[/]: the recipe changed since {path} was saved; starting the stage over")
        return None
    return state


class _Tally:
    """An epoch's running loss and accuracy, read back from the device once per window of batches.

    Reading a loss with ``.item()`` after every batch makes the CPU wait for
    the GPU each step; here the losses stay on the device until
    :meth:`flush`, which fetches the window's losses and the correct count
    in one transfer.
    """

    def __init__(self):
        self._losses: list[torch.Tensor] = []
        # each batch's predicted classes and labels, compared at the flush: one operation per batch, not four
        self._predicted: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self.loss_sum, self.correct, self.seen = 0.0, 0.0, 0
        # the epoch's first and largest batch losses: an epoch's mean hides a loss that exploded within it
        self.first_loss: float | None = None
        self.max_loss: float | None = None

    @property
    def pending(self) -> int:
        return len(self._losses)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self._losses.append(loss.detach())
        self._predicted.append(logits.detach().argmax(1))
        self._labels.append(y)

    def flush(self) -> tuple[int, float] | None:
        """Add the pending losses to the totals and return None; if one is NaN or infinite, return
        (how many batches back it was, 1 = the latest; its value) instead and leave the totals alone."""
        if not self._losses:
            return None
        right = torch.cat(self._predicted).eq_(torch.cat(self._labels)).sum().view(1)
        values = torch.cat([torch.stack(self._losses).double(), right.double()]).tolist()
        right = values.pop()
        for k, value in enumerate(values):
            if not math.isfinite(value):
                return len(values) - k, value
        if self.first_loss is None:
            self.first_loss = values[0]
        self.max_loss = max(values + ([self.max_loss] if self.max_loss is not None else []))
        sizes = [len(y) for y in self._labels]
        self.loss_sum += sum(v * n for v, n in zip(values, sizes))
        self.seen += sum(sizes)
        self.correct += right
        self._losses.clear()
        self._predicted.clear()
        self._labels.clear()
        return None

    def status(self) -> str:
        return f"loss {self.loss_sum / max(1, self.seen):.4f} acc {self.correct / max(1, self.seen):.3f}"


def _check_losses(
    tally: _Tally,
    step: int,
    epoch: int,
    batches_per_epoch: int,
    stage: str,
    settings: TrainSettings,
    state_path: Path | None,
) -> None:
    """Flush ``tally``; a NaN or infinite loss stops training with the epoch and step it happened at."""
    bad = tally.flush()
    if bad is None:
        return
    back, value = bad
    bad_step = step - back  # global 0-based index of the failing batch
    kept = f"; the last good state (epoch {epoch}) is kept in {state_path}" if state_path and epoch else ""
    raise KdcError(
        f"{stage}: the loss became {value} at epoch {epoch + 1}, step {bad_step % batches_per_epoch + 1} "
        f"of {batches_per_epoch}; lower the learning rate ({settings.lr}) or check the data{kept}"
    )


@dataclass(frozen=True)
class Runtime:
    """How to run, apart from what to train: precision, memory format, compilation, augmentation."""

    precision: str = "fp32"  # "bf16": autocast on CUDA
    channels_last: bool = False  # CUDA only
    compile: bool = False
    augment: Augment | None = None  # or anything with Augment's for_epoch and call (kdcompress.views.ViewAugment)


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    data: DataSplits,
    settings: TrainSettings,
    *,
    batch_size: int,
    eval_batch_size: int = 1000,
    device: torch.device | str = "cpu",
    seed: int = 0,
    stage: str = "train",
    metrics_path: Path | None = None,
    hooks: Iterable[Hook] = (),
    console: Console | None = None,
    state_path: Path | None = None,
    state_tag: str = "",
    runtime: Runtime = Runtime(),
    progress: RunProgress | None = None,
) -> list[dict]:
    """Train ``model`` in place for ``settings.epochs`` epochs; return one metrics dict per epoch.

    ``loss_fn(logits, labels, indices, inputs)`` gets the sample indices of
    the batch within ``data.train`` so a loss can look up per-sample targets
    (for example cached teacher logits), and the inputs for a teacher that
    must run online (augmented data). Each epoch is evaluated on the validation
    split if there is one, else on the test split for the learning curve only;
    nothing here picks a checkpoint by test accuracy.

    With ``state_path``, every epoch ends by saving everything needed to go
    on (model, optimiser, schedule, hook state such as pruning masks or a
    structured pruning history, RNG states, metrics so far); a later call
    with the same ``state_tag`` resumes after the last completed epoch and
    ends with the same result as an uninterrupted run.

    A hook whose :meth:`Hook.on_batch_start` returns True has changed the
    model's parameters (structured pruning replaces them with smaller ones);
    the optimiser is then built anew for them (see :func:`_rebuild_optimizer`).

    Under torch.distributed (see :mod:`kdcompress.distributed`) each rank
    trains a DistributedDataParallel copy on its shard, with ``batch_size``
    split across ranks; only rank 0 writes files and prints.

    ``metrics_path`` gets one JSON line per epoch as it ends (rewritten at the start to the epochs a
    resume state holds); kdc's stages give it a running log and write ``metrics.jsonl`` only with the
    finished checkpoint.

    ``progress`` shows the training (a bar on a terminal, a line per epoch, the time left); a run passes
    one that knows its later stages, so the time left covers the whole run. Without it, one for this
    stage alone is made on ``console``.
    """
    device = torch.device(device)
    main = distributed.is_main()
    console = console or Console(stderr=True)
    if not main:
        console = Console(stderr=True, quiet=True)
        progress = None
    progress = progress or RunProgress(console)
    world = distributed.world_size()
    per_rank_batch = max(1, batch_size // world)
    loop = _Loop(
        model=model,
        loss_fn=loss_fn,
        settings=settings,
        hooks=list(hooks),
        device=device,
        runtime=runtime,
        seed=seed,
        stage=stage,
        state_path=state_path,
        state_tag=state_tag,
        main=main,
        per_rank_batch=per_rank_batch,
        batches_per_epoch=data.train.num_batches(per_rank_batch, world),
    )
    first_epoch = _start(loop, console, metrics_path)
    eval_name, eval_data = data.eval_split
    with progress.stage(stage, settings.epochs, first_epoch, loop.batches_per_epoch):
        for epoch in range(first_epoch, settings.epochs):
            record = _train_and_evaluate(loop, data.train, epoch, progress, eval_name, eval_data, eval_batch_size)
            loop.history.append(record)
            if state_path is not None and main:
                _save_epoch_state(loop, epoch + 1)
            if metrics_path is not None and main:
                append_jsonl(metrics_path, record)
            for hook in loop.hooks:
                hook.on_epoch_end(record)
            progress.end_epoch(record, eval_name)
    _finish(model, stage, runtime, device)
    return loop.history


def _start(loop: _Loop, console: Console, metrics_path: Path | None) -> int:
    """Before the first epoch of :func:`fit`: the model on its device, resumed if a state is kept; the first epoch."""
    loop.model.to(loop.device)
    first_epoch = _restore(loop, _load_state(loop.state_path, loop.state_tag, console, loop.stage))
    if first_epoch:
        console.print(
            f"[bold]{loop.stage}[/]: resuming after epoch {first_epoch}/{loop.settings.epochs} (from {loop.state_path})"
        )
    if metrics_path is not None and loop.main:  # the metrics file always matches the epochs the model has seen
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in loop.history))
    return first_epoch


def _train_and_evaluate(
    loop: _Loop, train: TensorData, epoch: int, progress: RunProgress, eval_name: str, eval_data, eval_batch_size: int
) -> dict:
    """One epoch of :func:`fit`: train, step the schedule, evaluate; the epoch's metrics record."""
    started = time.perf_counter()
    loss_sum, correct, seen, tally = _train_epoch(loop, train, epoch, progress)
    train_seconds = time.perf_counter() - started
    lr = loop.optimizer.param_groups[0]["lr"]
    loop.scheduler.step()
    result = evaluate(loop.model, eval_data, eval_batch_size, loop.device)
    record = {
        "stage": loop.stage,
        "epoch": epoch + 1,
        "train_loss": loss_sum / max(1, seen),
        "train_accuracy": correct / max(1, seen),
        # this rank's first and largest batch loss (report: a loss that grew a millionfold diverged)
        "first_batch_loss": tally.first_loss,
        "max_batch_loss": tally.max_loss,
        f"{eval_name}_loss": result["loss"],
        f"{eval_name}_accuracy": result["accuracy"],
        "lr": lr,
        "train_seconds": train_seconds,  # the training pass alone
        "seconds": time.perf_counter() - started,  # with evaluation
    }
    for hook in loop.hooks:
        record.update(hook.epoch_metrics())
    return record


def _finish(model: nn.Module, stage: str, runtime: Runtime, device: torch.device) -> None:
    """After the last epoch: refuse NaN weights; give the model back the default memory layout."""
    if any(math.isnan(p.detach().sum().item()) for p in model.parameters()):
        raise KdcError(f"{stage}: the weights hold NaN after training; lower the learning rate")
    if runtime.channels_last and device.type == "cuda":  # checkpoints keep the default layout
        model.to(memory_format=torch.contiguous_format)


@dataclass
class _Loop:
    """One call of :func:`fit`: what stays fixed, and what training changes as it goes."""

    model: nn.Module
    loss_fn: LossFn
    settings: TrainSettings
    hooks: list[Hook]
    device: torch.device
    runtime: Runtime
    seed: int
    stage: str
    state_path: Path | None
    state_tag: str
    main: bool
    per_rank_batch: int
    batches_per_epoch: int
    # set by _restore, replaced by _rebuild_optimizer when the parameters change
    net: nn.Module | None = None  # what batches go through: the model, wrapped for DDP and compiled as asked
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object = None
    optimizer_step: Callable[[], None] | None = None  # step_function(optimizer), made after the scheduler
    trained: list[torch.Tensor] = field(default_factory=list)  # the optimiser's parameters
    step: int = 0  # global batch index, counted over all epochs
    history: list[dict] = field(default_factory=list)


def _prepare(loop: _Loop) -> None:
    """Put the model in the runtime's memory format and wrap it for DDP and compilation as asked."""
    model, cuda = loop.model, loop.device.type == "cuda"
    if loop.runtime.channels_last and cuda:
        model.to(memory_format=torch.channels_last)
    net: nn.Module = model
    if distributed.world_size() > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[loop.device.index] if cuda else None)
    if loop.runtime.compile:
        net = torch.compile(net)
    loop.net = net


def _restore(loop: _Loop, state: dict | None) -> int:
    """Build the optimiser and schedule; with a resume ``state``, put everything back first. Returns the first epoch.

    The hooks are restored before the weights: a structured pruning hook
    replays its history, so the freshly built model takes the shapes the
    saved weights have. The optimiser is built after that, for those
    parameters, and then takes its saved state.
    """
    model = loop.model
    if state is not None:
        try:
            for hook, hook_state in zip(loop.hooks, state["hooks"]):
                hook.load_state_dict(hook_state)
            model.load_state_dict(state["model"])
        except (RuntimeError, ValueError, KeyError) as exc:
            # load_state_dict puts the first mismatch on its second line
            detail = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])[:300]
            raise CheckpointError(
                f"the resume state {loop.state_path} does not fit the model ({type(exc).__name__}: {detail}); "
                f"rerun with --restart to start the '{loop.stage}' stage over"
            ) from None
    _prepare(loop)
    _set_optimizer(loop)
    if state is None:
        return 0
    loop.optimizer.load_state_dict(state["optimizer"])
    loop.scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    loop.history, loop.step = list(state["history"]), state["step"]
    return state["epoch"]


def _set_optimizer(loop: _Loop) -> None:
    """A fresh optimiser and schedule for the model's parameters, and the step call for them.

    The step call is made after the schedule, which wraps ``optimizer.step`` to see that it ran.
    """
    loop.optimizer = make_optimizer(loop.model, loop.settings)
    loop.scheduler = make_scheduler(loop.optimizer, loop.settings)
    loop.optimizer_step = step_function(loop.optimizer)
    loop.trained = [p for group in loop.optimizer.param_groups for p in group["params"]]


def _rebuild_optimizer(loop: _Loop) -> None:
    """A new optimiser for parameters that a hook replaced (structured pruning), at the current learning rate.

    The settings are the recipe's, the learning rate the one in force and
    the schedule goes on from its saved state. The momentum buffers (SGD) or
    moment estimates (Adam) of the old parameters are dropped: they have the
    old shapes, and a new optimiser starts them afresh, as after a restart.
    The DDP/compiled wrappers hold the old parameters too, so they are
    rebuilt. A resumed run rebuilds at the same step, so it stays identical
    to an uninterrupted one.
    """
    lrs = [group["lr"] for group in loop.optimizer.param_groups]
    schedule = loop.scheduler.state_dict()
    _prepare(loop)
    _set_optimizer(loop)  # building the schedule sets the initial lr ...
    loop.scheduler.load_state_dict(schedule)
    for group, lr in zip(loop.optimizer.param_groups, lrs):  # ... so the one in force is put back
        group["lr"] = lr


def _train_epoch(
    loop: _Loop, train: TensorData, epoch: int, progress: RunProgress
) -> tuple[float, float, float, _Tally]:
    """One pass over the training split; returns (loss sum, correct, samples) summed over all ranks, and this
    rank's tally (its first and largest batch loss)."""
    settings, device, runtime = loop.settings, loop.device, loop.runtime
    cuda = device.type == "cuda"
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if cuda and runtime.precision == "bf16"
        else contextlib.nullcontext()
    )
    progress.begin_epoch(epoch)
    loop.net.train()
    generator = torch.Generator().manual_seed(loop.seed * 100_003 + epoch)
    epoch_start_step = loop.step
    tally = _Tally()
    batches = train.batches(
        loop.per_rank_batch,
        shuffle=True,
        generator=generator,
        shard=(distributed.rank(), distributed.world_size()),
        augment=runtime.augment.for_epoch(epoch) if runtime.augment else None,
    )
    for x, y, idx in batches:
        changed = [hook.on_batch_start(loop.step, loop.batches_per_epoch) for hook in loop.hooks]  # every hook runs
        if any(changed):
            _rebuild_optimizer(loop)
            loop.net.train()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if runtime.channels_last and cuda and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = loop.net(x)
            loss = loop.loss_fn(logits.float(), y, idx, x)
        for p in loop.trained:  # optimizer.zero_grad(set_to_none=True) without its per-call bookkeeping
            p.grad = None
        loss.backward()
        loop.optimizer_step()
        for hook in loop.hooks:
            hook.after_optimizer_step(loop.step)
        loop.step += 1
        tally.add(loss, logits, y)
        if tally.pending >= CHECK_EVERY:
            _check_losses(tally, loop.step, epoch, loop.batches_per_epoch, loop.stage, settings, loop.state_path)
            if loop.main:
                progress.advance(loop.step - epoch_start_step, tally.status())
    _check_losses(tally, loop.step, epoch, loop.batches_per_epoch, loop.stage, settings, loop.state_path)
    loss_sum, correct, seen = distributed.all_reduce_sum([tally.loss_sum, tally.correct, float(tally.seen)], device)
    return loss_sum, correct, seen, tally


def _save_epoch_state(loop: _Loop, epochs_done: int) -> None:
    """Everything needed to go on after ``epochs_done`` epochs, written atomically to the state path."""
    save_state(
        loop.state_path,
        {
            "tag": loop.state_tag,
            "epoch": epochs_done,
            "step": loop.step,
            "model": loop.model.state_dict(),
            "optimizer": loop.optimizer.state_dict(),
            "scheduler": loop.scheduler.state_dict(),
            "hooks": [hook.state_dict() for hook in loop.hooks],
            "rng": _rng_state(),
            "history": loop.history,
        },
    )
