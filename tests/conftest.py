"""Shared fixtures: a tiny recipe writer and a CliRunner wrapper for `kdc`.

Everything here is sized for a 2-core CPU: the tiny recipe trains MLPs on the
shipped fashion-mnist-mini set for two epochs per stage (a few seconds).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

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


@pytest.fixture
def tiny_recipe_dict():
    """A fresh copy of the tiny recipe as a plain dict."""
    return copy.deepcopy(TINY_RECIPE)


@pytest.fixture(scope="session")
def tiny_recipe_text():
    """The tiny recipe as YAML text (valid on its own, cross-checks included)."""
    return yaml.safe_dump(TINY_RECIPE, sort_keys=False)


@pytest.fixture
def write_recipe(tmp_path):
    """Factory: write a recipe file and return its path.

    ``write_recipe()`` writes the tiny recipe; ``write_recipe(changes={...})``
    deep-merges changes into it; ``write_recipe(text="...")`` writes raw text
    (for syntax errors and exact line numbers). ``where`` defaults to tmp_path.
    """

    def _write(name: str = "recipe.yaml", changes: dict | None = None, text: str | None = None,
               where: Path | None = None) -> Path:
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
