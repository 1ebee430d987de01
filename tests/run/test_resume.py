"""Interrupted stages resume from their last completed epoch and end exactly where an uninterrupted run ends.

* A real ``kdc run`` subprocess is SIGKILLed in the middle of the teacher
  stage, rerun, and compared tensor for tensor with an uninterrupted run.
* A process killed while it writes a resume state keeps the previous state.
* Ctrl-C (KeyboardInterrupt in the training loop, in-process) in every stage:
  exit 130 with a one-line hint, then a rerun resumes to the same weights.
* ``--restart``, a resume state from another recipe, a corrupt resume state.
* A NaN/inf loss stops the stage with the epoch and step, keeping the last good state.
"""

from __future__ import annotations

import json
import re
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

from kdcompress.checkpoint import verify_checkpoint

STAGES = ["teacher", "student", "distilled", "pruned"]
RUN = Path("runs") / "tiny"
RESUMING = re.compile(r"(\w+): resuming after epoch (\d+)/(\d+)")


def epochs_in(metrics: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]


def temp_files(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob(".*.tmp"))


def resume_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def reference(fresh_run, tiny_recipe_text):
    """An uninterrupted in-process `kdc run` of the tiny recipe: the result every resumed run must match."""
    return fresh_run(tiny_recipe_text, "reference", "run")[0]


# --------------------------------------------------------------------------- A. SIGKILL, real subprocess

KILL_RECIPE = {
    "run": {"name": "killme", "seed": 0, "device": "cpu"},
    "data": {"dataset": "fashion-mnist-mini", "batch_size": 128},
    "teacher": {"model": "cnn", "args": {"channels": [8, 16], "hidden": 32}, "epochs": 4},
    "student": {"model": "mlp", "args": {"hidden": [32]}, "baseline": True},
    "distill": {"epochs": 2},
    "prune": {"rate": 0.5, "target_sparsity": 0.75, "every": 0.5, "epochs": 2},
    "report": {"latency": False},
}


def _kdc_cmd(recipe: Path) -> list[str]:
    return [sys.executable, "-m", "kdcompress", "run", str(recipe)]


@pytest.mark.slow
def test_sigkill_mid_stage_then_rerun_resumes_to_the_identical_result(tmp_path):
    env = subprocess_env()
    text = yaml.safe_dump(KILL_RECIPE, sort_keys=False)
    killed_dir, ref_dir = tmp_path / "killed", tmp_path / "uninterrupted"
    for folder in (killed_dir, ref_dir):
        folder.mkdir()
        (folder / "recipe.yaml").write_text(text, encoding="utf-8")
    run_dir = killed_dir / "runs" / "killme"
    teacher_metrics = run_dir / "teacher" / "metrics.jsonl"
    teacher_log = run_dir / "teacher" / "metrics.partial.jsonl"  # the unfinished stage's epochs

    # The uninterrupted run goes alongside (two cores, one thread each).
    with open(ref_dir / "log.txt", "wb") as ref_log, open(killed_dir / "killed-log.txt", "wb") as log:
        ref = subprocess.Popen(
            _kdc_cmd(Path("recipe.yaml")), cwd=ref_dir, env=env, stdout=ref_log, stderr=subprocess.STDOUT
        )
        try:
            victim = subprocess.Popen(
                _kdc_cmd(Path("recipe.yaml")), cwd=killed_dir, env=env, stdout=log, stderr=subprocess.STDOUT
            )
            try:
                deadline = time.monotonic() + 240
                lines: list[str] = []
                while victim.poll() is None and time.monotonic() < deadline:
                    if teacher_log.is_file():
                        lines = [x for x in teacher_log.read_text().split("\n")[:-1] if x.strip()]
                        if len(lines) >= 2:
                            break
                    time.sleep(0.02)
                assert len(lines) >= 2, (
                    f"the teacher never finished 2 epochs:\n{(killed_dir / 'killed-log.txt').read_text()}"
                )
                epoch_seconds = json.loads(lines[-1])["seconds"]
                time.sleep(min(0.3 * epoch_seconds, 1.0))  # into the next epoch, well before its end
                assert victim.poll() is None, "kdc finished before it could be killed"
                victim.send_signal(signal.SIGKILL)
                assert victim.wait(timeout=30) == -signal.SIGKILL
            finally:
                if victim.poll() is None:
                    victim.kill()
                    victim.wait()
            assert ref.wait(timeout=300) == 0, (ref_dir / "log.txt").read_text()
        finally:
            if ref.poll() is None:
                ref.kill()
                ref.wait()

    # killed in the middle of the teacher stage: no teacher checkpoint yet, a resume state from >= 2 epochs
    assert not (run_dir / "teacher" / "model.pt").exists()
    assert resume_state(run_dir / "teacher" / "state.pt")["epoch"] >= 2

    rerun = subprocess.run(
        _kdc_cmd(Path("recipe.yaml")), cwd=killed_dir, env=env, capture_output=True, text=True, timeout=300
    )
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output
    assert "Traceback" not in output
    resumed = RESUMING.findall(output)
    assert resumed, output
    stage, done, total = resumed[0]
    assert stage == "teacher" and int(done) >= 2 and int(total) == 4, resumed

    # one metrics line per epoch, none duplicated from the killed epoch
    assert epochs_in(teacher_metrics) == [1, 2, 3, 4]
    ref_run = ref_dir / "runs" / "killme"
    for stage_name in STAGES:
        ours = [json.loads(x) for x in (run_dir / stage_name / "metrics.jsonl").read_text().splitlines()]
        theirs = [json.loads(x) for x in (ref_run / stage_name / "metrics.jsonl").read_text().splitlines()]
        strip = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]  # noqa: E731
        assert strip(ours) == strip(theirs), stage_name

    # the same weights, bit for bit, in every stage; the same accuracies in the report
    from kdcompress.checkpoint import load_checkpoint

    for stage_name in STAGES:
        a = load_checkpoint(run_dir / stage_name / "model.pt")
        b = load_checkpoint(ref_run / stage_name / "model.pt")
        assert set(a["state_dict"]) == set(b["state_dict"])
        for key in a["state_dict"]:
            assert torch.equal(a["state_dict"][key], b["state_dict"][key]), f"{stage_name}: {key}"
        assert a["metrics"]["test_accuracy"] == b["metrics"]["test_accuracy"], stage_name
    ours = json.loads((run_dir / "report.json").read_text())
    theirs = json.loads((ref_run / "report.json").read_text())
    assert [r["accuracy"] for r in ours["stages"]] == [r["accuracy"] for r in theirs["stages"]]
    assert [r["stage"] for r in ours["stages"]] == STAGES

    assert temp_files(killed_dir / "runs") == []
    assert not list(run_dir.rglob("state.pt"))  # finished stages drop their resume state


# --------------------------------------------------------------------------- SIGKILL while a resume state is written

# Runs `kdc train-teacher` in a child that SIGKILLs itself just before the 2nd
# resume state (end of epoch 2) is renamed into place: the temporary file is
# complete on disk, nothing after it runs (no finally, no cleanup).
KILL_IN_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    real_replace = os.replace
    seen = {"n": 0}
    def replace(src, dst, *args, **kwargs):
        if os.path.basename(str(dst)) == "state.pt":
            seen["n"] += 1
            if seen["n"] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *args, **kwargs)
    os.replace = replace
    from kdcompress.cli import app
    app(["train-teacher", "recipe.yaml"], prog_name="kdc")
    """
)


@pytest.fixture(scope="module")
def killed_in_save(tmp_path_factory, kdc, tiny_recipe_text):
    """(run dir, state after the kill, temp files after the kill, in-process rerun result)."""
    work = tmp_path_factory.mktemp("killed-in-save")
    (work / "recipe.yaml").write_text(tiny_recipe_text, encoding="utf-8")
    child = subprocess.run(
        [sys.executable, "-c", KILL_IN_SAVE],
        cwd=work,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    state = resume_state(work / RUN / "teacher" / "state.pt")
    leftovers = temp_files(work / "runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        rerun = kdc("train-teacher", "recipe.yaml")
    return work, state, leftovers, rerun


@pytest.mark.slow
def test_sigkill_while_saving_a_resume_state_keeps_the_previous_one(killed_in_save, reference, kdc, checkpoints_equal):
    work, state, leftovers, rerun = killed_in_save
    assert state["epoch"] == 1  # the epoch-2 state never replaced the epoch-1 one
    assert [p.name.startswith(".state.pt.") for p in leftovers] == [True]  # the kill really hit mid-write
    kdc.assert_clean_exit(rerun, 0)
    assert "teacher: resuming after epoch 1/2" in kdc.flat(rerun)
    assert epochs_in(work / RUN / "teacher" / "metrics.jsonl") == [1, 2]
    checkpoints_equal(work / RUN / "teacher" / "model.pt", reference / RUN / "teacher" / "model.pt")


@pytest.mark.slow
def test_sigkill_while_saving_leaves_no_temp_file_once_the_stage_finishes(killed_in_save):
    work, _, _, rerun = killed_in_save
    assert rerun.exit_code == 0
    assert temp_files(work / "runs") == []


# --------------------------------------------------------------------------- C. Ctrl-C in every stage


@pytest.mark.parametrize("stage", STAGES)
def test_ctrl_c_in_a_stage_then_rerun_resumes_to_the_same_weights(
    stage, in_tmp, write_recipe, kdc, fail_training, reference, checkpoints_equal
):
    write_recipe()
    fired = fail_training(stage, epoch=2, batch=5)
    first = kdc("run", "recipe.yaml")
    assert fired["fired"]
    kdc.assert_clean_exit(first, 130)
    assert resume_state(in_tmp / RUN / stage / "state.pt")["epoch"] == 1
    assert not (in_tmp / RUN / stage / "model.pt").exists()
    assert epochs_in(in_tmp / RUN / stage / "metrics.partial.jsonl") == [1]
    assert not (in_tmp / RUN / stage / "metrics.jsonl").exists()  # written only with a finished checkpoint

    second = kdc("run", "recipe.yaml")  # the fault fired once; this run goes through
    kdc.assert_clean_exit(second, 0)
    out = kdc.flat(second)
    assert f"{stage}: resuming after epoch 1/2" in out
    for earlier in STAGES[: STAGES.index(stage)]:
        assert f"{earlier}: up to date, skipped" in out
    assert epochs_in(in_tmp / RUN / stage / "metrics.jsonl") == [1, 2]
    for name in STAGES:
        checkpoints_equal(in_tmp / RUN / name / "model.pt", reference / RUN / name / "model.pt")
    assert temp_files(in_tmp / "runs") == []
    assert not (in_tmp / RUN / stage / "state.pt").exists()


def test_ctrl_c_exits_130_with_a_one_line_hint_and_no_traceback(in_tmp, write_recipe, kdc, fail_training):
    write_recipe()
    fail_training("teacher", epoch=2, batch=3)
    result = kdc("train-teacher", "recipe.yaml")
    kdc.assert_clean_exit(result, 130)
    hint = [line for line in result.output.splitlines() if "interrupted" in line]
    assert len(hint) == 1, result.output
    assert "resume" in hint[0] and "rerun the same command" in hint[0]
    assert "--restart" in hint[0]
    # the state of the last completed epoch is on disk, nothing half-written
    state = resume_state(in_tmp / RUN / "teacher" / "state.pt")
    assert state["epoch"] == 1 and len(state["history"]) == 1
    assert temp_files(in_tmp / "runs") == []


def test_ctrl_c_in_the_first_epoch_leaves_no_state_and_rerun_starts_clean(
    in_tmp, write_recipe, kdc, fail_training, reference, checkpoints_equal
):
    write_recipe()
    fail_training("teacher", epoch=1, batch=2)
    kdc.assert_clean_exit(kdc("train-teacher", "recipe.yaml"), 130)
    assert not (in_tmp / RUN / "teacher" / "state.pt").exists()
    result = kdc("train-teacher", "recipe.yaml")
    kdc.assert_clean_exit(result, 0)
    assert "resuming" not in result.output
    checkpoints_equal(in_tmp / RUN / "teacher" / "model.pt", reference / RUN / "teacher" / "model.pt")


def test_ctrl_c_while_the_resume_state_is_written_keeps_the_previous_state(
    in_tmp, write_recipe, kdc, monkeypatch, reference, checkpoints_equal
):
    write_recipe()
    real_save = torch.save
    calls = {"state": 0}

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "optimizer" in obj:  # a resume state
            calls["state"] += 1
            if calls["state"] == 2:
                f.write(b"half a state")
                raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    kdc.assert_clean_exit(kdc("train-teacher", "recipe.yaml"), 130)
    monkeypatch.setattr(torch, "save", real_save)
    assert resume_state(in_tmp / RUN / "teacher" / "state.pt")["epoch"] == 1
    assert temp_files(in_tmp / "runs") == []
    result = kdc("train-teacher", "recipe.yaml")
    kdc.assert_clean_exit(result, 0)
    assert "teacher: resuming after epoch 1/2" in kdc.flat(result)
    checkpoints_equal(in_tmp / RUN / "teacher" / "model.pt", reference / RUN / "teacher" / "model.pt")


def test_ctrl_c_between_checkpoint_and_manifest_then_rerun_finishes(in_tmp, write_recipe, kdc, monkeypatch):
    import kdcompress.files as files_mod

    write_recipe()
    real = files_mod.os.replace

    def replace(src, dst):  # Ctrl-C after model.pt is renamed into place, before its manifest is
        if Path(dst).name == "model.pt.manifest.json":
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(files_mod.os, "replace", replace)
    kdc.assert_clean_exit(kdc("train-teacher", "recipe.yaml"), 130)
    monkeypatch.setattr(files_mod.os, "replace", real)
    assert (in_tmp / RUN / "teacher" / "state.pt").is_file()  # the work is still held by the resume state
    result = kdc("train-teacher", "recipe.yaml")  # what the Ctrl-C hint says to do
    kdc.assert_clean_exit(result, 0)
    verify_checkpoint(in_tmp / RUN / "teacher" / "model.pt")


# --------------------------------------------------------------------------- B. resume state details


@pytest.fixture
def interrupted_teacher(in_tmp, write_recipe, kdc, fail_training):
    """A teacher stage stopped by Ctrl-C in epoch 2: state.pt holds epoch 1."""
    write_recipe()
    fail_training("teacher", epoch=2, batch=4)
    kdc.assert_clean_exit(kdc("train-teacher", "recipe.yaml"), 130)
    state = in_tmp / RUN / "teacher" / "state.pt"
    assert resume_state(state)["epoch"] == 1
    return in_tmp


def test_restart_drops_the_resume_state_and_starts_over(interrupted_teacher, kdc, reference, checkpoints_equal):
    result = kdc("train-teacher", "recipe.yaml", "--restart")
    kdc.assert_clean_exit(result, 0)
    out = kdc.flat(result)
    assert "teacher: dropped the resume state, starting over" in out
    assert "resuming" not in out
    assert "teacher epoch 1/2" in out and "teacher epoch 2/2" in out
    assert epochs_in(interrupted_teacher / RUN / "teacher" / "metrics.jsonl") == [1, 2]
    checkpoints_equal(interrupted_teacher / RUN / "teacher" / "model.pt", reference / RUN / "teacher" / "model.pt")


def test_resume_state_from_a_different_recipe_is_not_used(interrupted_teacher, kdc):
    result = kdc("train-teacher", "recipe.yaml", "--set", "teacher.lr=0.02")
    kdc.assert_clean_exit(result, 0)
    out = kdc.flat(result)
    assert "the recipe changed since" in out and "starting the stage over" in out
    assert "resuming" not in out
    assert "teacher epoch 1/2" in out
    assert epochs_in(interrupted_teacher / RUN / "teacher" / "metrics.jsonl") == [1, 2]
    from kdcompress.checkpoint import load_checkpoint

    assert load_checkpoint(interrupted_teacher / RUN / "teacher" / "model.pt")["recipe"]["teacher"]["lr"] == 0.02


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "not-a-dict"])
def test_corrupt_resume_state_is_a_clear_error_naming_restart(interrupted_teacher, kdc, damage):
    state = interrupted_teacher / RUN / "teacher" / "state.pt"
    data = state.read_bytes()
    if damage == "garbage":
        state.write_bytes(b"this is not a resume state" * 10)
    elif damage == "truncated":
        state.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        state.write_bytes(b"")
    else:
        torch.save([1, 2, 3], state)
    before = state.read_bytes()
    result = kdc("train-teacher", "recipe.yaml")
    out = kdc.flat(result)
    kdc.assert_clean_exit(result, 2)
    assert "--restart" in out and "state.pt" in out
    assert ("not a kdc resume state" if damage == "not-a-dict" else "damaged") in out
    assert state.read_bytes() == before  # not overwritten
    assert not (interrupted_teacher / RUN / "teacher" / "model.pt").exists()
    fixed = kdc("train-teacher", "recipe.yaml", "--restart")
    kdc.assert_clean_exit(fixed, 0)
    assert "dropped the resume state" in kdc.flat(fixed)


def test_force_also_drops_an_unfinished_stage_state(interrupted_teacher, kdc):
    result = kdc("train-teacher", "recipe.yaml", "--force")
    kdc.assert_clean_exit(result, 0)
    assert "dropped the resume state" in kdc.flat(result)
    assert "resuming" not in result.output


# --------------------------------------------------------------------------- D. NaN / inf loss


def test_absurd_learning_rate_stops_with_epoch_and_step(in_tmp, write_recipe, kdc):
    write_recipe(changes={"teacher": {"lr": 1.0e6, "optimizer": "sgd"}})
    result = kdc("train-teacher", "recipe.yaml")
    kdc.assert_clean_exit(result, 1)
    out = kdc.flat(result)
    found = re.search(r"teacher: the loss became (nan|inf|-inf) at epoch (\d+), step (\d+) of (\d+)", out)
    assert found, out
    assert found.group(2) == "1" and int(found.group(3)) >= 1 and found.group(4) == "79"
    assert "lower the learning rate" in out
    assert not (in_tmp / RUN / "teacher" / "model.pt").exists()
    assert not (in_tmp / RUN / "teacher" / "state.pt").exists()  # no epoch completed, nothing to keep
    assert temp_files(in_tmp / "runs") == []


def test_nan_loss_in_epoch_2_keeps_the_epoch_1_state(
    in_tmp, write_recipe, kdc, fail_training, reference, checkpoints_equal
):
    write_recipe()
    fail_training("teacher", epoch=2, batch=7, action="nan")
    result = kdc("train-teacher", "recipe.yaml")
    kdc.assert_clean_exit(result, 1)
    out = kdc.flat(result)
    assert "teacher: the loss became nan at epoch 2, step 7 of 79" in out
    assert "the last good state (epoch 1) is kept in" in out and "state.pt" in out
    state = in_tmp / RUN / "teacher" / "state.pt"
    assert resume_state(state)["epoch"] == 1
    assert epochs_in(in_tmp / RUN / "teacher" / "metrics.partial.jsonl") == [1]
    assert not (in_tmp / RUN / "teacher" / "model.pt").exists()
    # the kept state is good: with the fault gone, the same command resumes and ends where a clean run ends
    again = kdc("train-teacher", "recipe.yaml")
    kdc.assert_clean_exit(again, 0)
    assert "teacher: resuming after epoch 1/2" in kdc.flat(again)
    checkpoints_equal(in_tmp / RUN / "teacher" / "model.pt", reference / RUN / "teacher" / "model.pt")


@pytest.mark.parametrize("stage", ["distilled", "pruned"])
def test_nan_loss_in_a_later_stage_names_that_stage(stage, tmp_path, reference, kdc, fail_training, monkeypatch):
    import shutil

    work = tmp_path / "copy"
    shutil.copytree(reference, work)
    monkeypatch.chdir(work)
    fail_training(stage, epoch=1, batch=2, action="nan")
    command = {"distilled": "distill", "pruned": "prune"}[stage]
    before = (work / RUN / stage / "model.pt").read_bytes()
    result = kdc(command, "recipe.yaml", "--force")
    kdc.assert_clean_exit(result, 1)
    assert f"{stage}: the loss became nan at epoch 1, step 2 of 79" in kdc.flat(result)
    assert (work / RUN / stage / "model.pt").read_bytes() == before  # the old checkpoint is untouched
    verify_checkpoint(work / RUN / stage / "model.pt")
