"""One writer per run directory (issue 17, row 3).

A second kdc that would write into a run directory another kdc is writing exits 2 at once, naming the
first (pid, command, start time); the lock dies with its process, so a SIGKILL leaves none behind.
Real `kdc run` subprocesses show it end to end; the cheaper tests play the other process by holding
the lock file themselves (flock locks belong to an open file, so this process conflicts with itself).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import subprocess_env, working_copy

RUN = Path("runs") / "tiny"
LOCK_FILE = ".kdc.lock"  # kdcompress.run.layout.LOCK_FILE, spelt out: the CLI tests hold on code without it too
LIVE_RECIPE = {
    "run": {"name": "live", "seed": 0, "device": "cpu"},
    "data": {"dataset": "fashion-mnist-mini", "batch_size": 128},
    "teacher": {"model": "mlp", "args": {"hidden": [64]}, "epochs": 8},
    "student": {"model": "mlp", "args": {"hidden": [32]}, "baseline": False},
    "distill": {"epochs": 2},
    "prune": {"rate": 0.5, "target_sparsity": 0.75, "every": 0.5, "epochs": 2},
    "report": {"latency": False},
}


def _kdc(*args: str) -> list[str]:
    return [sys.executable, "-m", "kdcompress", *args]


def _wait_until_held_by(proc: subprocess.Popen, run_dir: Path, log: Path, training: bool = False) -> dict:
    """What the lock file says once ``proc`` holds it (it writes its pid there after taking the lock);
    with ``training``, not before the teacher has a resume state (a live state.pt, as in the issue)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"kdc ended before it was seen holding the lock:\n{log.read_text()}"
        try:
            info = json.loads((run_dir / LOCK_FILE).read_text())
            if info.get("pid") == proc.pid and (not training or (run_dir / "teacher" / "state.pt").is_file()):
                return info
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    raise AssertionError(f"kdc never took the lock:\n{log.read_text()}")


@contextlib.contextmanager
def held_by_another(run_dir: Path, pid: int = 4242, command: str = "kdc run recipe.yaml", started: float | None = None):
    """Hold ``run_dir``'s lock as another kdc would, saying it is ``pid`` running ``command``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        info = {
            "pid": pid,
            "host": os.uname().nodename,
            "command": command,
            "started": time.time() if started is None else started,
        }
        os.write(fd, json.dumps(info).encode())
        yield info
    finally:
        os.close(fd)  # closing drops the flock


@pytest.fixture(scope="module")
def tiny_done(fresh_run, tiny_recipe_text):
    """`kdc run` of the tiny recipe, once per module."""
    return fresh_run(tiny_recipe_text, "lock-tiny-done", "run")[0]


@pytest.fixture
def tiny_run(tiny_done, tmp_path, monkeypatch):
    """A private copy of tiny_done, made the working directory."""
    return working_copy(tiny_done, tmp_path, monkeypatch)


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` but the lock file (which the other process, played here, writes)."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_FILE
    }


# --------------------------------------------------------------------------- real processes


@pytest.mark.slow
def test_a_second_kdc_run_on_a_live_run_directory_exits_2_at_once_and_the_first_keeps_its_own_run(
    tmp_path, kdc, monkeypatch
):
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(LIVE_RECIPE, sort_keys=False), encoding="utf-8")
    run_dir = tmp_path / "runs" / "live"
    log = tmp_path / "first.log"
    with open(log, "wb") as out:
        first = subprocess.Popen(
            _kdc("run", "recipe.yaml", "--set", "distill.temperature=3"),
            cwd=tmp_path,
            env=subprocess_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_held_by(first, run_dir, log, training=True)
        # paused while it holds the lock: whatever the others do now, they cannot wait for it to finish
        os.kill(first.pid, signal.SIGSTOP)
        try:
            second = subprocess.run(
                _kdc("run", "recipe.yaml", "--set", "distill.temperature=2"),
                cwd=tmp_path,
                env=subprocess_env(),
                capture_output=True,
                text=True,
                timeout=300,
            )
            monkeypatch.chdir(tmp_path)
            export = kdc("export", "runs/live", "--format", "sparse")
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=600) == 0, log.read_text()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()

    said = " ".join((second.stdout + second.stderr).split())
    assert second.returncode == 2, said
    assert f"another kdc (pid {first.pid}, `kdc run recipe.yaml --set distill.temperature=3`, started " in said, said
    assert "is writing runs/live; wait for it or use another run.name" in said
    assert "training" not in said and "Traceback" not in said

    kdc.assert_clean_exit(export, 2)
    assert f"another kdc (pid {first.pid}," in kdc.flat(export) and "interrupted" not in export.output
    assert not (run_dir / "export").exists()

    # the first run alone wrote its run directory: one metrics line per epoch, its own T in its report
    for stage, epochs in (("teacher", 8), ("distilled", 2), ("pruned", 2)):
        lines = (run_dir / stage / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == list(range(1, epochs + 1)), stage
    report = json.loads((run_dir / "report.json").read_text())
    assert {s["stage"]: s["settings"].get("temperature") for s in report["stages"]} == {
        "teacher": None,
        "distilled": 3.0,
        "pruned": 3.0,
    }
    assert "T=3.0" in log.read_text() and "T=2.0" not in log.read_text()


@pytest.mark.slow
def test_a_sigkilled_kdc_leaves_no_stale_lock_and_the_next_run_proceeds(tmp_path, kdc, monkeypatch):
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(LIVE_RECIPE, sort_keys=False), encoding="utf-8")
    run_dir = tmp_path / "runs" / "live"
    log = tmp_path / "killed.log"
    with open(log, "wb") as out:
        victim = subprocess.Popen(
            _kdc("run", "recipe.yaml"), cwd=tmp_path, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        _wait_until_held_by(victim, run_dir, log)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=60) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == victim.pid  # what it said is left ...
    monkeypatch.chdir(tmp_path)
    again = kdc("run", "recipe.yaml")  # ... but the lock died with it
    kdc.assert_clean_exit(again, 0)
    assert "another kdc" not in again.output
    assert (run_dir / "pruned" / "model.pt").is_file()
    assert (run_dir / LOCK_FILE).read_text() == ""  # emptied on release: no holder now


# --------------------------------------------------------------------------- another process, played here


def test_the_refusal_names_the_holder_its_command_and_when_it_started(tiny_run, kdc):
    before = _files(tiny_run / RUN)
    started = time.time() - 60
    with held_by_another(tiny_run / RUN, pid=31337, command="kdc distill recipe.yaml", started=started):
        result = kdc("train-teacher", "recipe.yaml", "--force")
    kdc.assert_clean_exit(result, 2)
    assert (
        f"another kdc (pid 31337, `kdc distill recipe.yaml`, started "
        f"{time.strftime('%H:%M', time.localtime(started))}) is writing runs/tiny; wait for it or use another "
        f"run.name"
    ) in kdc.flat(result)
    assert "training" not in result.output
    assert _files(tiny_run / RUN) == before  # nothing trained, nothing written


def test_export_of_a_live_run_gets_the_lock_error_and_writes_nothing(tiny_run, kdc):
    before = _files(tiny_run / RUN)
    with held_by_another(tiny_run / RUN):
        result = kdc("export", str(RUN), "--format", "sparse")
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    assert "another kdc (pid 4242, `kdc run recipe.yaml`" in out and "wait for it to finish, then export" in out
    assert "interrupted" not in out
    assert _files(tiny_run / RUN) == before


def test_report_of_a_live_run_is_refused_and_leaves_every_file_as_it_was(tiny_run, kdc):
    before = _files(tiny_run / RUN)
    with held_by_another(tiny_run / RUN):
        result = kdc("report", str(RUN))
    kdc.assert_clean_exit(result, 2)
    assert "another kdc (pid 4242," in kdc.flat(result) and "then make the report" in kdc.flat(result)
    assert _files(tiny_run / RUN) == before


def test_a_second_writer_never_sweeps_the_live_writers_temp_files(tiny_run, kdc):
    live_tmp = tiny_run / RUN / "teacher" / ".model.pt.k2j4.tmp"  # what a writer has half written
    live_tmp.write_bytes(b"half a checkpoint")
    with held_by_another(tiny_run / RUN):
        result = kdc("train-teacher", "recipe.yaml", "--force")
    kdc.assert_clean_exit(result, 2)
    assert live_tmp.read_bytes() == b"half a checkpoint"


def test_a_temp_file_sweep_never_follows_a_link_out_of_the_run_directory(tiny_run, kdc, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ".precious.tmp").write_text("not kdc's")
    cache = tiny_run / RUN / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    cache.symlink_to(outside, target_is_directory=True)
    result = kdc("train-teacher", "recipe.yaml", "--force")
    kdc.assert_clean_exit(result, 0)
    assert (outside / ".precious.tmp").read_text() == "not kdc's"


def test_a_lock_file_planted_as_a_link_is_refused_and_its_target_untouched(tiny_run, kdc, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tiny_run / RUN / LOCK_FILE).unlink(missing_ok=True)
    (tiny_run / RUN / LOCK_FILE).symlink_to(victim)
    result = kdc("train-teacher", "recipe.yaml", "--force")
    kdc.assert_clean_exit(result, 2)
    assert "is a symbolic link" in kdc.flat(result)
    assert victim.read_text() == "precious"


def test_a_crafted_lock_file_cannot_drive_the_terminal(tiny_run, kdc):
    with held_by_another(tiny_run / RUN, command="kdc run \x1b[2J\x1b]0;owned\x07 recipe.yaml"):
        result = kdc("train-teacher", "recipe.yaml", "--force")
    kdc.assert_clean_exit(result, 2)
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "another kdc (pid 4242, `kdc run ?[2J?]0;owned? recipe.yaml`" in kdc.flat(result)


def _free(run_dir: Path) -> bool:
    """Whether another process could take the lock now."""
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_the_lock_is_reentrant_in_one_process_and_released_after(tmp_path):
    from kdcompress.errors import RunLockedError
    from kdcompress.run import run_dir_lock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with run_dir_lock(run_dir, "kdc run r.yaml"):
        with run_dir_lock(run_dir, "kdc report run"):  # kdc run's stages, export and report take it again
            assert json.loads((run_dir / LOCK_FILE).read_text())["command"] == "kdc run r.yaml"
        assert not _free(run_dir)  # still held by the outer block
    assert _free(run_dir)
    with held_by_another(run_dir):
        with pytest.raises(RunLockedError, match="pid 4242"):
            with run_dir_lock(run_dir, "kdc run r.yaml"):
                pass


def test_ranks_other_than_0_of_a_distributed_run_take_no_lock(tmp_path, monkeypatch):
    from kdcompress.errors import RunLockedError
    from kdcompress.run import run_dir_lock

    run_dir = tmp_path / "run"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with held_by_another(run_dir):  # rank 0 holds it: rank 1 writes nothing, so it must not be refused
        monkeypatch.setenv("RANK", "1")
        with run_dir_lock(run_dir, "kdc run r.yaml"):
            pass
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(RunLockedError):
            with run_dir_lock(run_dir, "kdc run r.yaml"):
                pass


def test_a_command_that_made_the_run_directory_and_wrote_nothing_leaves_nothing_behind(tmp_path):
    from kdcompress.run import run_dir_lock

    with run_dir_lock(tmp_path / "runs" / "new", "kdc run r.yaml"):  # bad input found after the lock was taken
        assert (tmp_path / "runs" / "new" / LOCK_FILE).is_file()
    assert list(tmp_path.iterdir()) == []
    with run_dir_lock(tmp_path / "runs" / "new", "kdc run r.yaml"):
        (tmp_path / "runs" / "new" / "kdc-run.json").write_text("{}")  # a command that wrote something
    assert sorted(p.name for p in (tmp_path / "runs" / "new").iterdir()) == [LOCK_FILE, "kdc-run.json"]
