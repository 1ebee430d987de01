"""report.json carries everything the HTML report shows (issue 12, data part): schema_version, generated_at,
run_name, the resolved recipe, the environment, per stage the training curve, per-class accuracy with the
confusion matrix and the per-layer weights (or channels) kept, and the confusions that changed most. Latency
is cached per file, so report.json is a pure function of the run directory; docs/report-json.md documents every key.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_RECIPE, _deep_merge
from torch import nn

from kdcompress.checkpoint import load_checkpoint, read_manifest, save_checkpoint
from kdcompress.data import CLASS_NAMES, TensorData
from kdcompress.measure import LATENCY_ROUNDS
from kdcompress.models import build_from_checkpoint
from kdcompress.report import build_report, report_markdown, report_table, write_report
from kdcompress.report import latency as latency_mod
from kdcompress.train import evaluate

RUN = Path("runs") / "tiny"
FASHION = list(CLASS_NAMES["FashionMNIST"])
ENVIRONMENT_KEYS = {
    "kdcompress",
    "torch",
    "torchvision",
    "python",
    "platform",
    "cpu_count",
    "train_device",
    "latency_threads",
    "latency_measured_at",
}
CURVE_KEYS = {
    "epoch",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "val_loss",
    "val_accuracy",
    "lr",
    "first_batch_loss",
    "max_batch_loss",
    "sparsity",
    "seconds",
}


def _text(changes: dict) -> str:
    return yaml.safe_dump(_deep_merge(TINY_RECIPE, changes), sort_keys=False)


@pytest.fixture(scope="module")
def tiny_run(fresh_run):
    """`kdc run` on the tiny recipe (no latency); returns the run directory."""
    work, _ = fresh_run(_text({}), "report-data", "run")
    return work / RUN


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(tiny_run, dest)
    return dest


@pytest.fixture(scope="module")
def timed_run(fresh_run):
    """The tiny recipe with latency at batch 1 and 8 on one thread and a sparse artifact exported by `kdc run`,
    timed briefly; returns the run directory."""
    text = _text(
        {"report": {"latency": True, "latency_batches": [1, 8], "threads": 1}, "export": {"formats": ["sparse"]}}
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(latency_mod, "LATENCY_MIN_RUN_TIME", 0.02)
        work, _ = fresh_run(text, "report-data-timed", "run")
    return work / RUN


def _rows(report: dict) -> dict:
    return {r["stage"]: r for r in report["stages"]}


def _count_latency_calls(monkeypatch) -> list:
    """Record (model, (batch,)) for every model and batch size the report times (it still times them)."""
    calls = []
    real = latency_mod.time_in_child

    def counting(files, sets, threads, **kwargs):
        calls.extend((key, (batch,)) for batch, keys in sets for key in keys)
        return real(files, sets, threads, **kwargs)

    monkeypatch.setattr(latency_mod, "time_in_child", counting)
    monkeypatch.setattr(latency_mod, "LATENCY_MIN_RUN_TIME", 0.02)
    return calls


# --------------------------------------------------------------------------- the confusion matrix at training time


def test_evaluate_returns_the_confusion_matrix_only_when_asked():
    # a "model" that predicts class (first pixel value mod 3): the matrix is known exactly
    images = torch.tensor([0, 1, 2, 0, 1, 2, 0], dtype=torch.uint8).view(7, 1, 1, 1)
    labels = torch.tensor([0, 1, 2, 1, 1, 0, 0])
    data = TensorData(images, labels, (0.0,), (1.0,))

    class ByPixel(nn.Module):
        def forward(self, x):
            return nn.functional.one_hot((x.view(-1) * 255).round().long() % 3, 3).float() * 10  # x was scaled by 1/255

    plain = evaluate(ByPixel(), data, batch_size=3, device=torch.device("cpu"))
    assert set(plain) == {"loss", "accuracy"}
    full = evaluate(ByPixel(), data, batch_size=3, device=torch.device("cpu"), confusion=True)
    assert full["accuracy"] == plain["accuracy"] == pytest.approx(5 / 7) and full["loss"] == plain["loss"]
    # rows: true class; columns: predicted. True 1 predicted 0 once, true 0 predicted 2 once.
    assert full["confusion"] == [[2, 0, 1], [1, 2, 0], [0, 0, 1]]
    assert all(isinstance(c, int) for row in full["confusion"] for c in row)


def test_every_stage_checkpoint_records_its_test_confusion_matrix_and_device(tiny_run):
    for stage in ("teacher", "student", "distilled", "pruned"):
        metrics = load_checkpoint(tiny_run / stage / "model.pt")["metrics"]
        confusion = metrics["confusion"]
        assert len(confusion) == 10 and all(len(row) == 10 for row in confusion), stage
        assert sum(map(sum, confusion)) == metrics["test_samples"] == 2000
        assert sum(confusion[i][i] for i in range(10)) / 2000 == pytest.approx(metrics["test_accuracy"])
        assert [sum(row) for row in confusion] == [200] * 10  # fashion-mnist-mini: 200 test images per class
        assert metrics["train_device"] == "cpu"


def test_a_supplied_teacher_records_its_confusion_matrix_and_an_empty_curve(tiny_run, fresh_run):
    supplied = tiny_run / "teacher" / "model.pt"
    work, _ = fresh_run(_text({"teacher": {"checkpoint": str(supplied)}}), "report-data-supplied", "run")
    teacher = load_checkpoint(work / RUN / "teacher" / "model.pt")["metrics"]
    assert teacher["confusion"] == load_checkpoint(supplied)["metrics"]["confusion"]  # evaluated, same weights
    report = json.loads((work / RUN / "report.json").read_text())
    row = _rows(report)["teacher"]
    assert row["curve"] == []  # not trained here: no epochs
    assert row["per_class"]["confusion"] == teacher["confusion"]
    assert _rows(report)["student"]["curve"] != []


# --------------------------------------------------------------------------- top-level keys


def test_report_json_has_schema_version_time_run_name_recipe_and_environment(tiny_run):
    before = datetime.now(timezone.utc).replace(microsecond=0)
    report = write_report(tiny_run)
    on_disk = json.loads((tiny_run / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert report["schema_version"] == 1
    generated = datetime.fromisoformat(report["generated_at"])
    assert generated.utcoffset() == timedelta(0)
    assert before <= generated <= datetime.now(timezone.utc) + timedelta(seconds=1)
    assert "run_dir" not in report and str(tiny_run) not in json.dumps(report)
    assert report["run_name"] == report["recipe"] == "tiny"
    assert report["recipe_resolved"] == yaml.safe_load((tiny_run / "recipe.yaml").read_text())
    assert report["recipe_resolved"]["distill"]["temperature"] == 4.0  # a default, filled in
    env = report["environment"]
    assert set(env) == ENVIRONMENT_KEYS
    assert env["torch"] == torch.__version__ and env["kdcompress"] == __import__("kdcompress").__version__
    assert env["python"].count(".") == 2 and env["platform"] and env["cpu_count"] >= 1
    assert env["train_device"] == "cpu"
    assert env["latency_threads"] is None and env["latency_measured_at"] is None  # report.latency: false
    assert not (tiny_run / "cache" / "latency.json").exists()  # nothing timed, nothing cached


def test_recipe_resolved_falls_back_to_the_last_checkpoint_s_recipe(run_copy):
    (run_copy / "recipe.yaml").unlink()
    report = build_report(run_copy)
    assert report["recipe_resolved"] == load_checkpoint(run_copy / "pruned" / "model.pt")["recipe"]


def test_train_device_of_old_checkpoints_comes_from_an_explicit_run_device(run_copy):
    for stage in ("teacher", "student", "distilled", "pruned"):
        path = run_copy / stage / "model.pt"
        ckpt = load_checkpoint(path)
        ckpt["metrics"].pop("train_device")
        ckpt["recipe"]["run"]["device"] = "auto" if stage == "teacher" else "cpu"
        save_checkpoint(path, ckpt)
    assert build_report(run_copy)["environment"]["train_device"] == "cpu"  # the teacher's "auto" says nothing
    ckpt = load_checkpoint(run_copy / "pruned" / "model.pt")
    ckpt["metrics"]["train_device"] = "cuda:0 (NVIDIA H200)"
    save_checkpoint(run_copy / "pruned" / "model.pt", ckpt)
    assert build_report(run_copy)["environment"]["train_device"] == "cpu, cuda:0 (NVIDIA H200)"


# --------------------------------------------------------------------------- latency cache, pure function


def test_report_of_a_copied_run_directory_is_the_same_but_for_its_time(timed_run, tmp_path, kdc, monkeypatch):
    """The issue's "pure function" acceptance: `kdc report` on a copy elsewhere gives the same report.json."""
    original = json.loads((timed_run / "report.json").read_text())
    cache = json.loads((timed_run / "cache" / "latency.json").read_text())
    # two stages' checkpoints and the artifact, at batch 1 and 8: every latency in the report is cached
    assert len(cache["entries"]) == 2 * (4 + 1)
    assert original["environment"]["latency_threads"] == 1 and original["environment"]["latency_measured_at"]
    copy = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(timed_run, copy)
    calls = _count_latency_calls(monkeypatch)
    result = kdc("report", str(copy))
    kdc.assert_clean_exit(result, 0)
    again = json.loads((copy / "report.json").read_text())
    assert calls == []  # nothing measured again
    assert datetime.fromisoformat(again["generated_at"]) >= datetime.fromisoformat(original["generated_at"])
    original.pop("generated_at"), again.pop("generated_at")
    assert again == original
    assert again["artifacts"][0]["path"] == "export/pruned-sparse-fp16.kdca"
    assert again["artifacts"][0]["latency_ms"]["8"] > 0
    assert all(set(r["latency"]) == {"1", "8"} for r in again["stages"])


def test_stale_and_refused_rows_do_not_depend_on_where_the_run_directory_is(timed_run, tmp_path, monkeypatch):
    """Messages that name files in the run directory name them relative to it, given as a relative or an
    absolute path."""
    monkeypatch.setattr(latency_mod, "LATENCY_MIN_RUN_TIME", 0.02)  # the cached latencies' budget: taken from the cache
    reports = []
    for where in ("firstdir/place", "second/elsewhere"):  # "firstdir": report.json holds first_batch_loss
        copy = tmp_path / where
        shutil.copytree(timed_run, copy)
        recipe = copy / "recipe.yaml"
        recipe.write_text(recipe.read_text().replace("temperature: 4.0", "temperature: 2.0"))
        artifact = copy / "export" / "pruned-sparse-fp16.kdca"
        artifact.write_bytes(artifact.read_bytes()[:-1])
        monkeypatch.chdir(tmp_path)
        reports.append(build_report(Path(where) if where.startswith("firstdir") else copy))
    for report in reports:
        text = json.dumps(report)
        assert str(tmp_path) not in text and "firstdir" not in text and "elsewhere" not in text
        report.pop("generated_at")
    assert reports[0] == reports[1]
    rows = _rows(reports[0])
    assert "changed since distilled/model.pt was written" in rows["distilled"]["stale"]
    assert reports[0]["artifacts"][0]["refused"].startswith("export/pruned-sparse-fp16.kdca was refused")


def test_a_changed_checkpoint_is_measured_again_and_its_old_entries_dropped(timed_run, tmp_path, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(timed_run, copy)
    old_sha = read_manifest(copy / "pruned" / "model.pt")["sha256"]
    ckpt = load_checkpoint(copy / "pruned" / "model.pt")
    ckpt["metrics"]["test_loss"] += 0.001  # another file: another SHA-256
    save_checkpoint(copy / "pruned" / "model.pt", ckpt)
    new_sha = read_manifest(copy / "pruned" / "model.pt")["sha256"]
    calls = _count_latency_calls(monkeypatch)
    before = _rows(json.loads((copy / "report.json").read_text()))
    report = build_report(copy)
    assert [batches for _, batches in calls] == [(1,), (8,)]  # the pruned checkpoint alone, at each batch size
    rows = _rows(report)
    assert rows["distilled"]["latency"] == before["distilled"]["latency"]  # reused
    entries = json.loads((copy / "cache" / "latency.json").read_text())["entries"].values()
    shas = {e["sha256"] for e in entries}
    assert new_sha in shas and old_sha not in shas and len(entries) == 2 * 5
    calls.clear()
    build_report(copy, batches=[8, 2])
    assert [batches for _, batches in calls] == [(2,)] * 5  # a new batch size is measured for every file, 8 is not


def test_every_stage_and_artifact_is_timed_in_the_same_rounds_in_a_passive_process(timed_run):
    report = json.loads((timed_run / "report.json").read_text())
    assert report["latency_rounds"] == LATENCY_ROUNDS
    assert report["omp_wait_policy"] == "PASSIVE"  # what the timing process ran with, whatever the tests' own is
    timed = [*report["stages"], *report["artifacts"]]
    assert len(timed) == 5
    for batch in ("1", "8"):  # one set of rounds per batch size, every model in it
        assert len({row["latency"][batch]["round_set"] for row in timed}) == 1
        assert {row["latency"][batch]["runs"] for row in timed} == {LATENCY_ROUNDS}
        assert {len(row["latency"][batch]["rounds_ms"]) for row in timed} == {LATENCY_ROUNDS}
    assert timed[0]["latency"]["1"]["round_set"] != timed[0]["latency"]["8"]["round_set"]
    note = " ".join(report_markdown(report).split())
    assert f"over {LATENCY_ROUNDS} rounds in which every model ran in turn" in note and "sets;" not in note
    rows = _rows(report)
    for comp in report["comparisons"]:  # each ratio: the median of the per-round ratios of the same rounds
        first, second = rows[comp["against"]]["latency"], rows[comp["stage"]]["latency"]
        assert comp["latency_ratio"] == {
            b: pytest.approx(statistics.median(x / y for x, y in zip(first[b]["rounds_ms"], second[b]["rounds_ms"])))
            for b in ("1", "8")
        }
        ratio = comp["latency_ratio"]["8"]
        assert f"latency {comp['against']}/{comp['stage']} " in note and f"{ratio:.2f}x at batch 8" in note


def test_a_rerun_stage_is_timed_in_new_rounds_and_the_report_says_ratios_across_them_differ(
    timed_run, tmp_path, monkeypatch
):
    copy = tmp_path / "run"
    shutil.copytree(timed_run, copy)
    before = {r["stage"]: r for r in json.loads((copy / "report.json").read_text())["stages"]}
    ckpt = load_checkpoint(copy / "distilled" / "model.pt")
    ckpt["metrics"]["test_loss"] += 0.001  # another file: timed again, alone
    save_checkpoint(copy / "distilled" / "model.pt", ckpt)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    calls = _count_latency_calls(monkeypatch)
    report = build_report(copy)
    assert [key for key, _ in calls] == ["stage distilled", "stage distilled"]
    rows = _rows(report)
    assert rows["pruned"]["latency"] == before["pruned"]["latency"]  # cached: the same figures, the same rounds
    for batch in ("1", "8"):
        cached = {rows[s]["latency"][batch]["round_set"] for s in ("teacher", "student", "pruned")}
        cached.add(report["artifacts"][0]["latency"][batch]["round_set"])
        assert len(cached) == 1 and rows["distilled"]["latency"][batch]["round_set"] not in cached
    assert report["omp_wait_policy"] == "PASSIVE"
    note = " ".join(report_markdown(report).split())
    assert "batch 1: 2 sets, batch 8: 2 sets" in note and "delete cache/latency.json to time all together" in note
    comparisons = {(c["against"], c["stage"]): c["latency_ratio"] for c in report["comparisons"]}
    assert comparisons[("student", "distilled")] == {"1": None, "8": None}  # a fresh figure against a cached one
    assert "student/distilled not compared at batch 1 (timed in different rounds)" in note
    pruned, distilled = rows["pruned"]["latency"]["8"], rows["distilled"]["latency"]["8"]
    assert comparisons[("distilled", "pruned")]["8"] is None and pruned["round_set"] != distilled["round_set"]


def test_a_planted_latency_cache_entry_of_the_wrong_shape_is_timed_afresh(timed_run, tmp_path, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(timed_run, copy)
    path = copy / "cache" / "latency.json"
    cache = json.loads(path.read_text())
    key, entry = next((k, e) for k, e in cache["entries"].items() if e["batch"] == 8)
    entry["timing"]["median_ms"] = "0.001"  # text where kdc writes a number
    path.write_text(json.dumps(cache))
    calls = _count_latency_calls(monkeypatch)
    report = build_report(copy)
    assert [batches for _, batches in calls] == [(8,)]  # that figure alone, timed again
    assert all(isinstance(r["latency_ms"]["8"], float) for r in [*report["stages"], *report["artifacts"]])
    assert json.loads(path.read_text())["entries"][key]["timing"]["median_ms"] != "0.001"


def test_a_cached_latency_with_an_interquartile_range_of_zero_is_reused(timed_run, tmp_path, monkeypatch):
    """0 is a number: identical rounds (a coarse timer) give an IQR of 0, which is no reason to time again."""
    copy = tmp_path / "run"
    shutil.copytree(timed_run, copy)
    path = copy / "cache" / "latency.json"
    cache = json.loads(path.read_text())
    for entry in cache["entries"].values():
        entry["timing"]["iqr_ms"] = 0.0
    path.write_text(json.dumps(cache))
    calls = _count_latency_calls(monkeypatch)
    build_report(copy)
    assert calls == []


def test_a_damaged_latency_cache_is_measured_afresh(timed_run, tmp_path, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(timed_run, copy)
    (copy / "cache" / "latency.json").write_text("{not json")
    calls = _count_latency_calls(monkeypatch)
    report = build_report(copy)
    assert len(calls) == 2 * 5 and all(r["latency"]["8"]["median_ms"] > 0 for r in report["stages"])
    assert len(json.loads((copy / "cache" / "latency.json").read_text())["entries"]) == 10


# --------------------------------------------------------------------------- per stage: curve, per_class, layers


def test_curve_holds_every_epoch_of_metrics_jsonl(tiny_run):
    report = build_report(tiny_run)
    for row in report["stages"]:
        records = [json.loads(line) for line in (tiny_run / row["stage"] / "metrics.jsonl").read_text().splitlines()]
        curve = row["curve"]
        assert [p["epoch"] for p in curve] == [1, 2] == [r["epoch"] for r in records]
        for point, record in zip(curve, records):
            assert set(point) == CURVE_KEYS
            for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr", "seconds"):
                assert point[key] == record[key], key
            assert point["val_loss"] is None and point["val_accuracy"] is None  # no validation split held out
        if row["stage"] == "pruned":
            assert curve[-1]["sparsity"] == pytest.approx(0.75) and 0 < curve[0]["sparsity"] <= 0.75
        else:
            assert all(p["sparsity"] is None for p in curve)


def test_curve_falls_back_to_the_checkpoint_history(run_copy):
    (run_copy / "student" / "metrics.jsonl").unlink()
    history = load_checkpoint(run_copy / "student" / "model.pt")["history"]
    curve = _rows(build_report(run_copy))["student"]["curve"]
    assert [p["train_loss"] for p in curve] == [r["train_loss"] for r in history] and len(curve) == 2


def test_per_class_accuracy_and_confusion_with_the_dataset_s_class_names(tiny_run):
    report = build_report(tiny_run)
    for row in report["stages"]:
        per_class = row["per_class"]
        confusion = load_checkpoint(tiny_run / row["stage"] / "model.pt")["metrics"]["confusion"]
        assert per_class["classes"] == FASHION
        assert per_class["confusion"] == confusion
        assert per_class["accuracy"] == [confusion[i][i] / 200 for i in range(10)]
        assert sum(per_class["accuracy"]) / 10 == pytest.approx(row["accuracy"])  # 200 images of each class


def test_per_class_is_null_for_old_checkpoints_and_names_fall_back_to_numbers(run_copy):
    path = run_copy / "student" / "model.pt"
    ckpt = load_checkpoint(path)
    ckpt["metrics"].pop("confusion")
    save_checkpoint(path, ckpt)
    path = run_copy / "distilled" / "model.pt"
    ckpt = load_checkpoint(path)
    ckpt.pop("preprocess")
    ckpt["dataset"] = "mypkg.data:build"  # a user's dataset without class names
    save_checkpoint(path, ckpt)
    report = build_report(run_copy)
    rows = _rows(report)
    assert rows["student"]["per_class"] is None
    assert rows["distilled"]["per_class"]["classes"] == [str(i) for i in range(10)]
    assert rows["pruned"]["per_class"]["classes"] == FASHION
    # the old student has nothing to compare: only distilled -> pruned changes are listed
    assert {(c["from_stage"], c["to_stage"]) for c in report["class_changes"]} == {("distilled", "pruned")}
    report_markdown(report), report_table(report)  # the other views still render


def test_layers_count_the_weights_kept_per_prunable_layer(tiny_run):
    report = build_report(tiny_run)
    rows = _rows(report)
    for stage, row in rows.items():
        model = build_from_checkpoint(load_checkpoint(tiny_run / stage / "model.pt"))
        expected = [
            {"name": name, "kind": "weights", "total": m.weight.numel(), "kept": int(torch.count_nonzero(m.weight))}
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear)
        ]
        assert row["layers"] == expected, stage
    pruned, distilled = rows["pruned"]["layers"], rows["distilled"]["layers"]
    assert [layer["name"] for layer in pruned] == ["net.1", "net.3"]
    assert [layer["total"] for layer in pruned] == [layer["total"] for layer in distilled] == [784 * 32, 32 * 10]
    assert sum(layer["kept"] for layer in pruned) / sum(layer["total"] for layer in pruned) == pytest.approx(0.25)
    assert all(layer["kept"] == layer["total"] for layer in distilled)


def test_layers_of_a_structured_pruned_stage_count_channels_against_the_distilled_student(fresh_run):
    text = _text(
        {
            "prune": {
                "method": "structured",
                "scope": "layer",
                "target_sparsity": 0.5,
                "sparsity_schedule": "agp",
                "steps": 2,
                "epochs": 2,
            }
        }
    )
    work, _ = fresh_run(text, "report-data-structured", "run")
    report = json.loads((work / RUN / "report.json").read_text())
    rows = _rows(report)
    assert rows["pruned"]["layers"] == [
        {"name": "net.1", "kind": "channels", "total": 32, "kept": 16},  # half the hidden features removed
        {"name": "net.3", "kind": "channels", "total": 10, "kept": 10},  # the classes stay
    ]
    assert rows["distilled"]["layers"][0] == {"name": "net.1", "kind": "weights", "total": 784 * 32, "kept": 784 * 32}
    assert rows["pruned"]["curve"][-1]["sparsity"] == pytest.approx(rows["pruned"]["channel_sparsity"])


# --------------------------------------------------------------------------- class_changes


def _with_confusions(run_copy: Path, confusions: dict[str, list[list[int]]]) -> dict:
    for stage, confusion in confusions.items():
        path = run_copy / stage / "model.pt"
        ckpt = load_checkpoint(path)
        ckpt["metrics"]["confusion"] = confusion
        save_checkpoint(path, ckpt)
    return build_report(run_copy)


def test_class_changes_are_the_largest_off_diagonal_changes_between_the_students(run_copy):
    def matrix(changes: dict) -> list[list[int]]:
        m = [[200 if i == j else 0 for j in range(10)] for i in range(10)]
        for (i, j), count in changes.items():
            m[i][j] += count
            m[i][i] -= count
        return m

    report = _with_confusions(
        run_copy,
        {
            "student": matrix({(6, 0): 30, (2, 4): 5}),
            "distilled": matrix({(6, 0): 10, (2, 4): 5, (4, 2): 3}),
            "pruned": matrix({(6, 0): 12, (2, 4): 40}),
        },
    )
    changes = report["class_changes"]
    as_tuples = [
        (c["from_stage"], c["to_stage"], c["true"], c["predicted"], c["before"], c["after"], c["change"])
        for c in changes
    ]
    assert as_tuples == [
        ("distilled", "pruned", 2, 4, 5, 40, 35),
        ("student", "pruned", 2, 4, 5, 40, 35),
        ("student", "distilled", 6, 0, 30, 10, -20),
        ("student", "pruned", 6, 0, 30, 12, -18),
        ("student", "distilled", 4, 2, 0, 3, 3),
        ("distilled", "pruned", 4, 2, 3, 0, -3),
        ("distilled", "pruned", 6, 0, 10, 12, 2),
    ]  # largest |change| first; ties in pair order; no diagonal entries; unchanged cells left out
    assert changes[0]["true_name"] == "Pullover" and changes[0]["predicted_name"] == "Coat"


def test_class_changes_keep_the_ten_largest(tiny_run):
    report = build_report(tiny_run)
    changes = report["class_changes"]
    assert len(changes) == 10
    sizes = [abs(c["change"]) for c in changes]
    assert sizes == sorted(sizes, reverse=True)
    rows = _rows(report)
    every = []
    for first, second in (("student", "distilled"), ("distilled", "pruned"), ("student", "pruned")):
        a, b = rows[first]["per_class"]["confusion"], rows[second]["per_class"]["confusion"]
        every += [abs(b[i][j] - a[i][j]) for i in range(10) for j in range(10) if i != j]
    assert sizes == sorted(every, reverse=True)[:10]
    for c in changes:
        assert c["true"] != c["predicted"]
        assert c["before"] == rows[c["from_stage"]]["per_class"]["confusion"][c["true"]][c["predicted"]]
        assert c["after"] == rows[c["to_stage"]]["per_class"]["confusion"][c["true"]][c["predicted"]]
        assert c["change"] == c["after"] - c["before"]


# --------------------------------------------------------------------------- docs/report-json.md documents every key


def _documented_keys() -> set[str]:
    page = (Path(__file__).resolve().parents[2] / "docs" / "report-json.md").read_text(encoding="utf-8")
    return set(re.findall(r"`([A-Za-z_0-9]+)`", page))


def _keys(value, into: set[str]) -> set[str]:
    """Every dict key in a JSON value, except those that are data (batch sizes, recipe keys, stage names)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key.isdigit():  # latency by batch size
                _keys(item, into)
                continue
            into.add(key)
            if key not in ("recipe_resolved", "options", "info", "args", "loss_args"):
                _keys(item, into)
    elif isinstance(value, list):
        for item in value:
            _keys(item, into)
    return into


def test_docs_report_json_documents_every_report_json_key(timed_run):
    report = json.loads((timed_run / "report.json").read_text())
    rows = _rows(report)
    rows["student"]["seeds"] = [{"seed": 0, "accuracy": 0.8}]  # the keys `kdc run --seeds` adds, as it adds them
    rows["student"].update(accuracy_mean=0.8, accuracy_std=0.01, trained_once=False)
    report["comparisons"][0]["seeds"] = {
        "n": 2,
        "differences": [{"seed": 0, "difference": 0.01}],
        "mean": 0.01,
        "std": 0.0,
        "se": 0.0,
        "noise_z": 2.0,
        "mean_above_2se": False,
    }
    missing = sorted(_keys(report, set()) - _documented_keys())
    assert not missing, f"docs/report-json.md does not document: {missing}"
