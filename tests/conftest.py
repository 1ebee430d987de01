"""Shared fixtures: a tiny recipe writer and a CliRunner wrapper for `kdc`.

Everything here is sized for a 2-core CPU: the tiny recipe trains MLPs on the
shipped fashion-mnist-mini set for two epochs per stage (a few seconds).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import kdcompress
from kdcompress.cli import app

# The suite runs on a 2-core machine that may be busy with other training runs:
# one intra-op thread avoids oversubscription (tiny tensors gain nothing from more).
torch.set_num_threads(1)

# The end-to-end recipe from the test brief: fashion-mnist-mini, MLP teacher [64]
# for 2 epochs, MLP student [32], distill 2 epochs, prune rate 0.5 to 0.75 every
# 0.5 epochs over 2 epochs, no latency measurement.
TINY_RECIPE = {
    "run": {"name": "tiny", "seed": 0, "device": "cpu"},
    "data": {"dataset": "fashion-mnist-mini", "batch_size": 128},
    "teacher": {"model": "mlp", "args": {"hidden": [64]}, "epochs": 2},
    "student": {"model": "mlp", "args": {"hidden": [32]}, "baseline": True},
    "distill": {"epochs": 2},
    "prune": {"rate": 0.5, "target_sparsity": 0.75, "every": 0.5, "epochs": 2},
    "report": {"latency": False},
}


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@pytest.fixture(scope="session", autouse=True)
def image_cache(tmp_path_factory):
    """Image folders decode into a folder of this session ($KDC_CACHE), not the user's cache."""
    folder = tmp_path_factory.mktemp("image-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDC_CACHE", str(folder))
        yield folder


@pytest.fixture
def tiny_recipe_dict():
    """A fresh copy of the tiny recipe as a plain dict."""
    return copy.deepcopy(TINY_RECIPE)


@pytest.fixture(scope="session")
def tiny_recipe_text():
    """The tiny recipe as YAML text (valid on its own, cross-checks included)."""
    return yaml.safe_dump(TINY_RECIPE, sort_keys=False)


@pytest.fixture(scope="session")
def fresh_run(tmp_path_factory, kdc):
    """``fresh_run(recipe_text, name, *commands, check=True)``: see :func:`_run_in_fresh_dir`."""
    return lambda *args, **kwargs: _run_in_fresh_dir(tmp_path_factory, kdc, *args, **kwargs)


def _run_in_fresh_dir(tmp_path_factory, kdc, recipe_text: str, name: str, *commands: str, check: bool = True):
    """Write the recipe into a new directory and run each ``kdc COMMAND recipe.yaml`` there, in order.

    Returns (directory, result of the last command); with ``check`` every command must exit 0.
    """
    work = tmp_path_factory.mktemp(name)
    (work / "recipe.yaml").write_text(recipe_text, encoding="utf-8")
    result = None
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        for command in commands:
            result = kdc(command, "recipe.yaml")
            if check:
                assert result.exit_code == 0, result.output
    return work, result


@pytest.fixture
def write_recipe(tmp_path):
    """Factory: write a recipe file and return its path.

    ``write_recipe()`` writes the tiny recipe; ``write_recipe(changes={...})``
    deep-merges changes into it; ``write_recipe(text="...")`` writes raw text
    (for syntax errors and exact line numbers). ``where`` defaults to tmp_path.
    """

    def _write(
        name: str = "recipe.yaml", changes: dict | None = None, text: str | None = None, where: Path | None = None
    ) -> Path:
        folder = Path(where) if where is not None else tmp_path
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        if text is None:
            text = yaml.safe_dump(_deep_merge(TINY_RECIPE, changes or {}), sort_keys=False)
        path.write_text(text, encoding="utf-8")
        return path

    return _write


class Kdc:
    """Runs `kdc ...` in-process with typer's CliRunner.

    With typer >= 0.20 (its vendored click), ``result.output`` holds stdout and
    stderr interleaved, ``result.stdout``/``result.stderr`` each stream alone.
    kdc prints progress and errors to stderr (rich), the report table to
    stdout, so assertions on messages use ``result.output``.
    """

    def __init__(self):
        self.runner = CliRunner()

    def __call__(self, *args: str):
        return self.runner.invoke(app, [str(a) for a in args])

    @staticmethod
    def flat(result) -> str:
        """Output with every run of whitespace collapsed (rich wraps long lines at 80 columns)."""
        return " ".join(result.output.split())

    @staticmethod
    def assert_clean_exit(result, code: int) -> None:
        """Exit ``code``, no traceback printed, no stray Python exception (only SystemExit)."""
        assert result.exit_code == code, f"exit {result.exit_code}, expected {code}; output:\n{result.output}"
        assert "Traceback" not in result.output, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        assert "internal error" not in result.output, result.output


@pytest.fixture(scope="session")
def kdc():
    return Kdc()


# --------------------------------------------------------------------------- robustness helpers
# Added for the resume / bad-input / safety / property tests. Nothing above changes.


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """tmp_path, made the working directory (run directories land in tmp_path/runs)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def fail_training(monkeypatch):
    """Factory: make the training loss of one stage misbehave once, at a chosen epoch and batch.

    ``fail_training("teacher", epoch=2, batch=5)`` raises KeyboardInterrupt
    (a Ctrl-C) in the 5th batch of the teacher's 2nd epoch;
    ``action="nan"`` makes that batch's loss NaN instead. It wraps the loss
    handed to ``kdcompress.run.bodies.fit_stage``, so it works for every stage and
    whatever arguments the loss takes. The count starts with each stage run,
    so it is meant for a run that starts the stage from epoch 1. Returns a
    dict whose ``"fired"`` entry says whether it went off.
    """
    import kdcompress.run.bodies as bodies

    real_fit = bodies.fit_stage
    fired = {"fired": False}

    def arm(stage: str, epoch: int, batch: int = 5, action: str = "interrupt"):
        def _fit(ctx, model, loss, settings, hooks=(), augment=None):
            if ctx.stage != stage or fired["fired"]:
                return real_fit(ctx, model, loss, settings, hooks, augment)
            per_epoch = ctx.data.train.num_batches(ctx.recipe.data.batch_size)
            trigger = (epoch - 1) * per_epoch + batch
            calls = {"n": 0}

            def wrapped(*args):
                calls["n"] += 1
                value = loss(*args)
                if calls["n"] == trigger and not fired["fired"]:
                    fired["fired"] = True
                    if action == "interrupt":
                        raise KeyboardInterrupt
                    return value * float("nan")
                return value

            return real_fit(ctx, model, wrapped, settings, hooks, augment)

        monkeypatch.setattr(bodies, "fit_stage", _fit)
        return fired

    return arm


@pytest.fixture(scope="session")
def file_snapshot():
    """Function: {relative path: size} of every file under a folder (to show nothing new was written)."""

    def snap(root: Path) -> dict[str, int]:
        root = Path(root)
        return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}

    return snap


@pytest.fixture(scope="session")
def checkpoints_equal():
    """Function: assert two stage checkpoints hold identical tensors (torch.equal) and metrics."""
    from kdcompress.checkpoint import load_checkpoint

    def check(a: Path, b: Path) -> None:
        ca, cb = load_checkpoint(a), load_checkpoint(b)
        assert ca["arch"] == cb["arch"]
        assert set(ca["state_dict"]) == set(cb["state_dict"]), (a, b)
        for key, tensor in ca["state_dict"].items():
            assert torch.equal(tensor, cb["state_dict"][key]), f"{key} differs between {a} and {b}"
        assert ca["metrics"]["test_accuracy"] == cb["metrics"]["test_accuracy"]
        assert ca["metrics"]["test_loss"] == cb["metrics"]["test_loss"]

    return check


# Run in a child process: RUSAGE_CHILDREN then holds that child's peak RSS alone. The address-space cap only
# keeps a regression from taking the machine down with it (the code before the fix passed 11 GB).
_MEASURE = """
import json, resource, subprocess, sys
cap = 8 << 30
done = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=600,
                      preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap)))
print(json.dumps({"rc": done.returncode, "output": done.stdout + done.stderr,
                  "max_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def kdc_in_child(*args: str, cwd: Path) -> dict:
    """``kdc ARGS`` in a child process: its exit code, its output and its peak RSS in KiB."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [str(Path(kdcompress.__file__).resolve().parents[1])] + [p for p in [os.environ.get("PYTHONPATH")] if p]
        ),
    )
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, sys.executable, "-m", "kdcompress", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)


@pytest.fixture(scope="session")
def exported_run(fresh_run, tiny_recipe_text, kdc):
    """The tiny run, exported by `kdc export` in every format (sparse, shared, int8, onnx), made once per session.

    Returns its run directory (``.../runs/tiny``); copy it (``shutil.copytree``) before changing anything in it.
    """
    work, _ = fresh_run(tiny_recipe_text, "exported", "run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        result = kdc(
            "export", "runs/tiny", *[arg for fmt in ("sparse", "shared", "int8", "onnx") for arg in ("--format", fmt)]
        )
    assert result.exit_code == 0, result.output
    return work / "runs" / "tiny"


def rewrite_manifest(path: Path) -> None:
    """Make the manifest beside ``path`` match its bytes again, as an attacker who edits both would."""
    from kdcompress.files import manifest_path

    blob = path.read_bytes()
    mpath = manifest_path(path)
    manifest = json.loads(mpath.read_text())
    manifest.update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    mpath.write_text(json.dumps(manifest))


def subprocess_env() -> dict[str, str]:
    """The environment for a `kdc` child process: one thread, unbuffered, never under torchrun."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def working_copy(source: Path, tmp_path: Path, monkeypatch) -> Path:
    """A private copy of ``source`` (a finished run's folder, made once per module), made the working directory."""
    work = tmp_path / "work"
    shutil.copytree(source, work)
    monkeypatch.chdir(work)
    return work


def measured_in_chromium(html: str, script: str, width: int, tmp_path: Path):
    """What ``script`` (a measuring script added to a copy of ``html``; the report itself has none) wrote into
    ``<pre id="kdc-measure">`` once headless Chromium laid the page out in a window ``width`` pixels wide, as JSON."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on PATH: install Debian's chromium (.ci/run does) to render report.html")
    page = tmp_path / "measured.html"
    page.write_text(html.replace("</body>", script + "</body>"), encoding="utf-8")
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={width},2000"]
        + ["--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()],
        check=True,
        capture_output=True,
        timeout=120,
        text=True,
    ).stdout
    found = re.search(r'<pre id="kdc-measure">(.*?)</pre>', dom, re.S)
    assert found, "the page did not finish loading in Chromium"
    import html as html_module

    return json.loads(html_module.unescape(found.group(1)))
