"""Checkpoints on disk: a full disk never costs the previous version, damage is found, code never runs on load.

E. Disk full (ENOSPC from torch.save or a write) while replacing a checkpoint, on a first save, while writing a
   resume state, a manifest or a metrics line.
F. Damaged checkpoints: truncated, a flipped byte, a missing or broken manifest, a deleted model.pt, an old
   checkpoint format, a damaged teacher-logit cache; --force rebuilds.
G. Unsafe pickles where kdc expects a checkpoint, a resume state or the logit cache: refused, the payload never runs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import pathlib
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import kdcompress.files as files_mod
from kdcompress.checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint
from kdcompress.errors import CheckpointError
from kdcompress.files import manifest_path

RUN = Path("runs") / "tiny"
TEACHER = RUN / "teacher" / "model.pt"
ENOSPC = "No space left on device"


def temp_files(root: Path) -> list[Path]:
    return sorted(Path(root).rglob(".*.tmp"))


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _copy_into(src: Path, dest: Path, monkeypatch) -> Path:
    shutil.copytree(src, dest)
    monkeypatch.chdir(dest)
    return dest


@pytest.fixture(scope="module")
def teacher_done(fresh_run, tiny_recipe_text):
    """`kdc train-teacher` of the tiny recipe, once per module."""
    return fresh_run(tiny_recipe_text, "teacher-done", "train-teacher")[0]


@pytest.fixture(scope="module")
def distilled_done(tmp_path_factory, kdc, teacher_done):
    """teacher_done plus `kdc distill` (which writes the teacher-logit cache), once per module."""
    work = tmp_path_factory.mktemp("distilled-done") / "run"
    shutil.copytree(teacher_done, work)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        result = kdc("distill", "recipe.yaml")
    assert result.exit_code == 0, result.output
    return work


@pytest.fixture
def teacher_run(teacher_done, tmp_path, monkeypatch):
    """A private copy of teacher_done, made the working directory."""
    return _copy_into(teacher_done, tmp_path / "run", monkeypatch)


@pytest.fixture
def distilled_run(distilled_done, tmp_path, monkeypatch):
    return _copy_into(distilled_done, tmp_path / "run", monkeypatch)


def disk_full_torch_save(monkeypatch, *, when) -> dict:
    """torch.save writes a few bytes, then fails with ENOSPC for objects where ``when(obj, n)`` is true."""
    real_save = torch.save
    count = {"n": 0, "failed": 0}

    def save(obj, f, *args, **kwargs):
        count["n"] += 1
        if when(obj, count["n"]):
            count["failed"] += 1
            f.write(b"PK\x03\x04 partial bytes")
            raise OSError(errno.ENOSPC, ENOSPC)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    return count


def is_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == "kdc-checkpoint"


def is_state(obj) -> bool:
    return isinstance(obj, dict) and "optimizer" in obj


# --------------------------------------------------------------------------- E. disk full


def test_disk_full_while_replacing_a_checkpoint_keeps_the_old_one(teacher_run, kdc, monkeypatch):
    before = TEACHER.read_bytes()
    manifest_before = manifest_path(TEACHER).read_bytes()
    count = disk_full_torch_save(monkeypatch, when=lambda obj, n: is_checkpoint(obj))
    result = kdc("train-teacher", "recipe.yaml", "--force")
    assert count["failed"] == 1
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    assert ENOSPC in out and "model.pt" in out
    assert "the previous version is intact" in out
    assert "rerun the same command" in out
    # the old checkpoint and its manifest, byte for byte, and it still loads and verifies
    assert TEACHER.read_bytes() == before
    assert manifest_path(TEACHER).read_bytes() == manifest_before
    verify_checkpoint(TEACHER)
    assert load_checkpoint(TEACHER)["stage"] == "teacher"
    assert temp_files(teacher_run / "runs") == []
    # space is back: the same command goes on
    monkeypatch.undo()
    monkeypatch.chdir(teacher_run)
    again = kdc("train-teacher", "recipe.yaml", "--force")
    kdc.assert_clean_exit(again, 0)
    verify_checkpoint(TEACHER)


def test_disk_full_on_the_first_save_keeps_the_resume_state(
    in_tmp, write_recipe, kdc, monkeypatch, teacher_done, checkpoints_equal
):
    write_recipe()
    disk_full_torch_save(monkeypatch, when=lambda obj, n: is_checkpoint(obj))
    result = kdc("train-teacher", "recipe.yaml")
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    assert ENOSPC in out
    assert "intact" not in out  # there was no previous version
    assert not TEACHER.exists() and not manifest_path(TEACHER).exists()
    assert temp_files(in_tmp / "runs") == []
    assert torch.load(RUN / "teacher" / "state.pt", weights_only=True)["epoch"] == 2
    monkeypatch.undo()
    monkeypatch.chdir(in_tmp)
    again = kdc("train-teacher", "recipe.yaml")
    kdc.assert_clean_exit(again, 0)
    assert "teacher: resuming after epoch 2/2" in kdc.flat(again)
    checkpoints_equal(TEACHER, teacher_done / TEACHER)


def test_disk_full_while_writing_a_resume_state_keeps_the_previous_state(
    in_tmp, write_recipe, kdc, monkeypatch, teacher_done, checkpoints_equal
):
    write_recipe()
    states = {"n": 0}

    def second_state(obj, n):
        if is_state(obj):
            states["n"] += 1
            return states["n"] == 2
        return False

    disk_full_torch_save(monkeypatch, when=second_state)
    result = kdc("train-teacher", "recipe.yaml")
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    assert ENOSPC in out and "state.pt" in out and "the previous version is intact" in out
    assert torch.load(RUN / "teacher" / "state.pt", weights_only=True)["epoch"] == 1
    assert temp_files(in_tmp / "runs") == []
    monkeypatch.undo()
    monkeypatch.chdir(in_tmp)
    again = kdc("train-teacher", "recipe.yaml")
    kdc.assert_clean_exit(again, 0)
    assert "teacher: resuming after epoch 1/2" in kdc.flat(again)
    checkpoints_equal(TEACHER, teacher_done / TEACHER)


def test_disk_full_while_writing_the_manifest_keeps_a_consistent_checkpoint(teacher_run, kdc, monkeypatch):
    before = TEACHER.read_bytes()
    real = files_mod.write_temp

    def write_tmp(path, write):  # the disk fills up while the manifest is written
        if Path(path).name.endswith(".manifest.json"):

            def fail(fh):
                raise OSError(errno.ENOSPC, ENOSPC)

            return real(path, fail)
        return real(path, write)

    monkeypatch.setattr(files_mod, "write_temp", write_tmp)
    result = kdc("train-teacher", "recipe.yaml", "--set", "teacher.lr=0.02", "--force")
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    assert ENOSPC in out
    assert temp_files(teacher_run / "runs") == []
    if "intact" in out:  # what the message promises
        assert TEACHER.read_bytes() == before
    verify_checkpoint(TEACHER)  # whatever is on disk is a consistent checkpoint + manifest pair


def test_disk_full_while_appending_a_metrics_line_is_a_clear_error(in_tmp, write_recipe, kdc, monkeypatch):
    write_recipe()
    real_open = open

    def full_disk_open(file, mode="r", *args, **kwargs):
        if "a" in mode and str(file).endswith("metrics.partial.jsonl"):  # the running log of the stage
            raise OSError(errno.ENOSPC, ENOSPC, str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(files_mod, "open", full_disk_open, raising=False)
    result = kdc("train-teacher", "recipe.yaml")
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert "internal error" not in result.output
    assert ENOSPC in kdc.flat(result)


# --------------------------------------------------------------------------- F. damaged checkpoints


def damage(kind: str, path: Path) -> None:
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "flipped-byte":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    elif kind == "no-manifest":
        manifest_path(path).unlink()
    elif kind == "broken-manifest":
        manifest_path(path).write_text("{not json")
    else:
        raise AssertionError(kind)


DAMAGE = {  # kind -> fragments of the refusal
    "truncated": ["damaged", "truncated", "--force"],
    "flipped-byte": ["damaged", "SHA-256", "--force"],
    "no-manifest": ["no manifest", "--force"],
    "broken-manifest": ["manifest", "damaged", "--force"],
}


@pytest.mark.parametrize("command", ["run", "distill", "train-teacher"])
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_teacher_checkpoint_is_refused_and_not_overwritten(kind, command, teacher_run, kdc):
    damage(kind, TEACHER)
    before = TEACHER.read_bytes()
    manifest = manifest_path(TEACHER)
    manifest_before = manifest.read_bytes() if manifest.exists() else None
    result = kdc(command, "recipe.yaml")
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    for fragment in DAMAGE[kind]:
        assert fragment in out, (fragment, out)
    assert "teacher" in out and "model.pt" in out
    assert TEACHER.read_bytes() == before
    assert (manifest.read_bytes() if manifest.exists() else None) == manifest_before
    assert not (teacher_run / RUN / "distilled" / "model.pt").exists()
    assert "training on" not in out or command == "distill"  # the teacher is never retrained behind your back


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_force_rebuilds_a_damaged_checkpoint(kind, teacher_run, teacher_done, kdc, checkpoints_equal):
    damage(kind, TEACHER)
    result = kdc("train-teacher", "recipe.yaml", "--force")
    kdc.assert_clean_exit(result, 0)
    verify_checkpoint(TEACHER)
    checkpoints_equal(TEACHER, teacher_done / TEACHER)
    kdc.assert_clean_exit(kdc("train-teacher", "recipe.yaml"), 0)  # and it is up to date afterwards


def test_damaged_checkpoint_is_refused_by_report(teacher_run, kdc):
    damage("flipped-byte", TEACHER)
    result = kdc("report", "runs/tiny")
    kdc.assert_clean_exit(result, 2)
    assert "SHA-256" in kdc.flat(result)
    assert not (teacher_run / RUN / "report.json").exists()


def test_deleted_checkpoint_with_manifest_left_can_be_rebuilt_as_advised(teacher_run, kdc):
    TEACHER.unlink()
    first = kdc("train-teacher", "recipe.yaml")
    out = kdc.flat(first)
    assert "Traceback" not in first.output
    assert first.exit_code == 0 or "--force" in out, out


def test_checkpoint_in_another_format_version_is_refused(teacher_run, kdc):
    ckpt = load_checkpoint(TEACHER)
    save_checkpoint(TEACHER, {**ckpt, "format_version": 99, "kdc_version": "9.9"})
    verify_checkpoint(TEACHER)  # a well-formed file with a good manifest ...
    before = TEACHER.read_bytes()
    result = kdc("distill", "recipe.yaml")
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    assert "kdc 9.9" in out and "format 99" in out and "reads format 1" in out  # ... in a format this kdc refuses
    assert TEACHER.read_bytes() == before


def test_damaged_teacher_logit_cache_is_a_clear_error(distilled_run, kdc):
    caches = sorted((distilled_run / RUN / "cache").glob("teacher-logits-*.pt"))
    assert len(caches) == 1
    cache = caches[0]
    cache.write_bytes(cache.read_bytes()[:100])
    distilled = RUN / "distilled" / "model.pt"
    before = distilled.read_bytes()
    result = kdc("distill", "recipe.yaml", "--force")
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    assert "teacher-logit cache" in out and "damaged" in out and "delete it" in out
    assert distilled.read_bytes() == before
    cache.unlink()  # as advised
    kdc.assert_clean_exit(kdc("distill", "recipe.yaml", "--force"), 0)
    verify_checkpoint(distilled)


def test_load_checkpoint_refuses_damage_directly(teacher_run):
    damage("truncated", TEACHER)
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(TEACHER)
    with pytest.raises(CheckpointError, match="damaged or not a checkpoint"):
        load_checkpoint(TEACHER, verify=False)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(teacher_run / "nothing.pt")


# --------------------------------------------------------------------------- G. code never runs on load


class Payload:
    """Unpickling this runs code: it touches ``marker``."""

    def __init__(self, marker: Path):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def malicious_bytes(marker: Path, how: str) -> bytes:
    """A checkpoint-looking dict with a payload, as torch.save or plain pickle writes it."""
    obj = {
        "format": "kdc-checkpoint",
        "format_version": 1,
        "stage": "teacher",
        "state_dict": {"net.1.weight": torch.zeros(2, 2)},
        "payload": Payload(marker),
    }
    if how == "torch.save":
        import io

        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()
    return pickle.dumps(obj)


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_the_payload_really_runs_code_when_loaded_unsafely(how, tmp_path):
    """The control: without weights_only these bytes do create the marker, so the tests below mean something."""
    marker = tmp_path / "pwned"
    data = malicious_bytes(marker, how)
    path = tmp_path / "evil.pt"
    path.write_bytes(data)
    if how == "pickle":
        pickle.loads(data)
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


def plant_teacher(work: Path, data: bytes, with_manifest: bool) -> None:
    """Put ``data`` where the teacher checkpoint belongs, as if kdc had written it (run marker, manifest)."""
    from kdcompress import __version__
    from kdcompress.recipe import load_recipe
    from kdcompress.run import stage_fingerprint

    run_dir = work / RUN
    (run_dir / "teacher").mkdir(parents=True)
    (run_dir / "kdc-run.json").write_text(json.dumps({"format": 1, "kdc_version": __version__}) + "\n")
    (run_dir / "teacher" / "model.pt").write_bytes(data)
    if with_manifest:
        recipe = load_recipe(work / "recipe.yaml")
        manifest = {
            "file": "model.pt",
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "stage": "teacher",
            "fingerprint": stage_fingerprint(recipe, "teacher", {}),
        }
        (run_dir / "teacher" / "model.pt.manifest.json").write_text(json.dumps(manifest) + "\n")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("with_manifest", [True, False], ids=["with-manifest", "without-manifest"])
@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_malicious_teacher_checkpoint_is_refused_by_distill(how, with_manifest, in_tmp, write_recipe, kdc):
    write_recipe()
    marker = in_tmp / "pwned"
    plant_teacher(in_tmp, malicious_bytes(marker, how), with_manifest)
    if with_manifest:
        verify_checkpoint(in_tmp / TEACHER)  # the manifest check passes: the loader itself must refuse
    result = kdc("distill", "recipe.yaml")
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    assert "teacher" in out and "model.pt" in out
    if with_manifest:
        assert "refused" in out or "damaged or not a checkpoint" in out, out
        if how == "torch.save":
            assert "could run code" in out
    else:
        assert "no manifest" in out
    assert not marker.exists()
    assert not (in_tmp / RUN / "distilled" / "model.pt").exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_load_checkpoint_refuses_a_malicious_pickle(how, verify, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    data = malicious_bytes(marker, how)
    path.write_bytes(data)
    manifest_path(path).write_text(
        json.dumps({"file": "model.pt", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    )
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, verify=verify)
    assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_malicious_resume_state_is_refused(in_tmp, write_recipe, kdc):
    write_recipe()
    marker = in_tmp / "pwned"
    (in_tmp / RUN / "teacher").mkdir(parents=True)
    (in_tmp / RUN / "teacher" / "state.pt").write_bytes(malicious_bytes(marker, "torch.save"))
    from kdcompress import __version__

    (in_tmp / RUN / "kdc-run.json").write_text(json.dumps({"format": 1, "kdc_version": __version__}))
    result = kdc("train-teacher", "recipe.yaml")
    kdc.assert_clean_exit(result, 2)
    out = kdc.flat(result)
    assert "state.pt" in out and "unsafe" in out and "--restart" in out
    assert not marker.exists()
    assert not (in_tmp / TEACHER).exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_malicious_teacher_logit_cache_is_refused(distilled_run, kdc):
    (cache,) = sorted((distilled_run / RUN / "cache").glob("teacher-logits-*.pt"))
    marker = distilled_run / "pwned"
    cache.write_bytes(malicious_bytes(marker, "torch.save"))
    result = kdc("distill", "recipe.yaml", "--force")
    kdc.assert_clean_exit(result, 2)
    assert "teacher-logit cache" in kdc.flat(result)
    assert not marker.exists()
