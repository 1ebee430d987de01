"""What a run shows while it trains: epoch lines, progress bars, ETAs, --quiet, logs, TensorBoard scalars.

The stderr line counts are taken from real processes (``python -m kdcompress`` with stderr sent to a
file): typer's CliRunner hands kdc a stream that is no terminal either, but it is not the file a user's
``2>log`` makes, and ``result.output`` mixes stdout in.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from conftest import TINY_RECIPE
from rich.console import Console

import kdcompress
from kdcompress.progress import RunProgress, clock_text

STAGES = ["teacher", "student", "distilled", "pruned"]
EPOCHS = 2  # every stage of the tiny recipe
ANSI = re.compile(r"\x1b[\[\]()#;?]*[0-9;]*[A-Za-z]")


def _kdc_process(cwd: Path, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    """``python -m kdcompress ARGS`` in ``cwd`` with stderr written to a file, as ``2>log`` does; returns (process, log)."""
    root = str(Path(kdcompress.__file__).resolve().parents[1])  # this checkout's kdcompress
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("FORCE_COLOR", "FORCE_TERMINAL", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "CLICOLOR_FORCE")
    }
    env.update(PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    log = cwd / "stderr.log"
    with open(log, "w", encoding="utf-8") as err:
        done = subprocess.run(
            [sys.executable, "-m", "kdcompress", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            timeout=600,
        )
    return done, log.read_text(encoding="utf-8")


@pytest.fixture
def tiny_dir(tmp_path):
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(TINY_RECIPE, sort_keys=False), encoding="utf-8")
    return tmp_path


# --------------------------------------------------------------------------- logs and --quiet, real processes


def test_stderr_to_a_file_gets_one_plain_line_per_epoch(tiny_dir):
    done, log = _kdc_process(tiny_dir, "run", "recipe.yaml")
    assert done.returncode == 0, log[-3000:]
    assert "\r" not in log, "a live display redrew into the log file"
    assert not ANSI.search(log), "escape codes in the log file"
    lines = log.splitlines()
    epoch_lines = [line for line in lines if re.match(r"\w+ epoch \d+/\d+ ", line)]
    assert len(epoch_lines) == len(STAGES) * EPOCHS, log
    for stage in STAGES:
        for epoch in range(1, EPOCHS + 1):
            assert sum(line.startswith(f"{stage} epoch {epoch}/{EPOCHS} ") for line in epoch_lines) == 1, (stage, epoch)
    for line in epoch_lines:  # everything the issue asks of an epoch line
        assert re.search(r"loss \d\.\d{4}  train acc \d\.\d{4}  test acc \d\.\d{4}  lr \S+", line), line
        assert re.search(r"  \d+\.\d s($|  ETA)", line), line
        assert ("sparsity 0." in line) == line.startswith("pruned"), line
    # the learning rate is the one the epoch trained with: cosine over 2 epochs from 0.05 (0.01 when pruning)
    assert "lr 0.05 " in epoch_lines[0] and "lr 0.025 " in epoch_lines[1]
    assert "lr 0.01 " in epoch_lines[-2] and "lr 0.005 " in epoch_lines[-1]

    # the first epoch of a stage has measured a rate: it says what is left of the stage and of the run; the
    # teacher's rate is not taken for the student's
    def eta(epoch_line: str) -> str:  # on the epoch's line, or on the next one when both do not fit 100 columns
        after = lines[lines.index(epoch_line) + 1]
        return epoch_line if "ETA" in epoch_line else after if after.startswith("  ETA ") else ""

    assert eta(epoch_lines[0]).endswith(" 6 student epochs not timed yet"), eta(epoch_lines[0])
    assert re.search(r"ETA stage \d+:\d\d, run \d+:\d\d$", eta(epoch_lines[2])), eta(epoch_lines[2])  # student 1/2
    assert eta(epoch_lines[-1]) == ""  # nothing left
    assert max(len(line) for line in epoch_lines + [eta(line) for line in epoch_lines]) <= 100, log
    assert not [line for line in lines if not line.strip()], "blank lines in the log"
    # per stage: a start line, its epochs (each perhaps with its ETA's line), an end line; the cache and report lines
    assert len(lines) <= 2 * len(STAGES) * EPOCHS + 2 * len(STAGES) + 4, log
    assert "kdc report: tiny" in done.stdout


def test_quiet_run_leaves_errors_and_the_summary_only(tiny_dir):
    done, log = _kdc_process(tiny_dir, "run", "recipe.yaml", "--quiet")
    assert done.returncode == 0, log[-3000:]
    lines = log.splitlines()
    assert len(lines) <= 20, log  # the acceptance, on the quickstart
    assert not any("epoch" in line or "training on" in line for line in lines), log
    # where the report went is part of the summary (its wording is the report command's business)
    assert len(lines) <= 2 and lines[-1].startswith("wrote runs/tiny/report"), log
    # the final summary is all there: the report table and its warnings on stdout
    assert "kdc report: tiny" in done.stdout
    assert (tiny_dir / "runs" / "tiny" / "pruned" / "model.pt").is_file()


# --------------------------------------------------------------------------- --quiet in-process


QUIET_COMMANDS = ["run", "train-teacher", "train-student", "distill", "prune", "export", "sweep"]


@pytest.mark.parametrize("command", QUIET_COMMANDS)
def test_every_training_command_takes_quiet(kdc, command):
    result = kdc(command, "--help")
    assert result.exit_code == 0, result.output
    assert "--quiet" in result.stdout


def test_quiet_stage_command_prints_one_summary_line(kdc, write_recipe, in_tmp):
    recipe = write_recipe(where=in_tmp)
    result = kdc("train-teacher", recipe, "--quiet")
    kdc.assert_clean_exit(result, 0)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert re.fullmatch(
        r"teacher: test accuracy 0\.\d{4}, 50,890 of 50,890 parameters non-zero "
        r"\(runs/tiny/teacher/model\.pt\)",
        lines[0],
    ), lines[0]


def test_quiet_still_prints_errors(kdc, write_recipe, in_tmp):
    recipe = write_recipe(where=in_tmp, changes={"teacher": {"model": "mlpp"}})
    result = kdc("run", recipe, "--quiet")
    kdc.assert_clean_exit(result, 2)
    assert "did you mean 'mlp'" in kdc.flat(result)


# --------------------------------------------------------------------------- the display itself


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _record(stage_epoch: int, **extra) -> dict:
    return {
        "epoch": stage_epoch,
        "train_loss": 0.5,
        "train_accuracy": 0.8,
        "test_loss": 0.6,
        "test_accuracy": 0.75,
        "lr": 0.0125,
        "seconds": 10.0,
        **extra,
    }


def test_eta_is_said_only_once_a_rate_is_measured():
    clock = _Clock()
    progress = RunProgress(Console(file=io.StringIO()), clock=clock, min_batches=50)
    with progress.stage("teacher", epochs=2, first_epoch=0, batches_per_epoch=200):
        progress.begin_epoch(0)
        clock.now = 4.0
        progress.advance(40)
        assert progress.eta() == (None, None)  # 40 batches: neither an epoch nor 50 batches
        clock.now = 5.0
        progress.advance(50)
        stage_left, run_left = progress.eta()
        assert stage_left == pytest.approx(350 / 10)  # 350 batches left at 10 per second
        assert run_left == pytest.approx(stage_left)  # nothing after this stage
    short = RunProgress(Console(file=io.StringIO()), clock=clock, min_batches=50)
    with short.stage("teacher", epochs=3, first_epoch=0, batches_per_epoch=20):
        short.begin_epoch(0)
        short.advance(10)
        assert short.eta() == (None, None)
        clock.now += 2.0
        short.end_epoch(_record(1))  # a whole epoch is a rate, though under 50 batches
        assert short.eta()[0] == pytest.approx(40 / 10)


def test_run_eta_covers_the_stages_to_come_at_their_models_rate():
    clock = _Clock()
    buf = io.StringIO()
    plan = {"teacher": (2, "teacher"), "student": (0, "student"), "distilled": (2, "student"), "pruned": (1, "student")}
    progress = RunProgress(Console(file=buf, width=200), plan, clock=clock)
    with progress.stage("teacher", epochs=2, first_epoch=0, batches_per_epoch=100):
        progress.begin_epoch(0)
        clock.now = 10.0  # the teacher: 10 batches a second
        progress.end_epoch(_record(1))
        stage_left, run_left = progress.eta()
        assert stage_left == pytest.approx(10.0)
        # no student stage measured yet: its 3 epochs are not guessed from the teacher's speed
        assert run_left == pytest.approx(10.0)
        assert progress.untimed() == {"student": 3}
        progress.begin_epoch(1)
        clock.now = 20.0
        progress.end_epoch(_record(2))
    assert buf.getvalue().splitlines() == [  # the ETA on a line of its own when both do not fit 100 columns
        "teacher epoch 1/2  loss 0.5000  train acc 0.8000  test acc 0.7500  lr 0.0125  10.0 s",
        "  ETA stage 0:10, run >0:10 (3 student epochs not timed yet)",
        "teacher epoch 2/2  loss 0.5000  train acc 0.8000  test acc 0.7500  lr 0.0125  10.0 s",
        "  ETA run: 3 student epochs not timed yet",
    ]
    with progress.stage("distilled", epochs=2, first_epoch=0, batches_per_epoch=100):
        progress.begin_epoch(0)
        clock.now = 22.0  # the student: 50 batches a second
        progress.end_epoch(_record(1))
        stage_left, run_left = progress.eta()
        assert stage_left == pytest.approx(2.0)
        assert run_left == pytest.approx(2.0 + 100 / 50)  # pruned trains the student: its rate, not the teacher's
        assert progress.untimed() == {}
    with progress.stage("pruned", epochs=1, first_epoch=0, batches_per_epoch=100):
        progress.begin_epoch(0)
        clock.now = 25.0
        progress.advance(50)  # 50 batches in 3 s: this stage's own rate now, not distilled's
        assert progress.eta() == (pytest.approx(3.0), pytest.approx(3.0))


def test_a_resumed_stage_counts_only_the_epochs_left():
    clock = _Clock()
    progress = RunProgress(Console(file=io.StringIO()), clock=clock)
    with progress.stage("pruned", epochs=8, first_epoch=6, batches_per_epoch=10):
        progress.begin_epoch(6)
        clock.now = 1.0
        progress.end_epoch(_record(7, sparsity=0.9))
        assert progress.eta() == (pytest.approx(1.0), pytest.approx(1.0))


def test_live_bar_on_a_terminal_and_plain_lines_elsewhere():
    plain, live = io.StringIO(), io.StringIO()
    for buf, terminal in ((plain, False), (live, True)):
        clock = _Clock()
        progress = RunProgress(Console(file=buf, force_terminal=terminal, width=100), clock=clock)
        assert progress.live is terminal
        with progress.stage("pruned", epochs=2, first_epoch=0, batches_per_epoch=100):
            for epoch in range(2):
                progress.begin_epoch(epoch)
                for done in range(10, 101, 10):
                    clock.now += 0.1
                    progress.advance(done, "loss 0.5000 acc 0.800")
                progress.end_epoch(_record(epoch + 1, sparsity=0.5))
    assert plain.getvalue().splitlines() == [
        "pruned epoch 1/2  loss 0.5000  train acc 0.8000  test acc 0.7500  lr 0.0125  sparsity 0.500  10.0 s",
        "  ETA stage 0:01",
        "pruned epoch 2/2  loss 0.5000  train acc 0.8000  test acc 0.7500  lr 0.0125  sparsity 0.500  10.0 s",
    ]
    shown = live.getvalue()
    assert "\x1b[" in shown and "━" in shown and "/200" in shown  # a bar over the stage's 200 batches
    assert re.search(r"ETA \d:\d\d", shown)  # the bar's last frame (it is redrawn at 10 Hz, so mid-run frames vary)


def test_epoch_lines_fit_100_columns_at_their_longest():
    buf = io.StringIO()
    clock = _Clock()
    plan = {"teacher": (0, "teacher"), "distilled": (100, "student"), "pruned": (100, "student")}
    progress = RunProgress(Console(file=buf, width=300), plan, clock=clock)
    for stage, sparsity in (("distilled", {}), ("pruned", {"sparsity": 0.75})):
        with progress.stage(stage, epochs=100, first_epoch=0, batches_per_epoch=100):
            for epoch in (0, 99):
                progress.begin_epoch(epoch)
                clock.now += 1234.5
                progress.end_epoch(_record(epoch + 1, train_loss=12.3456, lr=0.000123456, seconds=1234.5, **sparsity))
    lines = buf.getvalue().splitlines()
    assert any("distilled epoch 100/100" in line for line in lines) and any("ETA" in line for line in lines)
    assert any(line.startswith("pruned ") and "100/100" in line for line in lines)
    assert max(len(line) for line in lines) <= 100, "\n".join(lines)


def test_quiet_console_shows_nothing():
    buf = io.StringIO()
    progress = RunProgress(Console(file=buf, force_terminal=True, quiet=True), clock=_Clock())
    assert not progress.live
    with progress.stage("teacher", epochs=1, first_epoch=0, batches_per_epoch=10):
        progress.begin_epoch(0)
        progress.advance(10, "")
        progress.end_epoch(_record(1))
    assert buf.getvalue() == ""


def test_clock_text():
    assert [clock_text(s) for s in (0, 4.4, 65, 3599.6, 3723)] == ["0:00", "0:04", "1:05", "1:00:00", "1:02:03"]


# --------------------------------------------------------------------------- report.tensorboard


def test_tensorboard_not_installed_stops_before_training(kdc, write_recipe, in_tmp, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not importable, installed or not
    recipe = write_recipe(where=in_tmp, changes={"report": {"tensorboard": True}})
    for command in ("validate", "run"):
        result = kdc(command, recipe)
        kdc.assert_clean_exit(result, 2)
        message = kdc.flat(result)
        assert "pip install tensorboard" in message and "report.tensorboard: false" in message, message
        assert message.count("error:") == 1
    assert not (in_tmp / "runs" / "tiny" / "teacher").exists()  # nothing trained
    result = kdc("validate", recipe, "--set", "report.tensorboard=false")
    kdc.assert_clean_exit(result, 0)


class _FakeWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter: records scalars, leaves an event file."""

    scalars: list = []
    count = 0

    def __init__(self, log_dir: str):
        type(self).count += 1
        self.log_dir = log_dir
        Path(log_dir, f"events.out.tfevents.{type(self).count}").write_text("fake")

    def add_scalar(self, tag, value, step):
        self.scalars.append((Path(self.log_dir).name, tag, float(value), step))

    def flush(self):
        pass

    def close(self):
        self.scalars.append((Path(self.log_dir).name, "closed", 0.0, 0))


def test_tensorboard_scalars_for_every_stage_and_epoch(kdc, write_recipe, in_tmp, monkeypatch):
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = _FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    monkeypatch.setattr(_FakeWriter, "scalars", [])
    recipe = write_recipe(where=in_tmp, changes={"report": {"tensorboard": True}})
    result = kdc("run", recipe)
    kdc.assert_clean_exit(result, 0)
    board = in_tmp / "runs" / "tiny" / "tensorboard"
    assert sorted(p.name for p in board.iterdir()) == sorted(STAGES)
    for stage in STAGES:
        mine = [(tag, value, step) for name, tag, value, step in _FakeWriter.scalars if name == stage]
        assert mine[-1][0] == "closed"
        tags = {tag for tag, _, _ in mine}
        assert {"loss/train", "loss/test", "accuracy/train", "accuracy/test", "lr", "seconds"} <= tags, tags
        assert ("sparsity" in tags) == (stage == "pruned")
        metrics = [
            json.loads(line) for line in (in_tmp / "runs" / "tiny" / stage / "metrics.jsonl").read_text().splitlines()
        ]
        for record in metrics:  # the values are the epoch's metrics, at step = epoch
            assert ("accuracy/test", pytest.approx(record["test_accuracy"]), record["epoch"]) in mine
            assert ("lr", pytest.approx(record["lr"]), record["epoch"]) in mine
    # a stage trained again from epoch 1 replaces its event files instead of drawing its curves twice
    before = sorted(p.name for p in (board / "teacher").iterdir())
    result = kdc("train-teacher", recipe, "--force")
    kdc.assert_clean_exit(result, 0)
    after = sorted(p.name for p in (board / "teacher").iterdir())
    assert len(before) == len(after) == 1 and before != after


def test_tensorboard_switch_changes_no_fingerprint(write_recipe):
    from kdcompress.recipe import load_recipe
    from kdcompress.run import stage_fingerprint

    off = load_recipe(write_recipe())
    on = load_recipe(write_recipe(), ["report.tensorboard=true"])
    assert on.report.tensorboard and not off.report.tensorboard
    for stage in STAGES:
        assert stage_fingerprint(on, stage, {}) == stage_fingerprint(off, stage, {})


def test_the_terminal_marks_a_stage_trained_once_for_every_seed_as_the_html_does():
    from test_html import full_report

    from kdcompress.report import report_table

    buf = io.StringIO()
    Console(file=buf, width=100, color_system=None).print(report_table(full_report()))
    lines = buf.getvalue().splitlines()
    teacher = next(line for line in lines if "teacher" in line and "±" in line)
    assert "teacher (trained once)" in teacher, teacher
    assert not any("student (trained once)" in line for line in lines)
    assert max(len(line) for line in lines) <= 100


@pytest.mark.parametrize(
    ("mean", "se", "above", "verdict"),
    [
        (0.0059, 0.0014, True, "above 2 SE"),
        (-0.0092, 0.0007, False, "a loss beyond 2 SE"),
        (-0.0004, 0.0007, False, "within 2 SE (seed noise)"),
        (0.0010, None, None, "not above 2 SE"),
    ],
)
def test_the_seed_verdict_tells_a_loss_beyond_noise_from_noise(mean, se, above, verdict):
    """A mean difference of -0.92 points with an SE of 0.07 is a loss, not merely 'not above 2 SE'."""
    from kdcompress.report.text import seed_comparison_text

    seeded = {
        "n": 3,
        "differences": [{"seed": s, "difference": mean} for s in range(3)],
        "mean": mean,
        "std": 0.001,
        "se": se,
        "noise_z": 2.0,
        "mean_above_2se": above,
    }
    text = seed_comparison_text(seeded)
    assert f"): {verdict}; per seed 0:" in text
