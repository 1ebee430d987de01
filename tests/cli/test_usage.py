"""Usage errors and help: every command-line mistake exits 2 with one kdc-style message; help reads plainly."""

from __future__ import annotations

import pytest
import typer

from kdcompress.cli import app

USAGE_ERRORS = {
    "report-on-a-folder-that-is-not-a-run": (["report", "not-a-run"], "no stage checkpoints in not-a-run"),
    "report-on-a-missing-folder": (["report", "nowhere"], "run directory not found: nowhere"),
    "recipes-copy-typo": (["recipes", "copy", "quikstart"], "did you mean 'quickstart'"),
    "recipes-copy-onto-a-file": (["recipes", "copy", "quickstart", "taken.yaml"], "taken.yaml exists"),
    "export-unknown-format": (["export", "runs/tiny", "--format", "tflite"], "--format: must be one of"),
    "report-unknown-format": (["report", "--format", "pdf"], "--format: must be one of"),
    "unknown-option": (["run", "--epochs", "3"], "no such option: --epochs"),
    "unknown-top-level-option": (["--bogus"], "no such option: --bogus"),
    "missing-argument": (["validate"], "missing argument 'RECIPE'"),
    "option-out-of-range": (["run", "--nproc", "0"], "invalid value for '--nproc'"),
}


@pytest.mark.parametrize("argv, fragment", list(USAGE_ERRORS.values()), ids=list(USAGE_ERRORS))
def test_every_usage_error_exits_2_with_one_error_line(argv, fragment, in_tmp, kdc):
    (in_tmp / "not-a-run").mkdir()
    (in_tmp / "taken.yaml").write_text("mine\n")
    result = kdc(*argv)
    kdc.assert_clean_exit(result, 2)
    text = kdc.flat(result)
    assert text.startswith("error: "), text
    assert fragment in text, text
    assert "╭" not in result.output and "Try '" not in result.output  # kdc's style, not typer's boxed panel
    assert (in_tmp / "taken.yaml").read_text() == "mine\n"


def test_an_unknown_export_format_is_an_option_error_not_a_recipe_error(in_tmp, kdc):
    result = kdc("export", "runs/tiny", "--format", "tflite", "--format", "onx")
    kdc.assert_clean_exit(result, 2)
    text = kdc.flat(result)
    assert text.startswith("error: --format: must be one of sparse, shared, int8, onnx, got 'tflite'"), text
    assert "problem in the recipe" not in text and "export.formats" not in text


def test_an_option_that_is_a_recipe_key_points_to_set(in_tmp, kdc):
    result = kdc("run", "--epochs", "3")
    kdc.assert_clean_exit(result, 2)
    text = kdc.flat(result)
    assert "--set teacher.epochs=N" in text, text
    assert "Possible options: --nproc" not in text  # the wrong lead
    assert "usage: kdc run [OPTIONS] [RECIPE]" in text
    distill = kdc.flat(kdc("distill", "--epochs", "3"))
    assert "--set distill.epochs=N" in distill, distill


def _commands(command, path=("kdc",)):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(typer.main.get_command(app)))


@pytest.mark.parametrize("path, command", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_help_shows_plain_flags_one_usage_style_and_whole_sentences(path, command, kdc, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # wide: any line break left in a paragraph is one kdc put there
    result = kdc(*path[1:], "--help")
    kdc.assert_clean_exit(result, 0)
    text = result.output
    for typed in ("<bool>", "<int", "<str>", "<path>", "<list", "<float"):
        assert typed not in text, f"{typed} in the help of {' '.join(path)}:\n{text}"
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert f"Usage: {' '.join(path)} " in usage and "{" not in usage, usage
    for paragraph in (command.help or "").split("\n\n"):
        assert "\n" not in paragraph.strip(), f"a hard line break in {' '.join(path)}'s help: {paragraph!r}"
        tail = paragraph.strip()[-60:]  # at 400 columns, a whole paragraph on one line
        assert any(tail in line for line in text.splitlines()), f"{tail!r} not on one line:\n{text}"
