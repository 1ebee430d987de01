"""A frontier, not a point (issue 21, item 5): `kdc frontier` sweeps pruning budgets (or any grid), exports
every point and the distilled student they share, and writes frontier.json and frontier.html: accuracy against
latency and against bytes, the non-dominated points marked and joined, a table of run directories.

The non-dominated set is checked on hand-made points; the command end to end on a tiny CNN (fashion-mnist-mini,
one epoch per stage, structured pruning at three target sparsities, the teacher and distilled student trained
once); the page in headless Chromium (skipped where none is installed).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from conftest import measured_in_chromium

import kdcompress.report.latency as latency_mod
from kdcompress.errors import UsageError
from kdcompress.recipe import load_recipe
from kdcompress.report.frontier import build_frontier, frontier_entry, non_dominated
from kdcompress.run import budget_grid, frontier_formats, grid_points, parse_grid, point_label, point_name
from kdcompress.run.share import expected_fingerprints

SWEEP = Path("runs") / "front" / "sweep"
BUDGETS = ("0.7", "0.5", "0.3")  # prune.budget.macs: a share of the distilled student's MACs
CNN = {"model": "cnn", "args": {"channels": [4, 8], "hidden": 16}}
FRONT_RECIPE = {
    "run": {"name": "front", "seed": 0, "device": "cpu"},
    "data": {"dataset": "fashion-mnist-mini", "batch_size": 256},
    "teacher": {**CNN, "epochs": 1},
    "student": {**CNN, "baseline": False},
    "distill": {"epochs": 1},
    "prune": {
        "method": "structured",
        "scope": "layer",
        "budget": {"macs": 0.5},
        "sparsity_schedule": "one-shot",
        "epochs": 1,
    },
    "report": {"latency": True, "latency_batches": [8], "threads": 1},
}


# --------------------------------------------------------------------------- the non-dominated set, by hand


def test_a_single_point_is_its_own_frontier():
    assert non_dominated([{"accuracy": 0.5, "bytes": 10}], "bytes") == [0]


def test_a_dominated_point_is_left_out_and_the_frontier_runs_cheapest_first():
    points = [
        {"accuracy": 0.90, "bytes": 400},  # the most accurate: on it
        {"accuracy": 0.85, "bytes": 500},  # less accurate and larger than the first: dominated
        {"accuracy": 0.80, "bytes": 100},  # the smallest: on it
        {"accuracy": 0.80, "bytes": 150},  # as accurate as the smallest, larger: dominated
        {"accuracy": 0.70, "bytes": 100},  # as small as the smallest, less accurate: dominated
    ]
    assert non_dominated(points, "bytes") == [2, 0]


def test_equal_points_are_both_kept_and_points_without_a_value_take_no_part():
    points = [
        {"accuracy": 0.8, "latency_ms": 2.0},
        {"accuracy": 0.8, "latency_ms": 2.0},
        {"accuracy": 0.99, "latency_ms": None},  # not timed: it cannot dominate the others
        {"accuracy": None, "latency_ms": 0.1},
        {"accuracy": 0.7, "latency_ms": float("nan")},
    ]
    assert non_dominated(points, "latency_ms") == [0, 1]
    assert non_dominated([], "bytes") == []


def test_build_frontier_takes_the_largest_batch_every_point_was_timed_at():
    points = [
        {"label": "a", "accuracy": 0.9, "bytes": 300, "latencies_ms": {"1": 0.5, "64": 9.0, "128": 20.0}},
        {"label": "b", "accuracy": 0.8, "bytes": 100, "latencies_ms": {"1": 0.2, "64": 4.0}},
        {"label": "c", "accuracy": 0.7, "bytes": 200, "latencies_ms": {"1": 0.1, "64": 5.0}},
        {"label": "d", "accuracy": 0.6, "bytes": None, "latencies_ms": {}},
    ]
    frontier = build_frontier(points, "onnx")
    assert frontier["latency_batch"] == 64
    assert [p["latency_ms"] for p in frontier["points"]] == [9.0, 4.0, 5.0, None]
    assert frontier["frontier"] == {"latency": ["b", "a"], "bytes": ["b", "a"]}
    marks = {p["label"]: p["on_frontier"] for p in frontier["points"]}
    assert marks["c"] == {"latency": False, "bytes": False}
    assert marks["d"] == {"latency": None, "bytes": None}  # nothing measured: neither on it nor off it


def _report(artifact: dict | None) -> dict:
    stage = {"stage": "pruned", "accuracy": 0.8, "accuracy_se": 0.01, "checkpoint_bytes": 9000, "macs": 1000}
    stage["latency_ms"] = {"1": 0.3, "8": 1.5}
    return {"stages": [stage], "artifacts": [artifact] if artifact else []}


def test_an_entry_reads_the_exported_file_and_falls_back_to_the_checkpoint():
    onnx = {"stage": "pruned", "format": "onnx", "path": "export/pruned.onnx", "accuracy": 0.79, "bytes": 4000}
    onnx["latency_ms"] = {"1": 0.1, "8": 0.6}
    entry = frontier_entry(_report(onnx), "pruned", "onnx")
    assert (entry["accuracy"], entry["stage_accuracy"], entry["bytes"]) == (0.79, 0.8, 4000)
    assert entry["latencies_ms"] == {"1": 0.1, "8": 0.6}
    assert entry["bytes_source"] == entry["latency_source"] == "export/pruned.onnx"
    for unusable in ({**onnx, "refused": "damaged"}, {**onnx, "stale": "changed"}, {**onnx, "format": "int8"}):
        entry = frontier_entry(_report(unusable), "pruned", "onnx")
        assert (entry["accuracy"], entry["bytes"], entry["bytes_source"]) == (0.8, 9000, "pruned/model.pt")
        assert entry["latencies_ms"] == {"1": 0.3, "8": 1.5}
    untimed = frontier_entry(_report({**onnx, "latency_ms": None}), "pruned", "onnx")
    assert untimed["bytes"] == 4000 and untimed["latency_source"] == "pruned/model.pt"
    assert "missing" in frontier_entry(_report(None), "distilled", "onnx")


def test_budget_options_become_grid_items_with_short_labels():
    assert budget_grid("macs=0.5,0.25,0.15") == "prune.budget.macs=0.5,0.25,0.15"
    assert budget_grid("prune.budget.latency_ms=2") == "prune.budget.latency_ms=2"
    with pytest.raises(UsageError, match="did you mean 'macs'"):
        budget_grid("mac=0.5")
    assert point_label(["prune.budget.macs=0.25", "prune.round_to=8"]) == "macs 0.25, round_to 8"


def test_prune_budget_grid_keys_parse_and_the_points_share_teacher_and_distilled(tmp_path):
    """`kdc sweep --grid prune.budget.macs=0.5,0.25,0.15`: nested keys parse, each point's recipe has its budget,
    and only the pruned stage's fingerprint differs from point to point (the others are trained once)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(FRONT_RECIPE), encoding="utf-8")
    points = grid_points(parse_grid(["prune.budget.macs=0.5,0.25,0.15"]))
    assert [point_name(p) for p in points] == ["macs-0.5", "macs-0.25", "macs-0.15"]
    loaded = [load_recipe(recipe, p) for p in points]
    assert [r.prune.budget.macs for r in loaded] == [0.5, 0.25, 0.15]
    assert {r.prune.budget.kind() for r in loaded} == {"macs"}
    prints = [expected_fingerprints(r) for r in loaded]
    for stage in ("teacher", "distilled"):
        assert len({p[stage] for p in prints}) == 1, stage
    assert len({p["pruned"] for p in prints}) == 3
    assert frontier_formats(loaded[0]) == ("onnx", ["onnx"])
    with_int8 = load_recipe(recipe, ["export.formats=[int8]"])
    assert frontier_formats(with_int8) == ("int8", ["int8"])
    assert frontier_formats(with_int8, "onnx") == ("onnx", ["int8", "onnx"])


def test_frontier_without_budgets_or_with_a_bad_one_is_refused_before_anything_trains(write_recipe, kdc, in_tmp):
    write_recipe(changes={"prune": {"method": "structured"}})
    for args, message in (
        ((), "needs the budgets to sweep: --budget macs=0.5,0.25,0.15"),
        (("--budget", "mac=0.5,0.25"), "did you mean 'macs'"),
        (("--budget", "macs=0.5", "--format", "onxx"), "did you mean 'onnx'"),
    ):
        result = kdc("frontier", "recipe.yaml", *args)
        kdc.assert_clean_exit(result, 2)
        assert message in kdc.flat(result)
    assert not Path("runs").exists()


# --------------------------------------------------------------------------- the command end to end


@pytest.fixture(scope="module")
def frontier_run(fresh_run, kdc):
    """`kdc frontier` over three MACs budgets of the tiny CNN, latency timed briefly, once for this module."""
    work, _ = fresh_run(yaml.safe_dump(FRONT_RECIPE, sort_keys=False), "frontier")
    cwd = os.getcwd()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(latency_mod, "LATENCY_MIN_RUN_TIME", 0.02)
        os.chdir(work)
        try:
            result = kdc("frontier", "recipe.yaml", "--budget", f"macs={','.join(BUDGETS)}")
        finally:
            os.chdir(cwd)
    kdc.assert_clean_exit(result, 0)
    return work, result


def _beats(a: dict, b: dict, cost: str) -> bool:
    better = a["accuracy"] > b["accuracy"] or a[cost] < b[cost]
    return a["accuracy"] >= b["accuracy"] and a[cost] <= b[cost] and better


@pytest.mark.slow
def test_frontier_json_holds_every_exported_point_and_marks_the_undominated(frontier_run):
    work, result = frontier_run
    out = result.output
    assert out.count("teacher: training on") == 1 and out.count("distilled: training on") == 1
    assert out.count("pruned: training on") == 3
    frontier = json.loads((work / SWEEP / "frontier.json").read_text(encoding="utf-8"))
    points = frontier["points"]
    assert [p["label"] for p in points] == ["distilled"] + [f"macs {b}" for b in BUDGETS]
    assert frontier["format"] == "onnx" and frontier["latency_batch"] == 8
    for p in points:
        run_dir = work / p["run_dir"]
        onnx = run_dir / "export" / f"{p['stage']}.onnx"
        assert p["bytes_source"] == p["latency_source"] == f"export/{p['stage']}.onnx"
        assert p["bytes"] == onnx.stat().st_size  # the file's own bytes, not the checkpoint's
        assert p["latency_ms"] > 0 and 0 < p["accuracy"] <= 1
        # still an ordinary point: its recipe.yaml exports the pruned stage, as `kdc export RUN_DIR` would
        assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["export"]["stage"] == "pruned"
    assert sum((work / SWEEP / name / "export" / "distilled.onnx").is_file() for name in os.listdir(work / SWEEP)) == 1
    sizes = [p["bytes"] for p in points[1:]]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < points[0]["bytes"]  # more pruned, smaller
    for axis, cost in (("latency", "latency_ms"), ("bytes", "bytes")):
        for p in points:
            beaten = any(_beats(q, p, cost) for q in points if q is not p)
            assert p["on_frontier"][axis] is (not beaten), (axis, p["label"])
        assert frontier["frontier"][axis] == [
            p["label"] for p in sorted(points, key=lambda p: p[cost]) if p["on_frontier"][axis]
        ]
    assert "frontier.html" in " ".join(result.output.split()) and "macs 0.3" in result.output


@pytest.mark.slow
def test_frontier_html_has_both_charts_every_label_and_each_run_directory(frontier_run):
    work, _ = frontier_run
    html = (work / SWEEP / "frontier.html").read_text(encoding="utf-8")
    frontier = json.loads((work / SWEEP / "frontier.json").read_text(encoding="utf-8"))
    assert html.count("<svg") == 2 and "<script" not in html.lower()
    svgs = re.findall(r"<svg.*?</svg>", html, re.S)
    for svg, axis in zip(svgs, ("bytes", "latency")):
        on = sum(bool(p["on_frontier"][axis]) for p in frontier["points"])
        group = re.search(r'<g id="c\d-kdc-frontier">(.*?)</g>', svg, re.S)
        assert group and group.group(1).count("<use") == on, axis
        for p in frontier["points"]:
            assert f">{p['label']}</text>" in svg, (axis, p["label"])
    for p in frontier["points"]:
        assert f"<code>{p['run_dir']}</code>" in html


_MEASURE_FRONTIER = """<script>
window.addEventListener('load', () => {
  const box = e => { const r = e.getBoundingClientRect(); return [r.width, r.height, r.left, r.top, r.right, r.bottom]; };
  const charts = [...document.querySelectorAll('svg')].map(s => ({
    svg: box(s),
    frontier: [...s.querySelectorAll('[id$="-kdc-frontier"] use')].map(box),
    reference: [...s.querySelectorAll('[id$="-kdc-reference"] use')].map(box),
    line: [...s.querySelectorAll('[id$="-kdc-frontier"] path')].map(box),
  }));
  const out = document.createElement('pre');
  out.id = 'kdc-measure';
  out.textContent = JSON.stringify({charts, rows: document.querySelectorAll('#points tbody tr').length});
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.slow
def test_the_frontier_page_renders_in_headless_chromium(frontier_run, tmp_path):
    """Chromium lays out frontier.html: both charts have a size, every non-dominated point's marker is drawn
    inside its chart, the line joining them too, the reference's diamond, and the table has a row per model."""
    work, _ = frontier_run
    html = (work / SWEEP / "frontier.html").read_text(encoding="utf-8")
    frontier = json.loads((work / SWEEP / "frontier.json").read_text(encoding="utf-8"))
    measured = measured_in_chromium(html, _MEASURE_FRONTIER, 1200, tmp_path)
    assert len(measured["charts"]) == 2 and measured["rows"] == len(frontier["points"])
    for chart, axis in zip(measured["charts"], ("bytes", "latency")):
        width, height, left, top, right, bottom = chart["svg"]
        assert width > 200 and height > 150, chart
        on = sum(bool(p["on_frontier"][axis]) for p in frontier["points"])
        assert len(chart["frontier"]) == on >= 1 and len(chart["reference"]) == 1, (axis, chart)
        for w, h, x0, y0, x1, y1 in chart["frontier"] + chart["reference"]:
            assert w > 0 and h > 0, chart
            assert left <= x0 and x1 <= right and top <= y0 and y1 <= bottom, (axis, chart)
        if on > 1:
            assert any(w > 1 for w, *_ in chart["line"]), chart  # the joining line spans the points


@pytest.mark.slow
def test_a_second_frontier_trains_and_exports_nothing_and_writes_the_same_points(frontier_run, kdc, monkeypatch):
    work, _ = frontier_run
    before = json.loads((work / SWEEP / "frontier.json").read_text(encoding="utf-8"))
    monkeypatch.chdir(work)
    monkeypatch.setattr(latency_mod, "LATENCY_MIN_RUN_TIME", 0.02)  # as timed: the reports reuse their timings
    result = kdc("frontier", "recipe.yaml", "--budget", f"macs={','.join(BUDGETS)}")
    kdc.assert_clean_exit(result, 0)
    assert "training on" not in result.output and "export: writing" not in result.output
    assert result.output.count("is up to date, kept") == 4  # three pruned files and the distilled one
    after = json.loads((work / SWEEP / "frontier.json").read_text(encoding="utf-8"))
    keys = ("label", "accuracy", "bytes", "latency_ms", "on_frontier")
    assert [{k: p[k] for k in keys} for p in after["points"]] == [{k: p[k] for k in keys} for p in before["points"]]
