"""The terminal report at the widths people use: file names whole at 80 columns, and stdout that is not a
terminal (a pipe, a file) at most 100 columns a line with no trailing spaces (issue 20)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from rich.console import Console

from kdcompress.report import report_table

RUN = Path("runs") / "tiny"


@pytest.fixture(scope="module")
def exported(fresh_run, tiny_recipe_text, kdc):
    """The tiny run exported as sparse and shared; returns its working directory."""
    work, _ = fresh_run(tiny_recipe_text, "widths", "run")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        result = kdc("export", str(RUN), "--format", "sparse", "--format", "shared")
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    return work


def _with_latency(report: dict) -> dict:
    """The report as a run with report.latency on would have it: two batch sizes timed for every row."""
    report["latency_batches"] = [1, 64]
    for row in report["stages"]:
        row["latency"] = {b: {"median_ms": 12.345, "iqr_ms": 0.25} for b in ("1", "64")}
    for art in report["artifacts"]:
        art["latency_ms"] = {"1": 0.123, "64": 12.345}
    return report


def _render(renderable, width: int) -> list[str]:
    console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    console.print(renderable)
    return console.export_text().splitlines()


@pytest.mark.parametrize("width", [80, 60])
def test_artifact_file_names_stay_whole_at_80_columns(exported, width):
    report = _with_latency(json.loads((exported / RUN / "report.json").read_text()))
    lines = _render(report_table(report), width)
    names = [Path(a["path"]).name for a in report["artifacts"]]
    assert names == ["pruned-sparse-fp16.kdca", "pruned-shared-4bit.kdca"]
    for name in names:
        assert any(name in line for line in lines), "\n".join(lines)
    assert max(len(line) for line in lines) <= width
    artifacts = lines[next(i for i, line in enumerate(lines) if line.startswith("artifacts")) :]
    assert any("test acc %" in line for line in artifacts)  # the accuracy stays; other columns went


def test_the_artifact_table_keeps_every_column_when_there_is_room(exported):
    report = _with_latency(json.loads((exported / RUN / "report.json").read_text()))
    text = "\n".join(_render(report_table(report), 120))
    for header in ("teacher", "batch 1", "batch 64", "vs"):
        assert header in text, text


def test_stdout_that_is_no_terminal_has_no_line_over_100_columns_and_no_trailing_spaces(exported, kdc, monkeypatch):
    monkeypatch.chdir(exported)
    monkeypatch.delenv("COLUMNS", raising=False)
    for args in (["report", str(RUN)], ["recipes"], ["validate", "recipe.yaml"]):
        result = kdc(*args)
        kdc.assert_clean_exit(result, 0)
        lines = result.stdout.splitlines()
        assert lines, args
        too_long = [line for line in lines if len(line) > 100]
        assert not too_long, "\n".join(too_long)
        padded = [line for line in lines if line != line.rstrip()]
        assert not padded, "\n".join(repr(line) for line in padded)
