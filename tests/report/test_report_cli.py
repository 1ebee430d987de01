"""`kdc report` options (issue 12): several runs compared into one folder (--out), what is printed
(--format table|md|json|html|all) and --open, with clear errors for bad input."""

from __future__ import annotations

import json
import shutil
import webbrowser
from pathlib import Path

import pytest
import yaml
from conftest import TINY_RECIPE, _deep_merge


@pytest.fixture(scope="module")
def two_runs(fresh_run):
    """The tiny recipe, and the same at temperature 2 under another name, in one folder."""
    t2 = _deep_merge(TINY_RECIPE, {"run": {"name": "t2"}, "distill": {"temperature": 2.0}})
    work, _ = fresh_run(yaml.safe_dump(TINY_RECIPE, sort_keys=False), "compare", "run")
    (work / "t2.yaml").write_text(yaml.safe_dump(t2, sort_keys=False), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        from typer.testing import CliRunner

        from kdcompress.cli import app

        result = CliRunner().invoke(app, ["run", "t2.yaml"])
        assert result.exit_code == 0, result.output
    return work


@pytest.fixture
def in_runs(two_runs, tmp_path, monkeypatch):
    """A private copy of the two runs, as the current directory."""
    work = tmp_path / "work"
    shutil.copytree(two_runs, work)
    monkeypatch.chdir(work)
    return work


def test_two_runs_give_one_table_and_one_chart_with_both(in_runs, kdc):
    result = kdc("report", "runs/tiny", "runs/t2", "--out", "cmp")
    kdc.assert_clean_exit(result, 0)
    for name in ("tiny", "t2"):
        assert name in result.stdout
    data = json.loads(Path("cmp/report.json").read_text())
    assert data["schema_version"] == 1
    assert [run["name"] for run in data["runs"]] == ["tiny", "t2"]
    t2 = {row["stage"]: row for row in data["runs"][1]["report"]["stages"]}
    assert t2["distilled"]["settings"]["temperature"] == 2.0
    md = Path("cmp/report.md").read_text()
    assert "| tiny | distilled |" in md and "| t2 | distilled |" in md
    html = Path("cmp/report.html").read_text()
    assert html.count("<svg") >= 1 and "tiny" in html and "t2" in html
    # each run's own report was written as well
    for run in ("runs/tiny", "runs/t2"):
        assert Path(run, "report.html").is_file()


@pytest.mark.parametrize("fmt", ["md", "json", "html"])
def test_format_prints_that_file_exactly(in_runs, kdc, fmt):
    result = kdc("report", "runs/tiny", "--format", fmt)
    kdc.assert_clean_exit(result, 0)
    written = Path("runs/tiny", f"report.{fmt}").read_text(encoding="utf-8")
    assert result.stdout == written
    if fmt == "json":
        assert json.loads(result.stdout)["schema_version"] == 1


def test_format_all_prints_the_table_and_writes_every_file(in_runs, kdc):
    for name in ("md", "json", "html"):
        Path("runs/tiny", f"report.{name}").unlink()
    result = kdc("report", "runs/tiny", "--format", "all")
    kdc.assert_clean_exit(result, 0)
    assert "distilled" in result.stdout and "test acc" in result.stdout.lower()
    for name in ("md", "json", "html"):
        assert Path("runs/tiny", f"report.{name}").is_file()


def test_the_terminal_warnings_name_the_real_run_directory(in_runs, kdc):
    recipe = yaml.safe_load(Path("runs/tiny/recipe.yaml").read_text())
    recipe["distill"]["temperature"] = 3.0  # the distilled and pruned checkpoints no longer match it
    Path("runs/tiny/recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = kdc("report", "runs/tiny")
    kdc.assert_clean_exit(result, 0)
    flat = " ".join(result.stdout.split())
    assert "is stale" in flat and "runs/tiny" in flat and "RUN_DIR" not in flat
    # report.json stays free of the path
    assert "RUN_DIR" in Path("runs/tiny/report.json").read_text()


def test_bad_input_is_one_clear_error_and_nothing_written(in_runs, kdc):
    before = sorted(str(p) for p in Path(".").rglob("*"))
    for args, message in (
        (["runs/tiny", "runs/t2"], "add --out DIR"),
        (["runs/tiny", "runs/nope", "--out", "cmp"], "run directory not found: runs/nope"),
        (["runs/tiny", "--format", "pdf"], "--format: must be one of table, md, json, html, all, got 'pdf'"),
        (["runs/tiny", "runs/t2", "--out", "runs/t2"], "is one of the run directories"),
    ):
        result = kdc("report", *args)
        kdc.assert_clean_exit(result, 2)
        assert message in kdc.flat(result), kdc.flat(result)
    assert sorted(str(p) for p in Path(".").rglob("*")) == before


def test_open_uses_a_browser_when_there_is_one(in_runs, kdc, monkeypatch):
    opened = []

    class Fake:
        def open(self, url):
            opened.append(url)
            return True

    monkeypatch.setattr(webbrowser, "get", lambda *a: Fake())
    kdc.assert_clean_exit(kdc("report", "runs/tiny", "--open"), 0)
    assert opened == [(in_runs / "runs/tiny/report.html").resolve().as_uri()]


def test_open_without_a_browser_says_so_and_still_writes_the_report(in_runs, kdc, monkeypatch):
    def none(*a):
        raise webbrowser.Error("could not locate runnable browser")

    monkeypatch.setattr(webbrowser, "get", none)
    Path("runs/tiny/report.html").unlink()
    result = kdc("report", "runs/tiny", "--open")
    kdc.assert_clean_exit(result, 0)
    assert "no web browser found" in kdc.flat(result) and Path("runs/tiny/report.html").is_file()
