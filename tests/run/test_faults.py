"""Faults leave consistent files, and say what happened (issue 17, row 10).

A full disk is simulated at the lowest level kdc writes through: the file object its atomic writes
open (``os.fdopen``) fails with ENOSPC after a few bytes, for the files named, as the kernel would.

* The three report files are replaced as a set: all or none, and the message says which is true.
* A stage writes its metrics.jsonl only with its checkpoint: a failed rerun leaves the previous one.
* torch.save hides a failed write behind "unexpected pos N vs M"; kdc says "No space left on device"
  and names the file.
* Ctrl-C in `kdc export` / `kdc report` gives advice that fits them (no epochs, no --restart).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from conftest import working_copy

from kdcompress.checkpoint import save_state
from kdcompress.errors import CheckpointError

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names open files through /proc")

RUN = Path("runs") / "tiny"
ENOSPC = "No space left on device"
REPORT_FILES = ("report.json", "report.md", "report.html")


class _FullDisk:
    """A file whose writes fail with ENOSPC once ``room`` bytes are in, as on a disk that has just filled up."""

    def __init__(self, fh, room: int):
        self._fh, self.room, self.written = fh, room, 0

    def write(self, data) -> int:
        if self.written + len(data) > self.room:
            raise OSError(errno.ENOSPC, ENOSPC)
        self.written += len(data)
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()


def full_disk(monkeypatch, name_part: str, room: int = 64) -> dict:
    """Every file opened for writing whose name holds ``name_part`` fills the disk after ``room`` bytes.

    Returns ``{"n": how many such files were opened}``.
    """
    real = os.fdopen
    hits = {"n": 0}

    def fdopen(fd, *args, **kwargs):
        fh = real(fd, *args, **kwargs)
        if name_part in os.path.basename(os.readlink(f"/proc/self/fd/{fd}")):
            hits["n"] += 1
            return _FullDisk(fh, room)
        return fh

    monkeypatch.setattr(os, "fdopen", fdopen)
    return hits


def temp_files(root: Path) -> list[Path]:
    return sorted(Path(root).rglob(".*.tmp"))


@pytest.fixture(scope="module")
def teacher_done(fresh_run, tiny_recipe_text):
    """`kdc train-teacher` of the tiny recipe, once per module."""
    return fresh_run(tiny_recipe_text, "faults-teacher-done", "train-teacher")[0]


@pytest.fixture
def teacher_run(teacher_done, tmp_path, monkeypatch):
    """A private copy of teacher_done, made the working directory."""
    return working_copy(teacher_done, tmp_path, monkeypatch)


# --------------------------------------------------------------------------- the report files, as a set


def test_a_full_disk_while_writing_the_report_keeps_all_three_previous_files_and_says_so(teacher_run, kdc, monkeypatch):
    run = teacher_run / RUN
    previous = {name: f"the previous {name}\n" for name in REPORT_FILES}
    for name, text in previous.items():
        (run / name).write_text(text)
    hits = full_disk(monkeypatch, ".report.html.")  # the last of the three to be written
    result = kdc("report", str(run))
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    assert hits["n"] == 1
    assert ENOSPC in out and "report.html" in out and "the previous version is intact" in out
    assert {name: (run / name).read_text() for name in REPORT_FILES} == previous  # what the message says
    assert temp_files(run) == []

    monkeypatch.undo()  # space again: all three are replaced
    again = kdc("report", str(run))
    kdc.assert_clean_exit(again, 0)
    assert all((run / name).read_text() != previous[name] for name in REPORT_FILES)


def test_a_report_set_whose_middle_file_fails_replaces_none_of_them(teacher_run, kdc, monkeypatch):
    run = teacher_run / RUN
    kdc.assert_clean_exit(kdc("report", str(run)), 0)
    before = {name: (run / name).read_bytes() for name in REPORT_FILES}
    (run / "teacher" / "metrics.jsonl").write_text("")  # the report made now differs from the one on disk
    full_disk(monkeypatch, ".report.md.")
    result = kdc("report", str(run))
    kdc.assert_clean_exit(result, 2)
    assert ENOSPC in kdc.flat(result) and "report.md" in kdc.flat(result)
    assert {name: (run / name).read_bytes() for name in REPORT_FILES} == before


# --------------------------------------------------------------------------- metrics.jsonl only with a checkpoint


def test_an_interrupted_rerun_of_a_stage_leaves_its_previous_metrics_jsonl(teacher_run, kdc, fail_training):
    stage = teacher_run / RUN / "teacher"
    before = (stage / "metrics.jsonl").read_bytes()
    fail_training("teacher", epoch=2, batch=3)
    kdc.assert_clean_exit(kdc("train-teacher", "recipe.yaml", "--set", "teacher.lr=0.02"), 130)
    assert (stage / "metrics.jsonl").read_bytes() == before  # still the checkpoint's epochs, not the failed run's


def test_a_rerun_whose_checkpoint_cannot_be_saved_leaves_the_previous_checkpoint_and_metrics(
    teacher_run, kdc, monkeypatch
):
    stage = teacher_run / RUN / "teacher"
    before = {name: (stage / name).read_bytes() for name in ("model.pt", "model.pt.manifest.json", "metrics.jsonl")}
    full_disk(monkeypatch, ".model.pt.")
    result = kdc("train-teacher", "recipe.yaml", "--set", "teacher.lr=0.02")
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    assert ENOSPC in out and "teacher/model.pt" in out and "the previous version is intact" in out
    assert {name: (stage / name).read_bytes() for name in before} == before
    assert temp_files(teacher_run / "runs") == []


# --------------------------------------------------------------------------- torch.save on a full disk


def test_a_full_disk_under_torch_save_says_no_space_left_and_names_the_file(tmp_path, monkeypatch):
    full_disk(monkeypatch, ".state.pt.")
    with pytest.raises(CheckpointError) as caught:
        save_state(tmp_path / "state.pt", {"epoch": 1, "model": {"weight": torch.zeros(10_000)}})
    message = str(caught.value)
    assert ENOSPC in message and str(tmp_path / "state.pt") in message
    assert "unexpected pos" not in message
    assert list(tmp_path.iterdir()) == []  # its temporary file is gone too


def test_kdc_names_the_resume_state_it_could_not_write_on_a_full_disk(in_tmp, write_recipe, kdc, monkeypatch):
    write_recipe()
    full_disk(monkeypatch, ".state.pt.")
    result = kdc("train-teacher", "recipe.yaml")
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    assert f"could not write {RUN / 'teacher' / 'state.pt'}: {ENOSPC}" in out
    assert "unexpected pos" not in out


# --------------------------------------------------------------------------- Ctrl-C outside training


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("command", ["export", "report"])
def test_ctrl_c_in_export_or_report_gives_advice_that_fits_the_command(command, in_tmp, write_recipe, kdc, monkeypatch):
    import kdcompress.report
    import kdcompress.run.export

    write_recipe()
    (in_tmp / RUN).mkdir(parents=True)
    if command == "export":
        monkeypatch.setattr(kdcompress.run.export, "export_stage", _interrupt)
        result = kdc("export", "recipe.yaml", "--format", "sparse")
    else:
        monkeypatch.setattr(kdcompress.report, "write_report", _interrupt)
        result = kdc("report", str(RUN))
    kdc.assert_clean_exit(result, 130)
    out = kdc.flat(result)
    assert "interrupted" in out and "rerun the same command" in out
    assert "epoch" not in out and "--restart" not in out and "resume" not in out
