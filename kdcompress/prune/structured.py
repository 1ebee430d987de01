"""Structured pruning: whole conv output channels and linear neurons removed, every dependent layer shrunk.

Zeros in a dense tensor make a model neither smaller nor faster; removing
whole channels does. :class:`StructuredPruner` ranks the output channels of
Conv and Linear layers by importance and cuts the least important ones out
of the network, together with everything that depends on them: the
BatchNorm after a conv, the input channels of the next layer, the other
branches of a residual addition, the slices of a concatenation and the
features of a linear layer after a flatten. torch-pruning's dependency graph
finds those couplings; this module decides how many channels go and keeps
the record that rebuilds the smaller shapes.

Units: ``sparsity`` is the share of *prunable channels* removed, in channels,
not parameters. The prunable channels are the output channels (conv) and
output features (linear) of the prunable layers, counted layer by layer:
the Conv/Linear layers selected by ``include``/``exclude`` (shell-style
patterns on module names, as in :func:`kdcompress.prune.prunable_weights`),
never the classifier that produces the logits, and only those whose channels
can be removed without touching a layer that is left out. Layers joined by a
residual addition lose the same channels together. Removing half the channels
of two consecutive layers removes about three quarters of the weights between
them, so parameters and MACs fall faster than ``sparsity``.

A checkpoint of a pruned model stores :meth:`StructuredPruner.history`
(plain lists of layer names and channel indices, no pickled modules) beside
its weights; :func:`apply_structure` replays it on a freshly built model so
the weights fit, and :func:`kdcompress.models.build_from_checkpoint` does
that for every checkpoint load.

Example::

    >>> import torch
    >>> from kdcompress.prune.structured import StructuredPruner, apply_structure
    >>> def net():
    ...     torch.manual_seed(0)
    ...     return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> model = net()
    >>> pruner = StructuredPruner(model, input_shape=(1, 4, 4))
    >>> pruner.prune_to(0.5); model[1].out_features, model[3].in_features, pruner.sparsity()
    (4, 4, 0.5)
    >>> rebuilt = apply_structure(net(), pruner.history(), (1, 4, 4))
    >>> rebuilt[1].weight.shape
    torch.Size([4, 16])
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping, shape_infer

from .unstructured import prunable_weights

__all__ = ["StructuredPruner", "apply_structure", "find_classifier", "kept_channels", "IMPORTANCES", "SCOPES"]

IMPORTANCES = ("l1", "l2", "bn_scale")
SCOPES = ("global", "layer")
_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _example_input(model: nn.Module, input_shape) -> torch.Tensor:
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    return torch.zeros(1, *(int(d) for d in input_shape), device=device, dtype=dtype)


def _feeds_flatten(node) -> bool:
    """Whether ``node``'s output reaches a reshape (flatten) through element-wise ops (ReLU, pooling) only."""
    seen, stack = set(), list(node.outputs)
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.type == tp.ops.OPTYPE.RESHAPE:
            return True
        if n.type == tp.ops.OPTYPE.ELEMENTWISE:
            stack.extend(n.outputs)
    return False


def _concat_over_channels_before_flatten(graph, cat_node, original) -> None:
    """torch-pruning's concatenation mapping, then the case it leaves out: a concatenation before a flatten.

    To tell a concatenation over channels from one over another dimension,
    torch-pruning 1.6.1 compares the channels the concatenation yields with
    the input width of the layer after it. Behind a flatten that layer is a
    Linear whose inputs are channels x height x width, so the test fails, the
    concatenation gets no index mapping, and its inputs are coupled channel
    by channel as if added: pruning one branch prunes the same channels of
    the other, and the Linear after the flatten loses the wrong features
    (the forward pass then fails on a shape mismatch; Torch-Pruning #481
    describes the coupling). When torch-pruning has left such a node without
    offsets and the width is a whole multiple of the concatenated channels,
    reached through a flatten, each branch gets its slice of the channels here.
    """
    original(graph, cat_node)
    module = getattr(cat_node, "module", None)
    if cat_node.type != tp.ops.OPTYPE.CONCAT or module.offsets is not None or not module.concat_sizes:
        return  # torch-pruning mapped it, or it is not a concatenation over known channel counts
    sizes = list(module.concat_sizes)
    if any(size is None for size in sizes) or getattr(cat_node.grad_fn, "_saved_dim", 1) not in (1, None):
        return
    width = shape_infer.infer_in_channels_recursively(graph, cat_node, recursive_depth=[0])
    if not (width and width % sum(sizes) == 0 and _feeds_flatten(cat_node)):
        return
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    module.offsets = bounds
    if not cat_node.enable_index_mapping:
        return
    # the same tensor may be concatenated twice (cat([x, x])): each slice takes the next unused dependency
    taken: set[int] = set()
    for i, branch in enumerate(cat_node.inputs):
        span = bounds[i : i + 2]
        for deps, target, reverse in ((cat_node.dependencies, branch, True), (branch.dependencies, cat_node, False)):
            dep = next((d for d in deps if d.target is target and id(d) not in taken), None)
            if dep is not None:
                dep.index_mapping[1] = index_mapping._ConcatIndexMapping(offset=span, reverse=reverse)
                taken.add(id(dep))


@contextlib.contextmanager
def _concat_fix():
    """Map concatenations before a flatten too (:func:`_concat_over_channels_before_flatten`) while the block runs."""
    original = index_mapping.update_concat_index_mapping
    index_mapping.update_concat_index_mapping = functools.partial(
        _concat_over_channels_before_flatten, original=original
    )
    try:
        yield
    finally:
        index_mapping.update_concat_index_mapping = original


def _dependency_graph(model: nn.Module, input_shape) -> tp.DependencyGraph:
    """torch-pruning's graph of ``model``, traced on one zero input without changing the model.

    The trace runs in eval mode so BatchNorm statistics stay as they are; torch-pruning leaves
    the model in eval mode, so each module's own mode is restored afterwards (a frozen
    BatchNorm inside a training model stays frozen).
    """
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.enable_grad(), _concat_fix():  # the graph is read from autograd's record of the forward pass
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=_example_input(model, input_shape), verbose=False
            )
    except Exception as exc:
        raise ValueError(
            f"torch-pruning could not trace the model on an input of shape {tuple(input_shape)} "
            f"({type(exc).__name__}: {exc}); structured pruning needs a model whose forward pass takes one "
            f"tensor batch; use unstructured pruning for this model"
        ) from None
    finally:
        for module, training in modes.items():
            module.training = training


def find_classifier(model: nn.Module, input_shape) -> str | None:
    """Name of the layer that produces the logits: the last Conv/Linear to run whose width is the output's.

    None when no such layer exists (the output comes from elsewhere); pruning then still
    leaves the output's width alone, since groups that reach the output are skipped.
    """
    ran: list[tuple[str, nn.Module]] = []
    handles = [
        module.register_forward_hook(lambda m, i, o, name=name: ran.append((name, m)))
        for name, module in model.named_modules()
        if isinstance(module, _LAYER_TYPES)
    ]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            out = model(_example_input(model, input_shape))
    finally:
        for h in handles:
            h.remove()
        for module, training in modes.items():
            module.training = training
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        return None
    for name, module in reversed(ran):
        if _out_channels(module) == out.shape[1]:
            return name
    return None


def kept_channels(initial: int, share: float, round_to: int | None = None) -> int:
    """Channels a group of ``initial`` channels keeps when ``share`` of them is removed from the unpruned model.

    The rounding :meth:`StructuredPruner.prune_ratios` applies: ``round(share * initial)`` channels go, at least
    one channel stays (``round_to`` channels with ``round_to``) and the kept count is rounded up to a multiple
    of ``round_to`` (never above ``initial``). Cost models use it to know what a share really removes.
    """
    keep = max(initial - int(round(share * initial)), round_to or 1)
    if round_to:
        keep = min(initial, math.ceil(keep / round_to) * round_to)
    return min(initial, keep)


def _check_history(history) -> list[list]:
    """A deep copy of ``history`` as plain lists, or ValueError when it is not a pruning history."""
    problem = "it is not a list"
    if isinstance(history, (list, tuple)):
        for k, entry in enumerate(history):
            if not (
                isinstance(entry, (list, tuple))
                and len(entry) == 3
                and isinstance(entry[0], str)
                and isinstance(entry[1], bool)
                and isinstance(entry[2], (list, tuple))
                and all(isinstance(i, int) and not isinstance(i, bool) for i in entry[2])
            ):
                problem = f"entry {k} is not [layer name, is output pruning, [channel indices]]"
                break
        else:
            return [[name, out, [int(i) for i in idxs]] for name, out, idxs in history]
    raise ValueError(f"the pruning history is damaged: {problem}")


def _replay(graph: tp.DependencyGraph, history) -> None:
    """Redo ``history`` on the model of ``graph`` (which must have the shapes the history started from)."""
    history = _check_history(history)
    try:
        # torch-pruning keeps the list it is given and appends later steps to it: give it its own copy
        with _concat_fix():
            graph.load_pruning_history(copy.deepcopy(history))
    except Exception as exc:
        raise ValueError(
            f"the pruning history does not fit this model ({type(exc).__name__}: {exc}); was it made on "
            f"another architecture?"
        ) from None


def apply_structure(model: nn.Module, history, input_shape) -> nn.Module:
    """Give a freshly built ``model`` the shapes a :class:`StructuredPruner` left: replay its ``history``.

    ``history`` is what :meth:`StructuredPruner.history` returned (plain
    lists, as stored in a checkpoint); ``input_shape`` is one sample's shape
    (C, H, W), used to trace the model. The weights are whatever ``model``
    had: load the pruned state_dict afterwards. Returns ``model``, changed in
    place. Raises ValueError when the history does not fit the model.

    Example::

        >>> model = build_model(ckpt["arch"])  # doctest: +SKIP
        >>> apply_structure(model, ckpt["structure"], ckpt["arch"]["input_shape"]).load_state_dict(ckpt["state_dict"])  # doctest: +SKIP
    """
    history = _check_history(history)
    if history:
        _replay(_dependency_graph(model, input_shape), history)
    return model


@dataclass
class _Group:
    """Channels torch-pruning removes together, rooted at one layer's outputs."""

    root: str  # module name of the root layer
    group: object  # tp Group over all current channels
    layers: list[str]  # prunable layers whose outputs this group removes
    score: torch.Tensor | None = None  # importance of each current channel, higher is kept


class StructuredPruner:
    """Removes whole channels up to a target share of the prunable channels; see the module docstring.

    ``importance``: ``l1`` or ``l2`` (norm of everything a channel touches:
    its filter, its BatchNorm scale, the next layer's input weights, over the
    whole coupled group) or ``bn_scale`` (the BatchNorm scale |gamma|, as in
    network slimming; channels without a BatchNorm after them cannot be
    ranked this way and are left alone, and are not counted as prunable).
    ``scope``: ``global`` ranks all channels together (normalised within each
    group, as torch-pruning does), so layers lose different shares;
    ``layer`` removes the same share from every group of coupled layers.
    ``round_to``: keep a multiple of this many channels in each group (for
    hardware that prefers multiples of 8); the share then lands at or below
    the target. Every group keeps at least one channel.
    ``allocation``: per-group shares (``{root: share}``) that :meth:`prune_to`
    ramps towards instead of one sparsity for all (see :meth:`set_allocation`).

    The model must be unpruned when the pruner is built (a fresh build, or
    a model loaded from a checkpoint without structure); :meth:`load_state_dict`
    replays saved steps on it.

    Pruning replaces parameters with smaller ones, so an optimiser built
    before :meth:`prune_to` no longer holds the model's parameters:
    ``changes_parameters`` tells :func:`kdcompress.train.fit` to build a new one.
    """

    changes_parameters = True

    def __init__(
        self,
        model: nn.Module,
        input_shape,
        importance: str = "l1",
        scope: str = "global",
        include: Iterable[str] = ("*",),
        exclude: Iterable[str] = (),
        round_to: int | None = None,
        allocation: dict[str, float] | None = None,
    ):
        if importance not in IMPORTANCES:
            raise ValueError(f"importance must be one of {', '.join(IMPORTANCES)}, got {importance!r}")
        if scope not in SCOPES:
            raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
        if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
            raise ValueError(f"round_to must be a positive whole number or None, got {round_to!r}")
        self.model = model
        self.input_shape = tuple(int(d) for d in input_shape)
        self.importance, self.scope, self.round_to = importance, scope, round_to
        self.classifier = find_classifier(model, self.input_shape)
        selected = {
            key[: -len(".weight")] if key != "weight" else "" for key in prunable_weights(model, include, exclude)
        }
        self._modules = dict(model.named_modules())
        self._ignored = [
            module
            for name, module in self._modules.items()
            if isinstance(module, _LAYER_TYPES) and (name not in selected or name == self.classifier)
        ]
        if importance == "bn_scale":
            self._scorer = tp.importance.BNScaleImportance()
        else:
            self._scorer = tp.importance.MagnitudeImportance(p=1 if importance == "l1" else 2)
        self._graph = _dependency_graph(model, self.input_shape)
        groups = self._groups()
        if not groups:
            why = " with a BatchNorm after them" if importance == "bn_scale" else ""
            raise ValueError(
                f"the model has no channels{why} that structured pruning can remove (the classifier's outputs "
                f"are never removed); check prune.include/exclude"
                + ("; or use importance l1 or l2" if importance == "bn_scale" else "")
            )
        # Counted once, on the unpruned model: the denominator of sparsity()
        self.initial_channels = {name: _out_channels(self._modules[name]) for g in groups for name in g.layers}
        self.steps_taken = 0
        self.allocation: dict[str, float] | None = None
        self.allocation_sparsity = 0.0
        if allocation is not None:
            self.set_allocation(allocation)

    def set_allocation(self, allocation: dict[str, float]) -> None:
        """Prune towards per-group shares (``{root: share}``, from :mod:`kdcompress.prune.allocate`) from now on.

        :meth:`prune_to` then reads its sparsity as progress along the allocation: at
        ``allocation_sparsity`` (what :meth:`sparsity` measures once every group holds its share) each group
        has lost exactly its share; below it, each group is the same fraction of the way to its own share.
        A schedule planned to ``allocation_sparsity`` therefore ramps every group towards its own share and
        its last step lands on the allocation. Groups not named keep all their channels.
        """
        known = {g["root"]: g for g in self.groups_info()}
        unknown = sorted(set(allocation) - set(known))
        if unknown:
            raise ValueError(f"the allocation names no prunable group {unknown}; the groups are {sorted(known)}")
        for root, share in allocation.items():
            if not 0.0 <= float(share) < 1.0:
                raise ValueError(f"the share of group {root!r} must be in [0, 1), got {share}")
        self.allocation = {root: float(share) for root, share in allocation.items()}
        self.allocation_sparsity = self.planned_sparsity(self.allocation)

    def planned_sparsity(self, shares: dict[str, float]) -> float:
        """The :meth:`sparsity` that :meth:`prune_ratios` with ``shares`` reaches from the unpruned model."""
        total = sum(self.initial_channels.values())
        removed = 0
        for g in self.groups_info():
            initial = g["initial"]
            kept = kept_channels(initial, shares.get(g["root"], 0.0), self.round_to)
            removed += (initial - kept) * len(g["layers"])
        return removed / total

    # -- state
    def sparsity(self) -> float:
        """Measured share of the prunable channels removed so far (0.0 before any pruning)."""
        total = sum(self.initial_channels.values())
        left = sum(_out_channels(self._modules[name]) for name in self.initial_channels)
        return 1.0 - left / total

    def history(self) -> list[list]:
        """Every pruning so far as ``[[layer name, is output pruning, [channel indices]], ...]``: JSON-able.

        Replayed in order on a freshly built model by :func:`apply_structure`,
        it gives that model this model's shapes.
        """
        return [[str(name), bool(out), [int(i) for i in idxs]] for name, out, idxs in self._graph.pruning_history()]

    def state_dict(self) -> dict:
        """Plain data for resuming: the history and the number of :meth:`prune_to` calls that pruned."""
        state = {"history": self.history(), "steps_taken": self.steps_taken}
        if self.allocation is not None:  # the shares the steps so far ramped towards: a resume must follow the same
            state["allocation"] = dict(self.allocation)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`: the history is replayed, so the model takes the saved shapes.

        Call it on a pruner built over a freshly built (unpruned) model, before
        loading the pruned weights into that model.
        """
        history = _check_history(state["history"])
        saved = state.get("allocation")
        if saved is not None and saved != self.allocation:
            raise ValueError(
                f"the saved steps pruned towards the allocation {saved}, this pruner towards {self.allocation}; "
                f"the budget or the model it is measured on changed"
            )
        current = self.history()
        if current != history:
            if current:
                raise ValueError(
                    "this pruner's model is already pruned differently from the saved state; build the model and "
                    "the pruner afresh, then load the state"
                )
            _replay(self._graph, history)
        self.steps_taken = int(state["steps_taken"])

    def groups_info(self) -> list[dict]:
        """The groups of coupled channels that can be pruned: ``[{"root", "layers", "initial", "channels"}]``.

        ``root`` names the group (the layer whose output channels it removes; the key of :meth:`prune_ratios`),
        ``layers`` the prunable layers that lose channels with it, ``initial`` its channels before any pruning
        and ``channels`` what it has now.
        """
        return [
            {
                "root": g.root,
                "layers": list(g.layers),
                "initial": self.initial_channels[g.root],
                "channels": _out_channels(self._modules[g.root]),
            }
            for g in self._groups()
        ]

    def prune_ratios(self, ratios: dict[str, float]) -> None:
        """Prune each named group (a root of :meth:`groups_info`) until ``ratio`` of its initial channels are gone.

        The least important channels go first, as in :meth:`prune_to`; ``round_to`` and the one channel every
        group keeps apply. Groups not named are left as they are; channels are never put back. An unknown
        root is a ValueError that lists the known ones.
        """
        groups = {g.root: g for g in self._groups()}
        unknown = sorted(set(ratios) - set(groups))
        if unknown:
            raise ValueError(f"no prunable group named {unknown}; the groups are {sorted(groups)}")
        plan = {}
        for root, ratio in ratios.items():
            if not 0.0 <= ratio < 1.0:
                raise ValueError(f"the ratio of group {root!r} must be in [0, 1), got {ratio}")
            initial, current = self.initial_channels[root], _out_channels(self._modules[root])
            plan[root] = self._rounded_removal(current, int(round(ratio * initial)) - (initial - current))
        self._remove(groups.values(), plan)

    # -- actions
    def prune_to(self, sparsity: float) -> None:
        """Remove the least important channels until ``sparsity`` of the prunable channels are gone.

        Importance is measured on the current weights, so calls with rising
        targets (a schedule) retrain in between. A target at or below the
        share already removed does nothing; channels are never put back.
        With an allocation (:meth:`set_allocation`) each group moves towards its own share instead.
        """
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        if self.allocation is not None:
            progress = min(1.0, sparsity / self.allocation_sparsity) if self.allocation_sparsity > 0 else 0.0
            self.prune_ratios({root: share * progress for root, share in self.allocation.items()})
            return
        groups = self._groups()
        plan = self._plan_global(groups, sparsity) if self.scope == "global" else self._plan_layer(groups, sparsity)
        self._remove(groups, plan)

    def _remove(self, groups: Iterable[_Group], plan: dict[str, int]) -> None:
        """Remove ``plan[root]`` channels (the lowest scores) from each group; a step is counted if any went."""
        pruned = False
        for g in groups:
            n = plan.get(g.root, 0)
            if n <= 0:
                continue
            idxs = sorted(int(i) for i in torch.argsort(g.score, stable=True)[:n])
            root = self._modules[g.root]
            with _concat_fix():
                prune_out = self._graph.get_pruner_of_module(root).prune_out_channels
                self._graph.get_pruning_group(root, prune_out, idxs).prune()
            pruned = True
        if pruned:
            self.steps_taken += 1

    def apply(self) -> None:
        """Nothing to do: removed channels are gone, unlike masked weights that could regrow."""

    # -- helpers
    def _groups(self) -> list[_Group]:
        """The groups of coupled channels that may be pruned, rooted at a prunable layer."""
        groups = []
        roots = (tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR)
        with _concat_fix():
            all_groups = list(self._graph.get_all_groups(ignored_layers=self._ignored, root_module_types=roots))
        for group in all_groups:
            if any(dep.target.type == tp.ops.OPTYPE.OUTPUT for dep, _ in group):
                continue  # it would change the model's output
            layers = [
                self._graph._module2name[dep.target.module]
                for dep, _ in group
                if self._graph.is_out_channel_pruning_fn(dep.handler) and isinstance(dep.target.module, _LAYER_TYPES)
            ]
            g = _Group(root=self._graph._module2name[group[0].dep.target.module], group=group, layers=layers)
            g.score = self._score(g) if layers else None
            if g.score is not None:
                groups.append(g)
        return groups

    def _score(self, g: _Group) -> torch.Tensor | None:
        score = self._scorer(g.group)
        if score is None:  # bn_scale on a group without BatchNorm
            return None
        # an all-zero group divides 0 by 0 when normalised: rank it first, not as NaN
        return torch.nan_to_num(score.detach().float().cpu(), nan=0.0)

    def _keep_min(self) -> int:
        return self.round_to or 1

    def _rounded_removal(self, current: int, remove: int) -> int:
        """``remove`` lowered so the channels kept are at least one (and a multiple of round_to)."""
        keep = max(current - remove, self._keep_min())
        if self.round_to:
            keep = min(current, math.ceil(keep / self.round_to) * self.round_to)
        return max(0, current - keep)

    def _plan_layer(self, groups: list[_Group], sparsity: float) -> dict[str, int]:
        plan = {}
        for g in groups:
            initial, current = self.initial_channels[g.root], _out_channels(self._modules[g.root])
            plan[g.root] = self._rounded_removal(current, int(round(sparsity * initial)) - (initial - current))
        return plan

    def _plan_global(self, groups: list[_Group], sparsity: float) -> dict[str, int]:
        """Channels to remove per group: the lowest scores over all groups, until the target is nearest.

        A channel of a group counts once for each prunable layer it leaves
        (three convs joined by a residual addition: three channels).
        """
        total = sum(self.initial_channels.values())
        need = int(round(sparsity * total)) - int(round(self.sparsity() * total))
        plan = {g.root: 0 for g in groups}
        if need <= 0:
            return plan
        candidates = []
        for k, g in enumerate(groups):
            current = _out_channels(self._modules[g.root])
            order = torch.argsort(g.score, stable=True)[: max(0, current - self._keep_min())]
            candidates += [(float(g.score[i]), k, rank) for rank, i in enumerate(order)]
        candidates.sort()
        taken = 0
        for _, k, _ in candidates:
            if taken >= need:
                break
            weight = len(groups[k].layers)
            if taken + weight - need > need - taken:  # overshoots by more than stopping short: try lighter ones
                continue
            plan[groups[k].root] += 1
            taken += weight
        for g in groups:
            plan[g.root] = self._rounded_removal(_out_channels(self._modules[g.root]), plan[g.root])
        return plan
