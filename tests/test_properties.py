"""Property-based tests (hypothesis): recipes and overrides never crash, masks always hold.

1. Random recipe documents (real section/key names mixed with junk keys and values of every type), as YAML and
   as random text: ``parse_recipe`` returns a Recipe or raises RecipeError, nothing else.
2. Random ``KEY=VALUE`` overrides: the same.
3. A few random recipe documents through ``kdc validate``: exit 0 or 2, never a traceback or "internal error".
4. Random interleavings of pruning steps and SGD/Adam steps with random gradients: pruned weights stay exactly
   zero, mask sparsity never decreases and never passes the target; the pruning hook's state round-trips.

Floats between 0 and 1e-5 are left out of the random documents: a tiny ``prune.rate`` makes recipe validation
loop (nearly) forever, a bug pinned down by its own test below instead of hanging the property tests.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import signal
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from torch import nn

from kdcompress.errors import RecipeError, ScheduleError
from kdcompress.prune import MagnitudePruner, plan_schedule
from kdcompress.recipe import PruneSection, Recipe, parse_recipe
from kdcompress.run.hooks import Pruning

# --------------------------------------------------------------------------- helpers


class TookTooLong(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Fail (instead of hanging the suite) when the body runs longer than ``seconds``."""

    def expire(signum, frame):
        raise TookTooLong(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def parses_or_recipe_error(text: str, overrides=None) -> None:
    with time_limit(20):
        try:
            recipe = parse_recipe(text, source="<random>", overrides=overrides)
        except RecipeError as exc:
            assert exc.problems, "a RecipeError lists at least one problem"
            assert str(exc)
            return
    assert isinstance(recipe, Recipe)


SECTIONS = [f.name for f in dataclasses.fields(Recipe)]
FIELDS = sorted({f.name for s in dataclasses.fields(Recipe) for f in dataclasses.fields(s.default_factory())})
JUNK = ["", "x", "temprature", "Teacher", "run ", "0", "null", "~", "<<", "a.b", "-", "é", "__class__"]

safe_floats = st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not (0 < abs(x) < 1e-5))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.integers(),
    safe_floats,
    st.text(max_size=12),
    st.sampled_from(["sgd", "adam", "cosine", "global", "layer", "mlp", "cnn", "fashion-mnist-mini", "*", "net.*"]),
)
keys = st.one_of(st.sampled_from(SECTIONS + FIELDS + JUNK), st.text(max_size=8), st.integers(-5, 5), st.booleans())
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4), max_leaves=12
)
section_bodies = st.one_of(st.dictionaries(st.sampled_from(FIELDS + JUNK) | keys, values, max_size=6), values)
documents = st.one_of(
    st.dictionaries(st.sampled_from(SECTIONS + JUNK) | keys, section_bodies, max_size=7),
    values,
)


# --------------------------------------------------------------------------- 1. random documents


@settings(max_examples=100, deadline=None)
@given(documents)
def test_random_recipe_documents_parse_or_raise_recipe_error(doc):
    parses_or_recipe_error(yaml.safe_dump(doc, allow_unicode=True))


@settings(max_examples=100, deadline=None)
@given(
    st.one_of(
        st.text(max_size=80),
        st.text(alphabet=":-[]{}#&*!|>'\"%@`,? \n\t.0123456789abenrtu_=~", max_size=80),
    )
)
def test_random_text_parses_or_raises_recipe_error(text):
    parses_or_recipe_error(text)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(SECTIONS), st.sampled_from(FIELDS), values), max_size=6))
def test_real_keys_with_random_values_parse_or_raise_recipe_error(items):
    doc: dict = {}
    for section, key, value in items:
        doc.setdefault(section, {})[key] = value
    parses_or_recipe_error(yaml.safe_dump(doc, allow_unicode=True))


def test_deeply_nested_document_is_a_recipe_error():
    with pytest.raises(RecipeError):
        parse_recipe("[" * 5000 + "]" * 5000)


def test_tiny_prune_rate_is_validated_promptly():
    with time_limit(3):
        try:
            parse_recipe("prune: {rate: 1.0e-20}")
        except RecipeError:
            pass


# --------------------------------------------------------------------------- 2. random overrides

REAL_PATHS = [f"{s.name}.{f.name}" for s in dataclasses.fields(Recipe) for f in dataclasses.fields(s.default_factory())]
path_segments = st.one_of(st.sampled_from(SECTIONS + FIELDS + JUNK + ["args", "hidden"]), st.text(max_size=6))
override_keys = st.one_of(
    st.sampled_from(REAL_PATHS + SECTIONS),
    st.lists(path_segments, min_size=1, max_size=4).map(".".join),
    st.sampled_from(["teacher.args.hidden", "student.args.x.y", "run.name.sub", "prune.include.0", "", ".", "a..b"]),
)
override_values = st.one_of(
    st.text(max_size=20),
    st.integers().map(str),
    safe_floats.map(repr),
    st.sampled_from(["null", "~", "true", "[1, 2", "{a: 1}", "['*']", "[]", "{}", ".nan", "-.inf", "1.0e-3", "'x"]),
    values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
)
overrides = st.lists(
    st.one_of(st.tuples(override_keys, override_values).map(lambda kv: f"{kv[0]}={kv[1]}"), st.text(max_size=15)),
    max_size=5,
)


@settings(max_examples=100, deadline=None)
@given(overrides)
def test_random_overrides_parse_or_raise_recipe_error(tiny_recipe_text, items):
    parses_or_recipe_error(tiny_recipe_text, overrides=items)


@settings(max_examples=50, deadline=None)
@given(documents, overrides)
def test_random_overrides_on_random_documents(doc, items):
    parses_or_recipe_error(yaml.safe_dump(doc, allow_unicode=True), overrides=items)


# --------------------------------------------------------------------------- 3. random documents through the CLI

# No import paths (a random one could name any module) and no real model arguments (a random width could
# allocate gigabytes): model names come from a fixed list, arguments have junk keys.
cli_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), safe_floats, st.text(max_size=8))
cli_values = st.recursive(cli_scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=6)
model_names = st.sampled_from(["mlp", "cnn", "lenet5", "nosuch", "mpl", "no.such.pkg:build", "os.path:nosuch", 7])
junk_args = st.dictionaries(st.sampled_from(["hiden", "chanels", "widht", "x"]), cli_scalars, max_size=2)
model_sections = st.fixed_dictionaries(
    {},
    optional={
        "model": model_names,
        "args": junk_args | st.just({}),
        "epochs": cli_values,
        "lr": cli_values,
        "optimizer": cli_values,
    },
)
cli_documents = st.fixed_dictionaries(
    {},
    optional={
        "run": st.dictionaries(st.sampled_from(["name", "seed", "device", "out_dir", "junk"]), cli_values, max_size=3),
        "data": st.dictionaries(
            st.sampled_from(["dataset", "batch_size", "val_split", "junk"]),
            cli_values | st.sampled_from(["mnist", "cifar"]),
            max_size=3,
        ),
        "teacher": model_sections,
        "student": model_sections,
        "distill": st.dictionaries(st.sampled_from(["temperature", "alpha", "epochs", "junk"]), cli_values, max_size=3),
        "prune": st.dictionaries(
            st.sampled_from(["rate", "target_sparsity", "every", "epochs", "include", "exclude", "scope", "junk"]),
            cli_values,
            max_size=4,
        ),
        "report": st.dictionaries(st.sampled_from(["latency", "junk"]), cli_values, max_size=2),
        "junk": cli_values,
    },
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cli_documents)
def test_kdc_validate_on_random_documents_never_crashes(kdc, doc):
    with tempfile.TemporaryDirectory() as folder, time_limit(60):
        path = Path(folder) / "random.yaml"
        path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
        result = kdc("validate", str(path))
    event(f"exit {result.exit_code}")
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output
    assert "internal error" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


# --------------------------------------------------------------------------- 4. masks and schedules


def small_net(kind: str, width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(12, width), nn.ReLU(), nn.Linear(width, 3))
    return nn.Sequential(nn.Conv2d(1, width, 3), nn.ReLU(), nn.Flatten(), nn.Linear(width * 2 * 2, 3))


def check_masks(pruner: MagnitudePruner, previous_pruned: int) -> int:
    """Every masked weight is exactly 0; pruned count never decreases and never passes the target (+1)."""
    pruned = 0
    for name, weight in pruner.weights.items():
        mask = pruner.masks[name]
        assert mask.shape == weight.shape and mask.dtype == torch.bool
        assert torch.all(weight.detach()[~mask] == 0), f"{name}: a pruned weight is not zero"
        pruned += int((~mask).sum())
    assert pruned >= previous_pruned, "mask sparsity went down"
    groups = [list(pruner.weights)] if pruner.scope == "global" else [[n] for n in pruner.weights]
    for group in groups:
        total = sum(pruner.masks[n].numel() for n in group)
        gone = sum(int((~pruner.masks[n]).sum()) for n in group)
        assert gone <= pruner.target * total + 1, f"{group}: {gone} of {total} pruned, target {pruner.target}"
    assert pruner.sparsity() >= pruner.mask_sparsity() - 1e-12  # masked weights are zeros (others may be too)
    return pruned


@settings(max_examples=80, deadline=None)
@given(
    kind=st.sampled_from(["mlp", "cnn"]),
    width=st.integers(1, 8),
    seed=st.integers(0, 2**16),
    rate=st.floats(0.01, 0.99),
    target=st.floats(0.0, 0.99),
    scope=st.sampled_from(["global", "layer"]),
    ops=st.lists(st.sampled_from(["prune", "sgd", "adam", "adamw-big"]), max_size=20),
)
def test_masks_hold_under_random_pruning_and_optimiser_steps(kind, width, seed, rate, target, scope, ops):
    torch.set_num_threads(1)
    net = small_net(kind, width, seed)
    pruner = MagnitudePruner(net, rate=rate, target_sparsity=target, scope=scope)
    params = list(net.parameters())
    optimisers = {
        "sgd": torch.optim.SGD(params, lr=0.1, momentum=0.9),
        "adam": torch.optim.Adam(params, lr=0.05),
        "adamw-big": torch.optim.AdamW(params, lr=1.0, weight_decay=0.1),
    }
    generator = torch.Generator().manual_seed(seed)
    pruned = check_masks(pruner, 0)
    for op in ops:
        if op == "prune":
            removed = pruner.step()
            assert removed >= 0
        else:
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator) * 10
            optimisers[op].step()
            pruner.apply()
        pruned = check_masks(pruner, pruned)
    while not pruner.done:
        pruner.step()
        pruned = check_masks(pruner, pruned)
    if scope == "global":
        total = sum(m.numel() for m in pruner.masks.values())
        assert pruned == round(target * total)


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["mlp", "cnn"]),
    width=st.integers(1, 8),
    seed=st.integers(0, 2**16),
    rate=st.floats(0.05, 0.95),
    target=st.floats(0.0, 0.95),
    scope=st.sampled_from(["global", "layer"]),
    schedule=st.sampled_from(["iterative", "agp", "one-shot"]),
    every=st.one_of(st.just("auto"), st.floats(0.1, 2.0)),
    batches_per_epoch=st.integers(1, 7),
    epochs=st.integers(1, 5),
    data=st.data(),
)
def test_pruning_hook_state_round_trips_and_resumes_the_same_schedule(
    kind, width, seed, rate, target, scope, schedule, every, batches_per_epoch, epochs, data
):
    """A hook saved at any step (through torch.save / weights_only load) and restored, with its schedule planned
    again from the recipe, goes on exactly as one that never stopped: same masks, same number of pruning steps,
    pruned weights zero."""
    torch.set_num_threads(1)
    prune = PruneSection(
        rate=rate, target_sparsity=target, scope=scope, sparsity_schedule=schedule, every=every, epochs=epochs
    )
    try:
        plan = plan_schedule(prune, batches_per_epoch)
    except ScheduleError:
        assume(False)  # a schedule that does not fit: refused before training, nothing to resume
    steps = epochs * batches_per_epoch
    cut = data.draw(st.integers(0, steps), label="cut")
    original = small_net(kind, width, seed)

    def run(hook, start, stop):
        for step in range(start, stop):
            hook.on_batch_start(step, batches_per_epoch)
            hook.after_optimizer_step(step)

    straight_net = copy.deepcopy(original)
    straight = Pruning(MagnitudePruner(straight_net, rate, target, scope), plan)
    run(straight, 0, steps)

    first_net = copy.deepcopy(original)
    first = Pruning(MagnitudePruner(first_net, rate, target, scope), plan)
    run(first, 0, cut)
    buffer = io.BytesIO()
    torch.save({"hooks": [first.state_dict()], "model": first_net.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed_net = copy.deepcopy(original)
    resumed_net.load_state_dict(saved["model"])
    resumed = Pruning(MagnitudePruner(resumed_net, rate, target, scope), plan_schedule(prune, batches_per_epoch))
    resumed.load_state_dict(saved["hooks"][0])
    assert resumed.steps_taken == first.steps_taken
    for name in first.pruner.masks:
        assert torch.equal(resumed.pruner.masks[name], first.pruner.masks[name])
        assert torch.all(resumed.pruner.weights[name].detach()[~resumed.pruner.masks[name]] == 0)
    run(resumed, cut, steps)

    assert resumed.steps_taken == straight.steps_taken == len(plan.at)
    for name in straight.pruner.masks:
        assert torch.equal(resumed.pruner.masks[name], straight.pruner.masks[name]), name
    for key, tensor in straight_net.state_dict().items():
        assert torch.equal(resumed_net.state_dict()[key], tensor), key
    assert resumed.epoch_metrics() == straight.epoch_metrics()


def test_pruning_hook_state_dict_holds_only_tensors_and_plain_data():
    net = small_net("mlp", 4, 0)
    hook = Pruning(MagnitudePruner(net, 0.5, 0.75), plan_schedule(PruneSection(rate=0.5, target_sparsity=0.75), 4))
    hook.on_batch_start(0, 4)
    state = hook.state_dict()
    assert set(state) == {"pruner", "steps_taken"}
    assert state["steps_taken"] == 1
    masks = state["pruner"]["masks"]
    assert all(isinstance(m, torch.Tensor) and m.dtype == torch.bool for m in masks.values())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # safe to load
    assert {k: torch.equal(v, masks[k]) for k, v in loaded["pruner"]["masks"].items()} == {k: True for k in masks}
