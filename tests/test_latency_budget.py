"""The per-layer latency table (NetAdapt), the latency cost function and the final verification.

Most tests use a fake timer (counting calls, or proportional to MACs) so they are exact and fast; two time for
real, on tiny models.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from kdcompress import latency_budget as lb
from kdcompress.measure import count_macs
from kdcompress.models import SmallCNN
from kdcompress.prune.structured import StructuredPruner

SHAPE = (1, 28, 28)
NS_PER_MAC = 1e-6  # the fake timer: this many ms per multiply-accumulate


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN(SHAPE, channels=(32, 64), hidden=128)


class CountingTimer:
    """A fake timer: ms proportional to the module's MACs at the batch size; counts units and whole models."""

    def __init__(self):
        self.units = 0
        self.wholes = 0

    def __call__(self, module, input_shape, *, batch, runtime, threads, seconds):
        if isinstance(module, SmallCNN):
            self.wholes += 1
        else:
            self.units += 1
        return count_macs(module, input_shape) * batch * NS_PER_MAC


def table(tmp_path, timer=None, **kw) -> lb.LatencyTable:
    settings = {"runtime": "onnxruntime", "batch": 64, "threads": 2} | kw
    runtime = settings.pop("runtime")
    return lb.LatencyTable(runtime, cache_dir=tmp_path, timer=timer or CountingTimer(), **settings)


def cost_of(model, tab):
    return lb.latency_cost(model, SHAPE, batch=tab.batch, runtime=tab.runtime, threads=tab.threads, table=tab)


def roots(model) -> list[str]:
    return [g["root"] for g in StructuredPruner(model, SHAPE, scope="layer").groups_info()]


def test_layer_specs_take_the_batchnorm_activation_and_pooling_that_follow_each_layer():
    specs = {s.name: s for s in lb.layer_specs(cnn(), SHAPE)}
    assert list(specs) == ["features.0", "features.4", "classifier.1", "classifier.3"]
    # kdc's own pool by its own name: it runs faster than nn.MaxPool2d, so the two must not share a table entry
    assert [a.split("(")[0] for a in specs["features.4"].after] == ["BatchNorm2d", "ReLU", "MaxPool2x2"]
    assert specs["features.4"].input_shape == (32, 14, 14)
    assert (specs["classifier.1"].in_channels, specs["classifier.1"].after) == (3136, ("ReLU(inplace=True)",))
    assert specs["classifier.3"].after == ()


def test_a_unit_stops_where_the_output_meets_anything_but_a_follower():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.relu = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 3))

        def forward(self, x):
            return self.head(self.relu(self.bn(self.conv(x)) + x))  # the ReLU runs after the addition

    specs = lb.layer_specs(Block(), (4, 8, 8))
    assert [(s.name, s.after) for s in specs] == [("conv", ("BatchNorm2d",)), ("head.1", ())]
    unit = lb.layer_module(specs[0])
    assert isinstance(unit[1], nn.BatchNorm2d) and unit(torch.zeros(2, 4, 8, 8)).shape == (2, 4, 8, 8)


def test_the_table_caches_entries_so_a_second_call_and_a_second_process_time_nothing(tmp_path):
    model = cnn()
    timer = CountingTimer()
    cost = cost_of(model, table(tmp_path, timer))
    assert (timer.units, timer.wholes) == (4, 1)  # the unpruned model's four units, and the model whole
    shares = {root: 0.5 for root in roots(model)}
    first = cost(shares)
    units = timer.units
    assert units > 4  # the pruned widths were timed
    assert cost(shares) == first and cost(dict(shares)) == first and timer.units == units

    # a new table object reads the file: no unit is timed again, for the unpruned model or the pruned one
    again = CountingTimer()
    cost2 = cost_of(model, table(tmp_path, again))
    assert cost2(shares) == pytest.approx(first) and again.units == 0 and again.wholes == 1
    assert len(json.loads(cost2.table.path.read_text())["entries"]) == units


@pytest.mark.parametrize(
    "damage",
    ["not json", "nan entry", "negative entry", "other machine", "too large", "entries a list"],
)
def test_a_damaged_table_file_is_refused_with_a_warning_and_rebuilt(tmp_path, monkeypatch, damage):
    model = cnn()
    good = table(tmp_path)
    cost_of(model, good)
    data = json.loads(good.path.read_text())
    key = next(iter(data["entries"]))
    if damage == "not json":
        good.path.write_text('{"version": 1, "entries": {')
    elif damage in ("nan entry", "negative entry"):
        data["entries"][key]["median_ms"] = math.nan if damage == "nan entry" else -1.0
        good.path.write_text(json.dumps(data))
    elif damage == "other machine":
        data["fields"]["cpu"] = "another processor"
        good.path.write_text(json.dumps(data))
    elif damage == "too large":
        monkeypatch.setattr(lb, "MAX_TABLE_BYTES", 100)
    else:
        data["entries"] = list(data["entries"])
        good.path.write_text(json.dumps(data))
    timer = CountingTimer()
    with pytest.warns(UserWarning, match="refused"):
        rebuilt = table(tmp_path, timer)
    assert rebuilt.entries == {}
    monkeypatch.setattr(lb, "MAX_TABLE_BYTES", 8 << 20)
    cost_of(model, rebuilt)
    assert timer.units == 4  # timed again
    assert len(json.loads(rebuilt.path.read_text())["entries"]) == 4  # and written whole


def test_the_table_key_changes_with_threads_batch_and_runtime(tmp_path):
    base = table(tmp_path)
    others = [table(tmp_path, threads=1), table(tmp_path, batch=1), table(tmp_path, runtime="torch")]
    keys = {base.key, *(t.key for t in others)}
    paths = {base.path, *(t.path for t in others)}
    assert len(keys) == 4 and len(paths) == 4
    spec = lb.layer_specs(cnn(), SHAPE)[0]
    assert spec.signature(1) != spec.signature(64)
    with pytest.raises(ValueError, match="runtime"):
        lb.LatencyTable("tensorrt", batch=1, threads=1, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="batch 64 with 2 threads"):
        lb.latency_cost(cnn(), SHAPE, batch=1, runtime="onnxruntime", threads=2, table=base)


def test_prediction_is_monotone_in_the_shares_and_matches_the_pruned_models_cost(tmp_path):
    model = cnn()
    before = {k: v.shape for k, v in model.state_dict().items()}
    cost = cost_of(model, table(tmp_path))
    groups = roots(model)
    # the fake timer has no rest of the network: the unpruned prediction is the whole model's
    assert cost.rest_ms == pytest.approx(0.0, abs=1e-9)
    assert cost({}) == pytest.approx(count_macs(model, SHAPE) * 64 * NS_PER_MAC)
    uniform = [cost({root: share for root in groups}) for share in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)]
    assert all(a > b for a, b in zip(uniform, uniform[1:])), uniform
    for root in groups:  # one group pruned more, the others fixed: never slower
        alone = [cost({**{g: 0.3 for g in groups}, root: share}) for share in (0.0, 0.3, 0.6, 0.9)]
        assert all(a >= b for a, b in zip(alone, alone[1:])), (root, alone)
    uneven = {groups[0]: 0.2, groups[1]: 0.6, groups[2]: 0.4}
    pruned = cnn()
    StructuredPruner(pruned, SHAPE, scope="layer").prune_ratios(uneven)
    assert cost(uneven) == pytest.approx(count_macs(pruned, SHAPE) * 64 * NS_PER_MAC)
    assert {k: v.shape for k, v in model.state_dict().items()} == before  # the model itself is not pruned


def test_round_to_reaches_the_pruned_shapes(tmp_path):
    model = cnn()
    tab = table(tmp_path)
    plain = cost_of(model, tab)
    rounded = lb.latency_cost(model, SHAPE, batch=64, runtime="onnxruntime", threads=2, round_to=8, table=tab)
    widths = {s.name: s.out_channels for s in rounded.specs({"features.0": 0.3})}
    assert widths["features.0"] == 24  # 32 * 0.7 = 22.4 channels kept, rounded up to a multiple of 8
    assert {s.name: s.out_channels for s in plain.specs({"features.0": 0.3})}["features.0"] == 22


def test_a_real_table_entry_is_timed_and_saved(tmp_path):
    tab = lb.LatencyTable("onnxruntime", batch=4, threads=1, cache_dir=tmp_path)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    spec = lb.layer_specs(net, (1, 8, 8))[0]
    ms = tab.latency(spec)
    assert math.isfinite(ms) and ms > 0 and tab.timed == 1
    tab.save()
    assert lb.LatencyTable("onnxruntime", batch=4, threads=1, cache_dir=tmp_path).latency(spec) == ms


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_verify_latency_returns_the_median_of_each_models_rounds(runtime):
    torch.manual_seed(0)
    models = {
        "small": nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)),
        "large": nn.Sequential(nn.Flatten(), nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 3)),
    }
    timed = lb.verify_latency(models, (1, 4, 4), batch=8, runtime=runtime, threads=1, rounds=3)
    assert set(timed) == {"small", "large"}
    for t in timed.values():
        assert len(t["rounds_ms"]) == 3 and all(r > 0 for r in t["rounds_ms"])
        assert t["median_ms"] == pytest.approx(sorted(t["rounds_ms"])[1])
        assert t["iqr_ms"] >= 0 and runtime in t["method"]
    assert all(m.training for m in models.values())  # the caller's modes are left alone


def test_a_units_onnx_from_its_familys_template_is_what_exporting_it_gives():
    import onnx

    from kdcompress.export.onnx_common import export_onnx

    class Net(nn.Module):  # a conv unit (BatchNorm, ReLU, pooling) and a Linear on (tokens, features)
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv1d(3, 6, 3, padding=1, bias=False), nn.BatchNorm1d(6), nn.ReLU())
            self.pool, self.linear = nn.MaxPool1d(2), nn.Linear(6, 5)

        def forward(self, x):
            return self.linear(self.pool(self.conv(x)).transpose(1, 2)).mean(1)

    def described(blob):
        graph = onnx.load_model_from_string(blob).graph
        return [(n.op_type, list(n.attribute)) for n in graph.node], sorted(list(i.dims) for i in graph.initializer)

    specs = lb.layer_specs(Net(), (3, 8))
    assert specs[0].after[-1].startswith("MaxPool1d") and (specs[1].op, specs[1].input_shape) == ("Linear", (4, 6))
    for spec in specs:
        template = lb.unit_onnx(spec)
        direct = export_onnx(lb.layer_module(spec), torch.zeros(2, *spec.input_shape)).SerializeToString()
        assert described(template) == described(direct)
        assert any(spec.out_channels in dims for dims in described(template)[1])


def test_the_rest_of_the_network_is_scaled_with_the_layers_or_held_constant(tmp_path):
    class SlowWhole(CountingTimer):  # the whole model costs 2 ms more than its units: the rest of the network
        def __call__(self, module, input_shape, **kw):
            return super().__call__(module, input_shape, **kw) + (2.0 if isinstance(module, SmallCNN) else 0.0)

    model, tab = cnn(), table(tmp_path, SlowWhole())
    scaled = cost_of(model, tab)
    constant = lb.latency_cost(model, SHAPE, batch=64, runtime="onnxruntime", threads=2, table=tab, rest="constant")
    half = {root: 0.5 for root in roots(model)}
    layers = scaled.layers(half)
    assert scaled.rest_ms == pytest.approx(2.0) and constant.rest_ms == pytest.approx(2.0)
    assert scaled({}) == pytest.approx(constant({})) == pytest.approx(scaled.whole_ms)
    assert constant(half) == pytest.approx(layers + 2.0)
    assert scaled(half) == pytest.approx(scaled.whole_ms * layers / scaled.layers_ms)
    assert scaled(half) < constant(half)
    with pytest.raises(ValueError, match="rest"):
        lb.latency_cost(model, SHAPE, batch=64, runtime="onnxruntime", threads=2, table=tab, rest="other")
