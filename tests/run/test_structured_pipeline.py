"""Structured pruning through the pipeline (issue 9): `prune.method: structured` end to end.

* The product's commands on a CNN student: the pruned stage removes half the
  prunable channels for real (fewer parameters, MACs and bytes), the report
  says so, and the checkpoint reloads in a fresh process to identical outputs.
* torchvision:resnet18 as the student, through the same stage, on a small
  dataset of the user's own (an import path), so it stays fast.
* SIGKILL in the middle of a structured pruning stage, then a rerun: it
  resumes mid-schedule and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import subprocess_env

from kdcompress.checkpoint import load_checkpoint

CNN_RECIPE = {
    "run": {"name": "cnn", "seed": 0, "device": "cpu"},
    "data": {"dataset": "fashion-mnist-mini", "batch_size": 128},
    "teacher": {"model": "cnn", "args": {"channels": [16, 32], "hidden": 64}, "epochs": 1},
    "student": {"model": "cnn", "args": {"channels": [16, 32], "hidden": 64}, "baseline": False},
    "distill": {"epochs": 1},
    "prune": {
        "method": "structured",
        "scope": "layer",
        "target_sparsity": 0.5,
        "sparsity_schedule": "agp",
        "steps": 4,
        "epochs": 3,
    },
    "report": {"latency": False},
}
RUN = Path("runs") / "cnn"


def _outputs_in_fresh_process(path: Path, cwd: Path) -> torch.Tensor:
    """Logits of the checkpoint at ``path`` on fixed inputs, computed by a new Python process."""
    out = cwd / "fresh-logits.pt"
    code = textwrap.dedent(f"""
        import torch, kdcompress
        model, preprocess = kdcompress.load_model({str(path)!r})
        x = torch.arange(4 * 28 * 28, dtype=torch.int64).remainder(256).to(torch.uint8).view(4, 28, 28)
        with torch.no_grad():
            torch.save(model(preprocess(x)), {str(out)!r})
    """)
    subprocess.run([sys.executable, "-c", code], cwd=cwd, env=subprocess_env(), check=True, timeout=120)
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def cnn_run(fresh_run, kdc):
    work = fresh_run(yaml.safe_dump(CNN_RECIPE), "structured-cnn", "train-teacher", "distill", "prune")[0]
    kdc.assert_clean_exit(kdc("report", str(work / RUN)), 0)
    return work


def test_structured_pruning_removes_half_the_channels_for_real(cnn_run):
    distilled = load_checkpoint(cnn_run / RUN / "distilled" / "model.pt")
    pruned = load_checkpoint(cnn_run / RUN / "pruned" / "model.pt")
    assert pruned["metrics"]["channel_sparsity"] == pytest.approx(0.5, abs=0.02)
    assert pruned["structure"]  # the pruning history, plain data
    shapes = {k: tuple(v.shape) for k, v in pruned["state_dict"].items()}
    dense = {k: tuple(v.shape) for k, v in distilled["state_dict"].items()}
    assert shapes["features.0.weight"][0] < dense["features.0.weight"][0]
    assert shapes["classifier.3.weight"][0] == 10  # the classifier's outputs are never pruned
    assert pruned["metrics"]["params"] < distilled["metrics"]["params"] / 2.5
    report = json.loads((cnn_run / RUN / "report.json").read_text())
    rows = {r["stage"]: r for r in report["stages"]}
    assert rows["pruned"]["macs"] * 2.5 <= rows["distilled"]["macs"]
    assert rows["pruned"]["checkpoint_bytes"] * 2 < rows["distilled"]["checkpoint_bytes"]
    assert rows["pruned"]["channel_sparsity"] == pytest.approx(0.5, abs=0.02)
    assert "structured" in rows["pruned"]["settings"]["method"]
    assert "50.0% ch" in (cnn_run / RUN / "report.md").read_text()


def test_a_structured_checkpoint_reloads_in_a_fresh_process_to_identical_outputs(cnn_run):
    import kdcompress

    path = cnn_run / RUN / "pruned" / "model.pt"
    torch.load(path, weights_only=True)  # plain data only: no pickled modules
    model, preprocess = kdcompress.load_model(path)
    x = torch.arange(4 * 28 * 28, dtype=torch.int64).remainder(256).to(torch.uint8).view(4, 28, 28)
    with torch.no_grad():
        here = model(preprocess(x))
    assert torch.equal(_outputs_in_fresh_process(path, cnn_run), here)


USER_DATA = '''
"""A small dataset of the user's own: 512 training and 256 test images of fashion-mnist-mini."""
import torch
from kdcompress.data import load_data
from kdcompress.recipe import DataSection


def build():
    splits = load_data(DataSection(dataset="fashion-mnist-mini"))
    def part(split, n):
        x = split.normalise(split.images[:n])
        return torch.utils.data.TensorDataset(x, split.labels[:n])
    return {"train": part(splits.train, 512), "test": part(splits.test, 256), "num_classes": 10}
'''


@pytest.mark.slow
def test_resnet18_student_pruned_structurally_through_the_pipeline(tmp_path, monkeypatch, kdc):
    (tmp_path / "smalldata.py").write_text(USER_DATA)
    recipe = {
        "run": {"name": "rn", "device": "cpu"},
        "data": {"dataset": "smalldata:build", "batch_size": 64, "workers": 0},
        "teacher": {"model": "mlp", "epochs": 1},
        "student": {"model": "torchvision:resnet18", "baseline": False},
        "distill": {"epochs": 1},
        "prune": {"method": "structured", "target_sparsity": 0.5, "sparsity_schedule": "one-shot", "epochs": 1},
        "report": {"latency": False},
    }
    (tmp_path / "rn.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)
    result = kdc("run", "rn.yaml")
    kdc.assert_clean_exit(result, 0)
    rows = {r["stage"]: r for r in json.loads((tmp_path / "runs" / "rn" / "report.json").read_text())["stages"]}
    assert rows["pruned"]["macs"] * 2 <= rows["distilled"]["macs"]
    assert rows["pruned"]["channel_sparsity"] == pytest.approx(0.5, abs=0.05)
    path = tmp_path / "runs" / "rn" / "pruned" / "model.pt"
    code = textwrap.dedent(f"""
        import torch
        from kdcompress.checkpoint import load_checkpoint
        from kdcompress.models import build_from_checkpoint
        model = build_from_checkpoint(load_checkpoint({str(path)!r})).eval()
        torch.manual_seed(0)
        with torch.no_grad():
            torch.save(model(torch.randn(2, 1, 28, 28)), "rn-logits.pt")
    """)
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=subprocess_env(), check=True, timeout=120)
    from kdcompress.models import build_from_checkpoint

    model = build_from_checkpoint(load_checkpoint(path)).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        assert torch.equal(model(torch.randn(2, 1, 28, 28)), torch.load(tmp_path / "rn-logits.pt", weights_only=True))


KILL_RECIPE = {
    **CNN_RECIPE,
    "run": {"name": "cnn", "seed": 0, "device": "cpu"},
    "prune": {"method": "structured", "target_sparsity": 0.5, "sparsity_schedule": "agp", "steps": 6, "epochs": 4},
}


@pytest.mark.slow
def test_sigkill_mid_structured_pruning_then_rerun_ends_with_the_same_weights(fresh_run, tmp_path):
    prepared = fresh_run(yaml.safe_dump(KILL_RECIPE), "kill-structured", "train-teacher", "distill")[0]
    import shutil

    killed, reference = tmp_path / "killed", tmp_path / "reference"
    shutil.copytree(prepared, killed)
    shutil.copytree(prepared, reference)
    cmd = [sys.executable, "-m", "kdcompress", "prune", "recipe.yaml"]
    metrics = killed / RUN / "pruned" / "metrics.partial.jsonl"  # the unfinished stage's running log
    with open(tmp_path / "ref.log", "wb") as ref_log, open(tmp_path / "killed.log", "wb") as log:
        ref = subprocess.Popen(cmd, cwd=reference, env=subprocess_env(), stdout=ref_log, stderr=subprocess.STDOUT)
        victim = subprocess.Popen(cmd, cwd=killed, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            lines: list[str] = []
            while victim.poll() is None and time.monotonic() < deadline:
                if metrics.is_file():
                    lines = [x for x in metrics.read_text().split("\n") if x.strip()]
                    if len(lines) >= 1:
                        break
                time.sleep(0.02)
            assert len(lines) >= 1, (tmp_path / "killed.log").read_text()
            time.sleep(min(0.3 * json.loads(lines[-1])["seconds"], 1.0))  # into epoch 2: still pruning
            assert victim.poll() is None, "kdc finished before it could be killed"
            victim.send_signal(signal.SIGKILL)
            assert victim.wait(timeout=30) == -signal.SIGKILL
            assert ref.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()
        finally:
            for proc in (victim, ref):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    state = torch.load(killed / RUN / "pruned" / "state.pt", weights_only=True)
    assert state["epoch"] == 1 and state["hooks"][0]["pruner"]["history"]  # killed mid-schedule, shapes changed
    rerun = subprocess.run(cmd, cwd=killed, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "pruned: resuming after epoch 1/4" in rerun.stdout + rerun.stderr
    a = load_checkpoint(killed / RUN / "pruned" / "model.pt")
    b = load_checkpoint(reference / RUN / "pruned" / "model.pt")
    assert a["structure"] == b["structure"]
    assert set(a["state_dict"]) == set(b["state_dict"])
    for key, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][key]), key
    assert a["metrics"]["test_accuracy"] == b["metrics"]["test_accuracy"]


def test_bench_pruned_script_times_the_two_stages_in_turns(cnn_run):
    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_pruned.py"
    done = subprocess.run(
        [sys.executable, str(script), str(cnn_run / RUN), "--rounds", "2", "--seconds", "0.05", "--threads", "1"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["rounds"] == 2 and summary["batch"] == 64 and summary["threads"] == 1
    assert summary["distilled_ms_median"] > 0 and summary["pruned_ms_median"] > 0
    assert summary["ratio_min"] <= summary["ratio_median"] <= summary["ratio_max"]
    assert "No CUDA runtime" not in done.stderr
