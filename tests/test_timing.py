"""Latency is timed in its own process (issue 18, item 1): training keeps OpenMP's default wait policy, the timing
process starts with OMP_WAIT_POLICY=PASSIVE, and that process builds only what the report checked and named.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_RECIPE, _deep_merge, subprocess_env

from kdcompress import models, names
from kdcompress.checkpoint import read_manifest, save_checkpoint
from kdcompress.errors import KdcError
from kdcompress.models import MLP, model_spec
from kdcompress.timing import MALLOC_SETTINGS, ModelFile, child_env, time_in_child

MARKER_MODULE = """\
import pathlib
pathlib.Path({marker!r}).touch()  # importing this module is what must not happen
{body}
"""


@pytest.fixture(autouse=True)
def fresh_import_path(monkeypatch):
    """Each test starts with no import folders of kdc's and sys.path as it was, and leaves them as they were."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    with names.saved_import_dirs(clear=True):
        yield


def write_checkpoint(path: Path, name: str = "mlp", hidden=(16,)) -> ModelFile:
    """A small MLP checkpoint whose architecture names ``name``; returns it as the report would pass it."""
    torch.manual_seed(0)
    net = MLP((1, 28, 28), 10, list(hidden))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        path,
        {
            "arch": model_spec(name, {"hidden": list(hidden)}, 10, [1, 28, 28]),
            "state_dict": net.state_dict(),
            "metrics": {"test_accuracy": 0.5},
        },
    )
    return ModelFile("checkpoint", str(path), read_manifest(path)["sha256"], "mlp", f"{path.parent.name} checkpoint")


def test_the_timing_process_waits_passively_whatever_the_calling_process_has(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice for training: not the timing's
    files = {
        "small": write_checkpoint(tmp_path / "small" / "model.pt"),
        "wide": write_checkpoint(tmp_path / "wide" / "model.pt", hidden=(64,)),
    }
    timed, policy = time_in_child(
        files, [(1, ["small", "wide"]), (4, ["wide"])], threads=1, rounds=3, min_run_time=0.01
    )
    assert policy == "PASSIVE"
    assert [sorted(t) for t in timed] == [["small", "wide"], ["wide"]]
    assert {t["runs"] for t in timed[0].values()} == {3} and timed[1]["wide"]["batch"] == 4
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"  # this process's environment is left as it was


def test_the_timing_process_does_not_inherit_the_training_spin_count(monkeypatch):
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")  # what cli.entry gives training: it would override PASSIVE's 0
    env = child_env()
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in env


def test_the_timing_process_fixes_the_allocator_thresholds_unless_the_user_set_them(monkeypatch):
    """glibc's dynamic mmap threshold made one model's time depend on the models timed before it."""
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    env = child_env()
    assert env["MALLOC_MMAP_THRESHOLD_"] == MALLOC_SETTINGS["MALLOC_MMAP_THRESHOLD_"]
    assert env["MALLOC_TRIM_THRESHOLD_"] == "12345"


def test_the_timing_process_builds_no_model_but_the_one_the_report_named(tmp_path, monkeypatch):
    """A checkpoint replaced after the report checked it, now naming a planted module: the child refuses it by name,
    before importing anything, though the module lies in the working directory and the recipe's folder."""
    marker = tmp_path / "imported"
    name = f"planted_{uuid.uuid4().hex[:8]}"
    for folder in (tmp_path, tmp_path / "recipes"):
        folder.mkdir(exist_ok=True)
        (folder / f"{name}.py").write_text(MARKER_MODULE.format(marker=str(marker), body="def build(**kw): pass"))
    names.add_import_dir(tmp_path / "recipes")  # as loading a recipe from there does
    monkeypatch.chdir(tmp_path)
    file = write_checkpoint(tmp_path / "run" / "pruned" / "model.pt", name=f"{name}:build")
    with pytest.raises(KdcError, match=f"'{name}:build'.*'mlp'|'mlp'.*'{name}:build'"):
        time_in_child({"pruned": file}, [(1, ["pruned"])], threads=1, rounds=1, min_run_time=0.01)
    assert not marker.exists()


def test_a_file_that_changed_after_the_report_checked_it_is_not_timed(tmp_path):
    file = write_checkpoint(tmp_path / "pruned" / "model.pt")
    write_checkpoint(tmp_path / "pruned" / "model.pt", hidden=(8,))  # replaced, with a manifest that matches it
    with pytest.raises(KdcError, match="pruned checkpoint changed while the report was being made"):
        time_in_child({"pruned": file}, [(1, ["pruned"])], threads=1, rounds=1, min_run_time=0.01)


def test_the_timing_process_imports_nothing_from_the_working_directory(tmp_path, monkeypatch):
    """Modules named like the standard library's in the working directory, with "" on this process's sys.path (as
    `python -c` and notebooks have it): the child imports the real ones."""
    marker = tmp_path / "imported"
    work = tmp_path / "work"
    work.mkdir()
    for module in ("json", "dataclasses", "subprocess", "numbers"):
        (work / f"{module}.py").write_text(MARKER_MODULE.format(marker=str(marker), body=""))
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", ["", *sys.path])
    file = write_checkpoint(tmp_path / "student" / "model.pt")
    timed, _ = time_in_child({"student": file}, [(1, ["student"])], threads=1, rounds=2, min_run_time=0.01)
    assert timed[0]["student"]["runs"] == 2
    assert not marker.exists()


PROBE = """\
import json, os, pathlib
from kdcompress.models import MLP


def build(num_classes, input_shape, hidden=(16,)):
    pathlib.Path("policy.json").write_text(json.dumps([os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")]))
    return MLP(input_shape, num_classes, list(hidden))
"""


def test_kdc_trains_with_the_openmp_wait_policy_it_was_started_with(tmp_path):
    """The teacher's own factory records the environment of the process that trains it: kdc sets no policy."""
    (tmp_path / "probe.py").write_text(PROBE)
    recipe = _deep_merge(TINY_RECIPE, {"teacher": {"model": "probe:build", "args": {"hidden": [16]}, "epochs": 1}})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = {k: v for k, v in subprocess_env().items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(models.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", "kdcompress", "train-teacher", "recipe.yaml", "--quiet"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # no policy: OpenMP's default, spinning 10,000 turns (cli.entry) rather than its 300,000
    assert json.loads((tmp_path / "policy.json").read_text()) == [None, "10000"]
