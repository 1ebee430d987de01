"""The report carries a ship decision: it fits 100 columns, shows each stage's settings, the noise in
test accuracy, distilled against the baseline, latency with its spread, honest size ratios and warnings.
Also the BatchNorm recalibration option the chance warning points to (issue 8, defect 12).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from rich.console import Console
from torch import nn

from kdcompress.checkpoint import load_checkpoint, save_checkpoint
from kdcompress.cli import app
from kdcompress.data import TensorData
from kdcompress.measure import latency, latency_ms
from kdcompress.models import build_model, model_spec
from kdcompress.report import build_report, report_markdown, report_table, report_warnings
from kdcompress.report import latency as latency_mod
from kdcompress.train import evaluate, recalibrate_batchnorm

RUN = Path("runs") / "tiny"
STAGES = ["teacher", "student", "distilled", "pruned"]


@pytest.fixture(scope="module")
def tiny_run(fresh_run, tiny_recipe_text):
    """`kdc run` on the tiny recipe once for this module; returns the run directory."""
    work, _ = fresh_run(tiny_recipe_text, "report", "run")
    return work / RUN


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A private copy of the tiny run directory, free to doctor."""
    dest = tmp_path / "run"
    shutil.copytree(tiny_run, dest)
    return dest


@pytest.fixture
def quick_latency(monkeypatch):
    monkeypatch.setattr(latency_mod, "LATENCY_MIN_RUN_TIME", 0.02, raising=False)


def edit_metrics(run_dir: Path, stage: str, drop=(), **changes) -> None:
    """Rewrite a stage checkpoint with changed (or dropped) metrics, manifest included."""
    path = run_dir / stage / "model.pt"
    ckpt = load_checkpoint(path)
    for key in drop:
        ckpt["metrics"].pop(key, None)
    ckpt["metrics"].update(changes)
    save_checkpoint(path, ckpt)


def render(renderable, width: int = 100) -> str:
    console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def assert_fits(text: str, width: int = 100) -> None:
    assert "…" not in text, text
    too_wide = [line for line in text.splitlines() if len(line.rstrip()) > width]
    assert not too_wide, "\n".join(too_wide)


# --------------------------------------------------------------------------- 100 columns


def test_terminal_report_fits_100_columns(tiny_run, quick_latency):
    report = build_report(tiny_run, latency=True)
    text = render(report_table(report))
    assert_fits(text)
    for stage in STAGES:
        assert stage in text
    for header in ("test acc %", "± SE", "non-zero", "ratio", "latency ms", "median (IQR)", "settings"):
        assert header in text
    # the pruned row's full figures: 75 % sparsity, a non-zero ratio beside the bytes ratio
    pruned = next(line for line in text.splitlines() if line.startswith("│ pruned") and "%" in line and "x" in line)
    assert "75.0%" in pruned


def test_terminal_report_fits_100_columns_with_long_names_and_big_numbers(tiny_run, quick_latency):
    report = build_report(tiny_run, latency=True)
    for row in report["stages"]:
        row["model"] = "torchvision:mobilenet_v3_small"
        row["params"] *= 1000
        row["nonzero_params"] *= 1000
        row["checkpoint_bytes"] *= 1000
        row["macs"] *= 100_000
        row["sparse_macs"] *= 100_000
        row["stale"] = "changed"  # the longest stage names: "distilled*"
        row["latency"] = {b: dict(t, median_ms=1234.5678, iqr_ms=98.7654) for b, t in row["latency"].items()}
        row["train_seconds"] = 3 * 3600 + 17
    text = render(report_table(report))
    assert_fits(text)  # a long model name wraps in its column rather than being cut
    assert "torchvision" in text and "11.7M" not in text and "50.9M" in text


def test_cli_report_honours_columns_and_prints_warnings_after_the_table(run_copy, kdc, monkeypatch):
    student = load_checkpoint(run_copy / "student" / "model.pt")["metrics"]["test_accuracy"]
    edit_metrics(run_copy, "distilled", test_accuracy=student - 0.10)
    result = kdc.runner.invoke(app, ["report", str(run_copy)], env={"COLUMNS": "100"})
    kdc.assert_clean_exit(result, 0)
    assert_fits(result.stdout)
    table_at = result.stdout.index("kdc report: tiny")
    warning_at = result.stdout.index("warning: distillation came out worse than the baseline")
    assert warning_at > table_at
    report = json.loads((run_copy / "report.json").read_text())
    assert any("worse than the baseline" in w for w in report["warnings"])


# --------------------------------------------------------------------------- numbers in report.json


def test_report_json_has_settings_noise_and_honest_ratios(tiny_run, quick_latency):
    report = json.loads(json.dumps(build_report(tiny_run, latency=True)))  # what report.json holds
    rows = {r["stage"]: r for r in report["stages"]}
    teacher = rows["teacher"]
    for row in rows.values():
        assert row["test_samples"] == 2000  # recorded at save time
        p = row["accuracy"]
        assert row["accuracy_se"] == pytest.approx(math.sqrt(p * (1 - p) / 2000))
        assert 0.007 < row["accuracy_se"] < 0.009  # about 0.8 point on 2,000 images
        assert row["epochs"] == 2 and row["settings"]["epochs"] == 2
        assert row["train_seconds"] > 0
        assert 0 < row["train_accuracy"] <= 1
        assert row["nonzero_ratio_vs_teacher"] == pytest.approx(teacher["nonzero_params"] / row["nonzero_params"])
        assert row["compression_vs_teacher"] == row["nonzero_ratio_vs_teacher"]
        assert row["bytes_ratio_vs_teacher"] == pytest.approx(teacher["checkpoint_bytes"] / row["checkpoint_bytes"])
        assert list(row["latency"]) == ["1", "64"]  # batch 1 and 64, keyed as JSON keys are
        for batch, lat in row["latency"].items():
            assert set(lat) >= {"median_ms", "iqr_ms", "p25_ms", "p75_ms", "batch", "threads"}
            assert 0 < lat["p25_ms"] <= lat["median_ms"] <= lat["p75_ms"]
            assert lat["iqr_ms"] == pytest.approx(lat["p75_ms"] - lat["p25_ms"])
            assert (lat["batch"], lat["threads"]) == (int(batch), report["threads"])
        assert row["latency_ms"] == {"1": row["latency"]["1"]["median_ms"], "64": row["latency"]["64"]["median_ms"]}
        assert row["stale"] is None
    assert report["latency_batches"] == [1, 64]
    assert report["threads_asked"] == 2  # report.threads' default
    assert report["threads"] == min(2, len(os.sched_getaffinity(0)))
    assert report["stale_checked"] is True
    # the pruned model has 4x fewer non-zeros than the distilled one, and exactly as many bytes
    assert rows["pruned"]["nonzero_ratio_vs_teacher"] > 3 * rows["pruned"]["bytes_ratio_vs_teacher"]
    assert rows["distilled"]["settings"]["temperature"] == 4.0
    assert rows["distilled"]["settings"]["alpha"] == 0.5
    pruned = rows["pruned"]["settings"]
    assert pruned["method"] == "unstructured magnitude"
    assert (pruned["scope"], pruned["rate"], pruned["target_sparsity"]) == ("global", 0.5, 0.75)
    assert rows["student"]["settings"]["loss"] == "cross-entropy"
    comp = next(c for c in report["comparisons"] if (c["stage"], c["against"]) == ("distilled", "student"))
    d, s = rows["distilled"], rows["student"]
    assert comp["difference"] == pytest.approx(d["accuracy"] - s["accuracy"])
    assert comp["se"] == pytest.approx(math.hypot(d["accuracy_se"], s["accuracy_se"]))
    assert comp["within_noise"] == (abs(comp["difference"]) <= 2 * comp["se"])
    assert isinstance(report["warnings"], list)


def test_report_md_has_the_full_detail(tiny_run, quick_latency):
    report = build_report(tiny_run, latency=True)
    text = report_markdown(report)
    rows = {r["stage"]: r for r in report["stages"]}
    assert f"{rows['teacher']['params']:,}" in text  # full numbers, not 50.9k
    assert f"{rows['pruned']['checkpoint_bytes']:,}" in text
    for phrase in (
        "non-zero ratio vs teacher",
        "bytes ratio vs teacher",
        "± SE",
        "latency batch 1 IQR",
        "latency batch 64 median",
        "MACs if sparse",
        "what sparse kernels could reach",
        "440 ms",
        "unstructured magnitude (global)",
        "T=4.0 alpha=0.5",
        "distilled - student",
    ):
        assert phrase in text, phrase


def test_report_without_test_samples_in_old_checkpoints(run_copy):
    for stage in STAGES:
        edit_metrics(run_copy, stage, drop=["test_samples"])
    student = load_checkpoint(run_copy / "student" / "model.pt")["metrics"]["test_accuracy"]
    edit_metrics(run_copy, "distilled", test_accuracy=student - 0.05)
    report = build_report(run_copy)
    assert all(r["test_samples"] is None and r["accuracy_se"] is None for r in report["stages"])
    comp = report["comparisons"][0]
    assert comp["se"] is None and comp["within_noise"] is None
    assert any("noise is unknown" in w for w in report["warnings"])
    text = render(report_table(report))
    assert "±?" in text and "noise unknown" in text


# --------------------------------------------------------------------------- MACs, sparse MACs, latency (issue 9)


def test_report_shows_dense_and_sparse_macs_and_latency_at_batch_1_and_64(tiny_run, quick_latency):
    report = json.loads(json.dumps(build_report(tiny_run, latency=True)))
    rows = {r["stage"]: r for r in report["stages"]}
    for stage in ("teacher", "student", "distilled"):  # no zeros: both counts agree
        assert rows[stage]["sparse_macs"] == rows[stage]["macs"]
    assert rows["teacher"]["macs"] == 784 * 64 + 64 * 10
    pruned = rows["pruned"]
    model = build_model(load_checkpoint(tiny_run / "pruned" / "model.pt")["arch"])
    model.load_state_dict(load_checkpoint(tiny_run / "pruned" / "model.pt")["state_dict"])
    nonzero_weights = sum(int(torch.count_nonzero(m.weight)) for m in model.modules() if isinstance(m, nn.Linear))
    assert pruned["macs"] == rows["distilled"]["macs"] == 784 * 32 + 32 * 10  # dense kernels: zeros still cost
    assert pruned["sparse_macs"] == nonzero_weights  # one sample, each non-zero weight used once
    assert pruned["sparse_macs"] == pytest.approx(0.25 * pruned["macs"], rel=0.01)  # 75 % sparse
    text = render(report_table(report))
    assert_fits(text)
    for phrase in (
        "MACs if",
        "batch 1",
        "batch 64",
        "what sparse kernels could reach",
        "440 ms instead of 4 ms",
        "OMP_WAIT_POLICY=PASSIVE",
    ):
        assert phrase in " ".join(text.split()), phrase
    cost = next(line for line in text.splitlines() if line.startswith("│ pruned") and "k" in line and "(" in line)
    assert f"{pruned['sparse_macs']:,}" in cost  # 6,352 beside 25.4k


def edit_run_recipe(run_dir: Path, section: str, **changes) -> None:
    """Change values in a run directory's recipe.yaml, ``None`` dropping a key."""
    path = run_dir / "recipe.yaml"
    recipe = yaml.safe_load(path.read_text())
    recipe[section].update(changes)
    recipe[section] = {k: v for k, v in recipe[section].items() if v is not None}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))


def test_report_reads_latency_settings_from_the_run_recipe(run_copy, quick_latency):
    edit_run_recipe(run_copy, "report", latency=True, latency_batches=[1, 8, 16], threads=1)
    report = build_report(run_copy)
    assert report["latency_batches"] == [1, 8, 16] and report["threads"] == 1
    assert list(report["stages"][0]["latency"]) == ["1", "8", "16"]
    assert report["stages"][0]["latency"]["16"]["threads"] == 1
    assert_fits(render(report_table(report)))  # three latency columns still fit 100


def test_report_of_an_old_run_directory_measures_its_one_latency_batch(run_copy, quick_latency):
    """A run directory written before latency_batches: its recipe.yaml says latency_batch: 1."""
    edit_run_recipe(run_copy, "report", latency=True, latency_batch=1, latency_batches=None, threads=None)
    report = build_report(run_copy)
    assert report["stale_checked"] and report["latency_batches"] == [1]
    assert all(r["stale"] is None for r in report["stages"])


# --------------------------------------------------------------------------- stale stages (issue 9)


def _rewrite_recipe(run_dir: Path, old: str, new: str) -> None:
    recipe = run_dir / "recipe.yaml"
    text = recipe.read_text()
    assert old in text
    recipe.write_text(text.replace(old, new))


def test_report_flags_stages_stale_against_the_run_recipe(run_copy):
    _rewrite_recipe(run_copy, "temperature: 4.0", "temperature: 2.0")
    report = build_report(run_copy)
    rows = {r["stage"]: r for r in report["stages"]}
    assert rows["teacher"]["stale"] is None and rows["student"]["stale"] is None
    assert "distill.temperature: 4.0 -> 2.0" in rows["distilled"]["stale"]
    assert "'distilled' stage it reads is not up to date" in rows["pruned"]["stale"]
    stale = [w for w in report["warnings"] if "is stale" in w]
    assert [w.split()[0] for w in stale] == ["distilled", "pruned"]
    # report.json does not depend on where the run directory is: its warnings say RUN_DIR, its paths are relative
    assert "distill.temperature: 4.0 -> 2.0" in stale[0] and "kdc run RUN_DIR" in stale[0]
    assert str(run_copy) not in json.dumps(report)
    assert "changed since distilled/model.pt was written" in rows["distilled"]["stale"]
    named = [w for w in report_warnings(report, run_copy) if "is stale" in w]  # the CLI can name the directory
    assert f"kdc run {run_copy}" in named[0]
    text = render(report_table(report))
    assert_fits(text)
    assert "│ distilled* " in text and "│ pruned*" in text and "│ teacher " in text
    assert "*: stale" in text
    assert "pruned*" in report_markdown(report) and "*: stale" in report_markdown(report)


def test_cli_report_after_a_stage_rerun_with_other_settings_flags_the_stage_downstream(run_copy, kdc, monkeypatch):
    """`kdc distill RUN_DIR --set distill.temperature=2` retrains distilled and rewrites the run's recipe.yaml:
    the pruned checkpoint, made from the old distilled one, is stale, and the report says so."""
    monkeypatch.chdir(run_copy.parent)
    run_dir = Path(run_copy.name)
    edit_run_recipe(run_copy, "run", name=run_copy.name, out_dir=".")  # where the stage command will look
    result = kdc("distill", run_dir, "--set", "distill.temperature=2")
    kdc.assert_clean_exit(result, 0)
    result = kdc.runner.invoke(app, ["report", str(run_dir)], env={"COLUMNS": "100"})
    kdc.assert_clean_exit(result, 0)
    assert_fits(result.stdout)
    report = json.loads((run_copy / "report.json").read_text())
    rows = {r["stage"]: r for r in report["stages"]}
    assert rows["distilled"]["stale"] is None  # just retrained from this recipe
    assert "distill.temperature: 4.0 -> 2.0" in rows["pruned"]["stale"]
    assert "│ pruned*" in result.stdout and "│ distilled " in result.stdout
    flat = " ".join(result.stdout.split())
    assert "warning: pruned is stale" in flat and "distill.temperature: 4.0 -> 2.0" in flat


def test_a_fresh_copy_of_a_run_directory_is_not_stale(run_copy):
    # run_copy lives elsewhere than run.out_dir/run.name say: the check looks at the directory it is given
    report = build_report(run_copy)
    assert report["stale_checked"] and report["stale_check_problem"] is None
    assert all(r["stale"] is None for r in report["stages"])
    assert not [w for w in report["warnings"] if "stale" in w or "up to date" in w]
    assert "*" not in render(report_table(report)).split("settings")[0]


@pytest.mark.parametrize("damage", ["missing", "unknown key"])
def test_report_says_when_it_cannot_check_staleness(run_copy, damage):
    if damage == "missing":
        (run_copy / "recipe.yaml").unlink()
    else:
        _rewrite_recipe(run_copy, "temperature: 4.0", "temperature: 4.0\n  tempreature: 2.0")
    report = build_report(run_copy)  # the report is still made
    assert report["stale_checked"] is False
    assert all(r["stale"] is None for r in report["stages"])
    (warning,) = [w for w in report["warnings"] if "cannot tell" in w]
    assert "recipe.yaml" in warning
    assert ("is missing" if damage == "missing" else "tempreature") in warning


# --------------------------------------------------------------------------- warnings


@pytest.mark.parametrize(
    "drop, verdict", [(0.05, "beyond noise"), (0.005, "within noise")], ids=["beyond-noise", "within-noise"]
)
def test_warns_when_distillation_is_worse_than_the_baseline(run_copy, drop, verdict):
    student = load_checkpoint(run_copy / "student" / "model.pt")["metrics"]["test_accuracy"]
    edit_metrics(run_copy, "distilled", test_accuracy=student - drop)
    warnings = [w for w in build_report(run_copy)["warnings"] if "worse than the baseline" in w]
    assert len(warnings) == 1
    assert f"{drop * 100:.2f} points lower" in warnings[0]
    assert verdict in warnings[0]


def test_no_distillation_warning_when_it_helps(run_copy):
    student = load_checkpoint(run_copy / "student" / "model.pt")["metrics"]["test_accuracy"]
    edit_metrics(run_copy, "distilled", test_accuracy=student + 0.01)
    assert not [w for w in build_report(run_copy)["warnings"] if "worse" in w]


def _replace_teacher_with_cnn(run_dir: Path, test_accuracy: float, train_accuracy: float) -> None:
    """A BatchNorm teacher (the built-in cnn) with the given final test and last-epoch train accuracy."""
    path = run_dir / "teacher" / "model.pt"
    ckpt = load_checkpoint(path)
    spec = model_spec("cnn", {"channels": [4], "hidden": 16}, 10, [1, 28, 28])
    ckpt["arch"] = spec
    ckpt["state_dict"] = build_model(spec).state_dict()
    ckpt["recipe"]["teacher"].update(model="cnn", args={"channels": [4], "hidden": 16})
    ckpt["metrics"]["test_accuracy"] = test_accuracy
    save_checkpoint(path, ckpt)
    record = {"stage": "teacher", "epoch": 3, "train_accuracy": train_accuracy, "test_accuracy": test_accuracy}
    (run_dir / "teacher" / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    # the run's recipe names the cnn too: kdc builds no model the recipe does not name
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    recipe["teacher"].update(model="cnn", args={"channels": [4], "hidden": 16})
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))


def test_warns_when_a_batchnorm_model_sits_at_chance_and_suggests_recalibration(run_copy):
    _replace_teacher_with_cnn(run_copy, test_accuracy=0.100, train_accuracy=0.846)
    report = build_report(run_copy)
    teacher = report["stages"][0]
    assert teacher["has_batchnorm"] and teacher["train_accuracy"] == 0.846
    warnings = [w for w in report["warnings"] if "at chance" in w]
    assert len(warnings) == 1
    assert warnings[0].startswith("teacher:")
    assert "10.0%" in warnings[0] and "84.6%" in warnings[0]
    assert "run.bn_recalibrate" in warnings[0]


def test_no_chance_warning_for_a_model_that_learned(run_copy):
    _replace_teacher_with_cnn(run_copy, test_accuracy=0.80, train_accuracy=0.846)
    assert not [w for w in build_report(run_copy)["warnings"] if "at chance" in w]


def test_a_teacher_at_chance_in_training_too_gets_the_untrained_teacher_warning_not_the_batchnorm_one(run_copy):
    _replace_teacher_with_cnn(run_copy, test_accuracy=0.10, train_accuracy=0.12)
    (warning,) = [w for w in build_report(run_copy)["warnings"] if "at chance" in w]
    assert "nothing to teach" in warning and "bn_recalibrate" not in warning


def test_chance_warning_without_batchnorm_points_elsewhere():
    row = {
        "stage": "student",
        "accuracy": 0.1,
        "test_samples": 2000,
        "num_classes": 10,
        "chance_accuracy": 0.1,
        "train_accuracy": 0.9,
        "has_batchnorm": False,
        "settings": {},
    }
    (warning,) = report_warnings({"stages": [row], "comparisons": []})
    assert "at chance" in warning and "bn_recalibrate" not in warning


# --------------------------------------------------------------------------- latency


def test_report_latency_keys_in_the_recipe():
    from kdcompress.errors import RecipeError
    from kdcompress.recipe import parse_recipe

    report = parse_recipe("").report
    assert (report.latency_batches, report.threads, report.latency_batch) == ([1, 64], 2, None)
    assert parse_recipe("report: {latency_batch: 8}").report.latency_batch == 8  # the old key still loads
    for text, message in (
        ("report: {latency_batch: 8, latency_batches: [1, 64]}", "old name of report.latency_batches"),
        ("report: {latency_batches: []}", "needs at least one batch size"),
        ("report: {latency_batches: [1, 0]}", "report.latency_batches.1"),
        ("report: {threads: 0}", "report.threads"),
    ):
        with pytest.raises(RecipeError, match=message):
            parse_recipe(text)


def test_kdc_command_bounds_the_openmp_spin_for_training_unless_the_user_chose(monkeypatch):
    """Training spins 10,000 turns (scripts/bench_train_policy.py); a policy or spin count the user set is kept."""
    from kdcompress import cli

    seen = []
    monkeypatch.setattr(
        cli, "app", lambda **_: seen.append((os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT")))
    )
    for policy, spin in ((None, None), ("ACTIVE", None), (None, "500")):
        for name, value in (("OMP_WAIT_POLICY", policy), ("GOMP_SPINCOUNT", spin)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        cli.entry()
    assert seen == [(None, "10000"), ("ACTIVE", None), (None, "500")]


def test_latency_is_a_median_with_its_spread_and_a_fixed_thread_count():
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).train()
    threads_before = torch.get_num_threads()
    timing = latency(net, (32,), batch=64, threads=1, min_run_time=0.05)
    assert set(timing) >= {"median_ms", "iqr_ms", "p25_ms", "p75_ms", "batch", "threads"}
    assert 0 < timing["p25_ms"] <= timing["median_ms"] <= timing["p75_ms"]
    assert timing["iqr_ms"] == pytest.approx(timing["p75_ms"] - timing["p25_ms"])
    assert (timing["batch"], timing["threads"]) == (64, 1)
    assert torch.get_num_threads() == threads_before
    assert net.training  # the caller's mode is kept
    assert isinstance(latency_ms(net, (32,), min_run_time=0.02), float)


# --------------------------------------------------------------------------- BatchNorm recalibration


def _two_blobs(n: int, generator: torch.Generator) -> TensorData:
    y = torch.randint(0, 2, (n,), generator=generator)
    base = torch.where(y == 1, 170, 90).view(n, 1, 1, 1).float()
    x = (base + torch.randn(n, 1, 4, 4, generator=generator) * 25).clamp(0, 255).to(torch.uint8)
    return TensorData(x, y, (0.0,), (0.01,))  # inputs far from zero mean: BatchNorm statistics matter


def test_recalibrate_batchnorm_brings_back_test_accuracy():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    train, test = _two_blobs(2000, g), _two_blobs(1000, g)
    # momentum 0.001: the running statistics lag far behind the weights, as MobileNetV3's 0.01 does after few epochs
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8, momentum=0.001), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for epoch in range(3):
        for x, y, _ in train.batches(64, shuffle=True, generator=torch.Generator().manual_seed(epoch)):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    before = evaluate(model, test, 500, torch.device("cpu"))["accuracy"]
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "batches" not in k}
    model.eval()
    used = recalibrate_batchnorm(model, train, batches=10, batch_size=64)
    after = evaluate(model, test, 500, torch.device("cpu"))["accuracy"]
    assert before <= 0.6  # at chance with the stale statistics
    assert after >= 0.95
    assert used == 10
    assert model[2].momentum == 0.001 and not model.training  # momentum and mode restored
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())  # weights untouched


def test_recalibrate_batchnorm_leaves_a_model_without_batchnorm_alone():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _two_blobs(100, torch.Generator().manual_seed(1))
    assert recalibrate_batchnorm(model, data, batches=5, batch_size=32) == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_bn_recalibrate_key_is_off_by_default_and_is_an_input_of_every_stage(tiny_recipe_text):
    from kdcompress.recipe import parse_recipe
    from kdcompress.run import stage_fingerprint

    recipe = parse_recipe(tiny_recipe_text)
    assert recipe.run.bn_recalibrate == 0
    on = parse_recipe(tiny_recipe_text, overrides=["run.bn_recalibrate=50"])
    for stage in ("teacher", "student"):  # it changes the saved model, so turning it on remakes the stage
        assert stage_fingerprint(on, stage, {}) != stage_fingerprint(recipe, stage, {})
    with pytest.raises(Exception, match="bn_recalibrate"):
        parse_recipe(tiny_recipe_text, overrides=["run.bn_recalibrate=-1"])


def test_stage_recalibrates_batchnorm_when_asked(fresh_run, tiny_recipe_dict, kdc):
    import yaml

    tiny_recipe_dict["teacher"].update(model="cnn", args={"channels": [4], "hidden": 16}, epochs=1)
    tiny_recipe_dict["run"]["bn_recalibrate"] = 3
    work, result = fresh_run(yaml.safe_dump(tiny_recipe_dict), "bnrecal", "train-teacher")
    assert "recomputed the BatchNorm running statistics from 3 training batches" in kdc.flat(result)
    metrics = load_checkpoint(work / RUN / "teacher" / "model.pt")["metrics"]
    assert metrics["bn_recalibrate_batches"] == 3
    assert metrics["test_samples"] == 2000
