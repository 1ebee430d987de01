"""Latency measured where it ships: a per-layer latency table (NetAdapt) and the cost function a budget search uses.

NetAdapt (Yang et al. 2018) constrains the latency measured on the target platform, not MACs: two layers of the
same MACs can run at very different speeds (a conv with 17 output channels can cost as much as one with 24), and
a runtime adds work that MACs do not count (layout changes, pooling, per-call overhead). Timing every candidate
network during a search is too slow, so NetAdapt times each layer once per width and sums the table.

:class:`LatencyTable` holds the time of one layer "unit" (a Conv/Linear with the BatchNorm, activation and
pooling that follow it in the network) per layer signature (op, channels in and out, kernel, stride, padding,
dilation, groups, bias, the input's shape, the batch size), on one runtime (``onnxruntime``: the unit exported to
ONNX as kdc exports models and run by onnxruntime; ``torch``: the module in eval mode under ``inference_mode``),
at one thread count, on this machine. It is filled lazily: a prediction that needs a width not timed yet builds
that unit alone with random weights, times it (``torch.utils.benchmark`` blocked autorange for about
:data:`ENTRY_SECONDS`, in :data:`REPEATS` short timings whose median is kept) and stores it. The table is a JSON file in the user cache
(:func:`kdcompress.files.user_cache_dir`: ``$KDC_CACHE``, else the platform's), one per machine, runtime, thread
count and batch size (``latency-table-<key>.json``), written atomically and read as data: a file too large, not
JSON, of another version or machine, or with a malformed entry is refused with a warning and rebuilt.

:func:`latency_cost` turns a table into ``cost(shares) -> ms``: the sum of the pruned network's layer entries
and the rest of the network (what the table does not hold: flatten, additions, the session's per-call cost),
measured once on the unpruned model as its whole time less its layers' entries: scaled with the layers by
default, or held constant.
:func:`verify_latency` times the real models at the end, interleaved, in kdc's timing process
(:func:`kdcompress.timing.time_in_child`) for onnxruntime.

Example::

    >>> from kdcompress.models import SmallCNN
    >>> cost = latency_cost(SmallCNN(), (1, 28, 28), batch=64, runtime="onnxruntime", threads=2)  # doctest: +SKIP
    >>> cost({}), cost({"features.0": 0.5, "features.4": 0.5})  # doctest: +SKIP
    (11.2, 4.9)
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from .errors import KdcError, describe
from .files import atomic_write_text, user_cache_dir
from .measure import cpu_name, interleaved_latencies, latency
from .timing import ModelFile, time_in_child

__all__ = [
    "RUNTIMES",
    "TABLE_VERSION",
    "ENTRY_SECONDS",
    "WHOLE_SECONDS",
    "ROUND_SECONDS",
    "REPEATS",
    "MAX_TABLE_BYTES",
    "MAX_ENTRIES",
    "LayerSpec",
    "layer_specs",
    "layer_module",
    "unit_onnx",
    "time_module",
    "machine_fields",
    "LatencyTable",
    "LatencyCost",
    "REST_MODES",
    "latency_cost",
    "measure_latency",
    "verify_latency",
]

RUNTIMES = ("onnxruntime", "torch")
TABLE_VERSION = 1
ENTRY_SECONDS = 0.15  # blocked autorange per table entry: short, so a table of a hundred widths takes minutes
WHOLE_SECONDS = 0.5  # the unpruned model, timed once per cost function for the rest of the network
REPEATS = 3  # time_module: the median of this many short timings
ROUND_SECONDS = 0.1  # verify_latency: about this long per model and round
MAX_TABLE_BYTES = 8 << 20  # a table file larger than this is not one kdc wrote (an entry is ~300 bytes)
MAX_ENTRIES = 20_000
MAX_KEY_CHARS = 2_000

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # what structured pruning resizes
# modules that keep a layer's channels and may follow it in a unit (Dropout: nothing in eval mode or in ONNX)
_FOLLOWERS = (
    nn.modules.batchnorm._BatchNorm,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.dropout._DropoutNd,
)

Timer = Callable[..., float]  # timer(module, input_shape, *, batch, runtime, threads, seconds) -> ms


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One layer unit of a network: a Conv/Linear call and the channel-keeping modules run on its output.

    ``input_shape`` is one sample's input to the layer; ``after`` the followers' signatures (a BatchNorm by its
    type, since it is rebuilt at the layer's width; others by ``repr``, which holds their settings). ``followers``
    are the network's own follower modules (not part of the signature), copied into the unit that is timed.
    """

    name: str
    op: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: str | tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    bias: bool
    input_shape: tuple[int, ...]
    after: tuple[str, ...]
    followers: tuple[nn.Module, ...] = dataclasses.field(default=(), compare=False, repr=False)

    def signature(self, batch: int) -> str:
        """The table key of this unit at ``batch``: everything that changes its time, and nothing else."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.compare and f.name != "name"}
        return json.dumps({**fields, "batch": int(batch)}, sort_keys=True, separators=(",", ":"))


def _follower_signature(module: nn.Module) -> str | None:
    """How a follower enters a signature: None for one that does nothing at inference (dropout)."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return type(module).__name__
    return repr(module)


def _spec(name: str, layer: nn.Module, x: torch.Tensor, followers: list[nn.Module]) -> LayerSpec:
    kept = tuple(m for m in followers if _follower_signature(m) is not None)
    common = {"name": name, "op": type(layer).__name__, "input_shape": tuple(int(d) for d in x.shape[1:])}
    common |= {"after": tuple(_follower_signature(m) for m in kept), "followers": kept}
    if isinstance(layer, nn.Linear):
        return LayerSpec(
            in_channels=layer.in_features,
            out_channels=layer.out_features,
            kernel=(),
            stride=(),
            padding=(),
            dilation=(),
            groups=1,
            bias=layer.bias is not None,
            **common,
        )
    padding = layer.padding if isinstance(layer.padding, str) else tuple(int(p) for p in layer.padding)
    return LayerSpec(
        in_channels=layer.in_channels,
        out_channels=layer.out_channels,
        kernel=tuple(int(k) for k in layer.kernel_size),
        stride=tuple(int(s) for s in layer.stride),
        padding=padding,
        dilation=tuple(int(d) for d in layer.dilation),
        groups=int(layer.groups),
        bias=layer.bias is not None,
        **common,
    )


def _trace(model: nn.Module, input_shape) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
    """Every call of a layer or follower module in one forward pass on zeros: (name, module, input, output)."""
    calls: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]] = []

    def hook(module, inputs, output, name):
        if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
            calls.append((name, module, inputs[0], output))

    handles = [
        module.register_forward_hook(lambda m, i, o, name=name: hook(m, i, o, name))
        for name, module in model.named_modules()
        if isinstance(module, _LAYERS + _FOLLOWERS)
    ]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.inference_mode():
            model(torch.zeros(1, *(int(d) for d in input_shape)))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return calls


def layer_specs(model: nn.Module, input_shape) -> list[LayerSpec]:
    """The layer units of ``model``, one per Conv/Linear call, in the order they run (one forward pass on zeros).

    A unit takes the modules that run next on the layer's output, one after the other, as long as each is a
    BatchNorm, an activation, a pooling or a dropout module: ``Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d`` in a
    ``Sequential`` or a ResNet block's ``bn1(conv1(x))``. What runs otherwise (functional calls, additions,
    flatten) is the rest of the network, which :func:`latency_cost` measures as a whole.
    """
    calls = _trace(model, input_shape)
    specs = []
    for i, (name, module, x, out) in enumerate(calls):
        if not isinstance(module, _LAYERS):
            continue
        followers, current = [], out
        for _, other, other_in, other_out in calls[i + 1 :]:
            if other_in is not current:
                continue
            if not isinstance(other, _FOLLOWERS):
                break
            followers.append(other)
            current = other_out
        specs.append(_spec(name, module, x, followers))
    return specs


def layer_module(spec: LayerSpec) -> nn.Module:
    """The unit of ``spec`` alone, in eval mode, with fresh random weights (its time does not depend on them)."""
    if spec.op == "Linear":
        layer: nn.Module = nn.Linear(spec.in_channels, spec.out_channels, bias=spec.bias)
    else:
        layer = getattr(nn, spec.op)(
            spec.in_channels,
            spec.out_channels,
            spec.kernel,
            stride=spec.stride,
            padding=spec.padding,
            dilation=spec.dilation,
            groups=spec.groups,
            bias=spec.bias,
        )
    parts = [layer]
    for follower in spec.followers:
        if isinstance(follower, nn.modules.batchnorm._BatchNorm):
            norm = type(follower)(spec.out_channels, eps=follower.eps, affine=follower.affine)
            with torch.no_grad():  # statistics like a trained network's: folded into the layer, they give it a bias
                norm.running_mean.uniform_(-0.5, 0.5)
                norm.running_var.uniform_(0.5, 1.5)
                if norm.affine:
                    norm.bias.uniform_(-0.5, 0.5)
            parts.append(norm)
        else:
            parts.append(copy.deepcopy(follower))
    unit = nn.Sequential(*parts).eval()
    unit.unit_spec = spec  # time_module makes its ONNX from a template of its family
    return unit


# family signature -> the unit's ONNX bytes at marker widths, exported once per process (torch.onnx.export takes
# 1 to 4 s a unit on a busy 2-core machine; resizing a template's tensors takes milliseconds)
_TEMPLATES: dict[str, bytes] = {}
_PRIMES = [p for p in range(11, 10_000) if all(p % d for d in range(2, int(p**0.5) + 1))]


def _channel_axis(spec: LayerSpec) -> int:
    return -1 if spec.op == "Linear" else 0


def _marked(spec: LayerSpec) -> LayerSpec | None:
    """``spec`` at two marker widths that no other dimension of its graph has (primes above its input's size,
    kernel and padding), so that each marker in the exported graph stands for one of the two widths."""
    axis = _channel_axis(spec)
    others = [d for i, d in enumerate(spec.input_shape) if i != axis % len(spec.input_shape)]
    padding = spec.padding if isinstance(spec.padding, tuple) else spec.kernel
    ceiling = max([*others, *spec.kernel, 1]) + 2 * max([*padding, 0]) + 1
    markers = [p for p in _PRIMES if p > ceiling][:2]
    if len(markers) < 2:  # an input of 10,000 and more along one side: exported directly
        return None
    m_in, m_out = markers
    shape = list(spec.input_shape)
    shape[axis] = m_in
    return dataclasses.replace(spec, in_channels=m_in, out_channels=m_out, input_shape=tuple(shape))


def _resized(blob: bytes, widths: dict[int, int]) -> bytes:
    """An ONNX graph with every tensor dimension in ``widths`` changed to its value (new random weights)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_model_from_string(blob)
    rng = np.random.default_rng(0)
    for tensor in proto.graph.initializer:
        dims = [widths.get(int(d), int(d)) for d in tensor.dims]
        if dims != list(tensor.dims):
            values = (rng.standard_normal(dims) * 0.1).astype(numpy_helper.to_array(tensor).dtype)
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    for value in (*proto.graph.value_info, *proto.graph.input, *proto.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value in widths:
                dim.dim_value = widths[dim.dim_value]
    return proto.SerializeToString()


def unit_onnx(spec: LayerSpec) -> bytes:
    """The ONNX bytes of ``spec``'s unit as :func:`kdcompress.export.onnx_common.export_onnx` writes it.

    Exported once per family (everything but the widths) at marker widths, then resized: the same operators,
    attributes and folding as an export of the unit itself, in milliseconds. Grouped convolutions (their
    ``group`` attribute follows the widths) are exported directly.
    """
    from .export.onnx_common import export_onnx

    marked = _marked(spec) if spec.groups == 1 else None
    if marked is None:
        return export_onnx(layer_module(spec), torch.zeros(2, *spec.input_shape)).SerializeToString()
    family = marked.signature(0)
    if family not in _TEMPLATES:
        proto = export_onnx(layer_module(marked), torch.zeros(2, *marked.input_shape))
        _TEMPLATES[family] = proto.SerializeToString()
    return _resized(_TEMPLATES[family], {marked.in_channels: spec.in_channels, marked.out_channels: spec.out_channels})


def _onnx_module(module: nn.Module, input_shape, threads: int) -> nn.Module:
    """``module`` in an onnxruntime session; a unit from its family's template when the result has its shape."""
    from .export.onnx_common import OrtModule, export_onnx

    spec = getattr(module, "unit_spec", None)
    if spec is not None:
        ort = OrtModule(unit_onnx(spec), {"format": "onnx"}, threads=threads)
        x = torch.zeros(2, *input_shape)
        with torch.inference_mode():
            if ort(x).shape == module(x).shape:
                return ort
    proto = export_onnx(module, torch.zeros(2, *input_shape))
    return OrtModule(proto.SerializeToString(), {"format": "onnx"}, threads=threads)


def time_module(module: nn.Module, input_shape, *, batch: int, runtime: str, threads: int, seconds: float) -> float:
    """Median milliseconds of one call of ``module`` on a random batch, on ``runtime`` with ``threads`` threads.

    ``onnxruntime``: exported as kdc exports models (:func:`kdcompress.export.onnx_common.export_onnx`, BatchNorm
    folded; a unit of :func:`layer_module` through :func:`unit_onnx`) and run in an onnxruntime session with ``threads`` intra-op threads; ``torch``: eval mode,
    ``inference_mode``. Timed in this process by :func:`kdcompress.measure.latency`, :data:`REPEATS` times for
    ``seconds`` in all: the median of the repeats' medians, so that one burst of load on a shared machine does
    not become the figure (single 0.15 s timings of one conv ranged over 2x to 5x on this 2-core machine).
    """
    module = module.eval()
    if runtime == "onnxruntime":
        module = _onnx_module(module, input_shape, threads)
    elif runtime != "torch":
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    with torch.inference_mode():
        times = sorted(
            latency(module, tuple(input_shape), batch=batch, threads=threads, min_run_time=seconds / REPEATS)[
                "median_ms"
            ]
            for _ in range(REPEATS)
        )
    return float(times[len(times) // 2])


def _runtime_version(runtime: str) -> str | None:
    if runtime != "onnxruntime":
        return None
    try:
        import onnxruntime

        return str(onnxruntime.__version__)
    except ImportError:
        return None


def machine_fields(runtime: str, threads: int, batch: int) -> dict:
    """What a table's figures hold for: this machine (processor, cores), the runtime and its version, the
    thread count and the batch size. A table file belongs to exactly one such set (its name is their hash)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        usable = os.cpu_count() or 1
    return {
        "table_version": TABLE_VERSION,
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "runtime": runtime,
        "torch": str(torch.__version__),
        "onnxruntime": _runtime_version(runtime),
        "threads": int(threads),
        "batch": int(batch),
    }


def _entry_ok(key, entry) -> bool:
    """A table entry of the shape kdc writes (the file is data)."""
    if not isinstance(key, str) or len(key) > MAX_KEY_CHARS or not isinstance(entry, dict):
        return False
    numbers_ok = all(
        isinstance(entry.get(k), (int, float)) and not isinstance(entry.get(k), bool) and math.isfinite(entry[k])
        for k in ("median_ms", "seconds")
    )
    return numbers_ok and entry["median_ms"] >= 0 and isinstance(entry.get("measured_at"), str)


class LatencyTable:
    """Per-layer latencies on one runtime, thread count and batch size, on this machine; see the module docstring.

    ``cache_dir``: where the table file lives (default :func:`kdcompress.files.user_cache_dir`); ``timer``: how a
    unit is timed (default :func:`time_module`; tests pass a fake); ``warn``: where a refused file is reported
    (default ``warnings.warn``); ``on_timed(spec, ms)``: called after each new entry (progress).
    ``timed`` counts the entries this object timed.
    """

    def __init__(
        self,
        runtime: str,
        *,
        batch: int,
        threads: int,
        cache_dir: str | Path | None = None,
        timer: Timer | None = None,
        warn: Callable[[str], None] | None = None,
        on_timed: Callable[[LayerSpec, float], None] | None = None,
    ):
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        if int(batch) < 1 or int(threads) < 1:
            raise ValueError(f"batch and threads must be at least 1, got {batch} and {threads}")
        self.runtime, self.batch, self.threads = runtime, int(batch), int(threads)
        self.fields = machine_fields(runtime, self.threads, self.batch)
        self.key = hashlib.sha256(json.dumps(self.fields, sort_keys=True).encode()).hexdigest()[:16]
        self.path = Path(cache_dir if cache_dir is not None else user_cache_dir()) / f"latency-table-{self.key}.json"
        self.timer = timer or time_module
        self.warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
        self.on_timed = on_timed
        self.timed = 0
        self.entries: dict[str, dict] = self._read(report=True)
        self.changed = False

    def _read(self, report: bool) -> dict[str, dict]:
        """The file's entries, or {} when it is absent; a damaged or foreign file is reported and refused."""
        try:
            size = self.path.stat().st_size
        except OSError:
            return {}
        data = None
        try:
            if size > MAX_TABLE_BYTES:
                raise ValueError(f"it is {size} bytes, more than kdc writes ({MAX_TABLE_BYTES})")
            data = json.loads(self.path.read_text(encoding="utf-8"))
            problem = _table_problem(data, self.fields)
        except (OSError, ValueError, RecursionError, UnicodeDecodeError) as exc:
            problem = describe(exc)
        if problem is None:
            return dict(data["entries"])
        if report:
            self.warn(f"the latency table {self.path} was refused ({problem}); it is timed again and rewritten")
        return {}

    def latency(self, spec: LayerSpec) -> float:
        """Milliseconds of ``spec``'s unit at this table's batch size: from the table, or timed now and stored."""
        key = spec.signature(self.batch)
        if key not in self.entries:
            ms = float(
                self.timer(
                    layer_module(spec),
                    spec.input_shape,
                    batch=self.batch,
                    runtime=self.runtime,
                    threads=self.threads,
                    seconds=ENTRY_SECONDS,
                )
            )
            if not math.isfinite(ms) or ms < 0:
                raise KdcError(f"timing layer {spec.name} gave {ms} ms; the timer is broken")
            self.entries[key] = {"median_ms": ms, "seconds": ENTRY_SECONDS, "measured_at": _now(), "layer": spec.name}
            self.timed += 1
            self.changed = True
            if self.on_timed is not None:
                self.on_timed(spec, ms)
        return float(self.entries[key]["median_ms"])

    def total(self, specs: Iterable[LayerSpec]) -> float:
        """The sum of ``specs``' entries (timing the missing ones)."""
        return sum(self.latency(spec) for spec in specs)

    def save(self) -> None:
        """Write the table atomically when it gained entries, keeping those another process added meanwhile.

        A cache folder that cannot be written is skipped with a warning: the figures were used all the same.
        """
        if not self.changed:
            return
        merged = {**self._read(report=False), **self.entries}
        if len(merged) > MAX_ENTRIES:  # keep the newest: the file stays within what _read accepts
            merged = dict(sorted(merged.items(), key=lambda item: item[1]["measured_at"])[-MAX_ENTRIES:])
        text = json.dumps({"version": TABLE_VERSION, "fields": self.fields, "entries": merged}, sort_keys=True)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, text + "\n")
        except (KdcError, OSError) as exc:
            self.warn(f"the latency table could not be saved to {self.path} ({describe(exc)}); set $KDC_CACHE")
            return
        self.entries, self.changed = merged, False


def _table_problem(data, fields: dict) -> str | None:
    """What is wrong with a table file's content, None when it is a table kdc wrote for ``fields``."""
    if not isinstance(data, dict) or data.get("version") != TABLE_VERSION:
        return f"not a version-{TABLE_VERSION} latency table"
    if data.get("fields") != fields:
        return "it was made for another machine, runtime or setting"
    entries = data.get("entries")
    if not isinstance(entries, dict) or len(entries) > MAX_ENTRIES:
        return f"its entries are not a mapping of at most {MAX_ENTRIES} layers"
    bad = next((key for key, entry in entries.items() if not _entry_ok(key, entry)), None)
    return None if bad is None else f"a malformed entry {str(bad)[:80]!r}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


REST_MODES = ("scaled", "constant")


class LatencyCost:
    """``cost(shares) -> ms``: the predicted latency of ``model`` pruned by ``shares``; see :func:`latency_cost`.

    Attributes: ``whole_ms`` (the unpruned model, timed whole), ``layers_ms`` (the sum of its units' entries),
    ``rest_ms`` (the difference: the rest of the network; negative when the units timed alone cost more in sum
    than the network, from each call's own overhead or a busier machine while the table was filled), ``rest``
    (the mode) and ``table``. :meth:`layers` is the units' sum of a pruned copy.
    """

    def __init__(self, model: nn.Module, input_shape, table: LatencyTable, pruner_args: dict, rest: str = "scaled"):
        if rest not in REST_MODES:
            raise ValueError(f"rest must be one of {', '.join(REST_MODES)}, got {rest!r}")
        self.model, self.input_shape = model, tuple(int(d) for d in input_shape)
        self.table, self.pruner_args, self.rest = table, pruner_args, rest
        self.layers_ms = table.total(layer_specs(model, self.input_shape))
        self.whole_ms = float(
            table.timer(
                copy.deepcopy(model).eval(),
                self.input_shape,
                batch=table.batch,
                runtime=table.runtime,
                threads=table.threads,
                seconds=WHOLE_SECONDS,
            )
        )
        self.rest_ms = self.whole_ms - self.layers_ms
        self.predictions: dict[tuple, float] = {}
        table.save()

    def specs(self, shares: Mapping[str, float]) -> list[LayerSpec]:
        """The layer units of a copy of the model pruned by ``shares`` (group root -> share of its channels)."""
        from .prune.structured import StructuredPruner

        pruned = copy.deepcopy(self.model)
        if shares:
            pruner = StructuredPruner(pruned, self.input_shape, scope="layer", **self.pruner_args)
            pruner.prune_ratios(dict(shares))
        return layer_specs(pruned, self.input_shape)

    def layers(self, shares: Mapping[str, float]) -> float:
        """The sum of the table entries of the copy pruned by ``shares`` (timing units not in the table yet)."""
        key = tuple(sorted((root, round(float(share), 4)) for root, share in shares.items() if share))
        if key not in self.predictions:
            self.predictions[key] = self.table.total(self.specs(dict(key)))
            self.table.save()
        return self.predictions[key]

    def __call__(self, shares: Mapping[str, float]) -> float:
        layers = self.layers(shares)
        if self.rest == "constant":
            return max(0.0, layers + self.rest_ms)
        return self.whole_ms * layers / self.layers_ms if self.layers_ms > 0 else self.whole_ms


def latency_cost(
    model: nn.Module,
    input_shape,
    *,
    batch: int,
    runtime: str,
    threads: int,
    importance: str = "l1",
    include: Iterable[str] = ("*",),
    exclude: Iterable[str] = (),
    round_to: int | None = None,
    table: LatencyTable | None = None,
    rest: str = "scaled",
) -> LatencyCost:
    """A cost function for a budget search: shares (``{group root: share}``, the roots of
    :meth:`kdcompress.prune.structured.StructuredPruner.groups_info` with ``scope="layer"``) -> predicted
    milliseconds per batch of ``batch`` of ``model`` pruned that way, on ``runtime`` with ``threads`` threads.

    The prediction comes from the sum of the pruned network's layer units in ``table`` (timed on first need, see
    :class:`LatencyTable`) and the unpruned model timed whole, once, here. ``rest="scaled"`` (the default): the
    whole model's time times the ratio of the pruned and unpruned units' sums, so the table's figures are
    calibrated to the whole model as timed now and the rest of the network (flatten, additions, per-call cost)
    shrinks with the layers. ``rest="constant"``: the pruned units' sum plus the rest (whole less the units' sum)
    held constant, as NetAdapt adds it. On this 2-core shared machine the rest came out negative (units timed alone
    cost 1.1 to 2.7x the whole model in sum: each unit pays onnxruntime's layout changes at its borders), and held
    constant it drove the predictions of models pruned by half or more to zero; scaled, they were nearer
    (docs/pruning.md gives the figures and the errors that remain). The pruned shapes come from a deep copy pruned by
    :meth:`~kdcompress.prune.structured.StructuredPruner.prune_ratios` (with ``importance``, ``include``,
    ``exclude`` and ``round_to`` as the pruning will use them); predictions are cached by the shares rounded to
    four places. ``model`` is not changed.
    """
    if table is None:
        table = LatencyTable(runtime, batch=batch, threads=threads)
    elif (table.runtime, table.batch, table.threads) != (runtime, int(batch), int(threads)):
        raise ValueError(
            f"the table is for {table.runtime} at batch {table.batch} with {table.threads} threads, not "
            f"{runtime} at batch {batch} with {threads}"
        )
    args = {"importance": importance, "include": tuple(include), "exclude": tuple(exclude), "round_to": round_to}
    return LatencyCost(model, input_shape, table, args, rest=rest)


def measure_latency(model: nn.Module, input_shape, *, batch: int, runtime: str, threads: int, rounds: int = 7) -> dict:
    """The latency of one model as :func:`verify_latency` measures it: ``{median_ms, iqr_ms, rounds_ms, ...}``."""
    return verify_latency({"model": model}, input_shape, batch=batch, runtime=runtime, threads=threads, rounds=rounds)[
        "model"
    ]


def verify_latency(
    models: Mapping[str, nn.Module | ModelFile],
    input_shape,
    *,
    batch: int,
    runtime: str,
    threads: int,
    rounds: int = 7,
) -> dict[str, dict]:
    """The real models timed in turns (the same rounds for all, warm-up first): name -> ``{median_ms, iqr_ms,
    rounds_ms, p25_ms, p75_ms, batch, threads, runs, method}``.

    ``onnxruntime``: each module is exported as ``kdc export --format onnx`` does (checked against the module),
    written as an artifact to a private temporary folder, and timed with the artifacts given as
    :class:`~kdcompress.timing.ModelFile` in kdc's timing process (:func:`kdcompress.timing.time_in_child`:
    ``OMP_WAIT_POLICY=PASSIVE``, fixed allocator settings, ``threads`` intra-op threads). ``torch``: checkpoint
    files go to the timing process the same way; modules are timed in this process (eval mode,
    ``inference_mode``), since a module cannot cross to another process without pickling it.
    ``rounds`` rounds of about :data:`ROUND_SECONDS` per model: the median and quartiles are over rounds.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if not models:
        return {}
    seconds = ROUND_SECONDS * int(rounds)
    modules = {name: m for name, m in models.items() if isinstance(m, nn.Module)}
    if runtime == "torch" and modules:
        if len(modules) != len(models):
            raise ValueError("verify_latency(runtime='torch') times modules or checkpoint files, not both together")
        with torch.inference_mode():
            timed = interleaved_latencies(
                {name: (m, tuple(input_shape)) for name, m in modules.items()},
                batch=batch,
                threads=threads,
                rounds=rounds,
                min_run_time=seconds,
            )
        return {name: {**t, "method": f"torch {torch.__version__}, in this process"} for name, t in timed.items()}
    with tempfile.TemporaryDirectory(prefix="kdc-latency-") as folder:
        files = {
            name: m if isinstance(m, ModelFile) else _onnx_artifact(m, input_shape, Path(folder), name)
            for name, m in models.items()
        }
        timed, policy = time_in_child(files, [(int(batch), list(files))], threads, rounds=rounds, min_run_time=seconds)
    method = f"{runtime} {_runtime_version(runtime) or torch.__version__}, timing process (OMP_WAIT_POLICY={policy})"
    return {name: {**t, "method": method} for name, t in timed[0].items()}


def _onnx_artifact(model: nn.Module, input_shape, folder: Path, name: str) -> ModelFile:
    """``model`` exported as ``kdc export --format onnx`` does and written as an artifact in ``folder``."""
    from .export import codec, write_artifact

    shape = [int(d) for d in input_shape]
    source = {"arch": {"input_shape": shape}, "preprocess": {"input_shape": shape, "known": False}, "stage": name}
    blob, _ = codec("onnx").encode(copy.deepcopy(model).eval(), source, {}, [])
    path = folder / f"model-{len(list(folder.iterdir()))}.onnx"
    manifest = write_artifact(path, blob, "onnx")
    return ModelFile("artifact", str(path), manifest["sha256"], None, f"the model {name!r}")
