"""The package keeps its shape (issue 19): imports point down, no private name crosses a module, no long functions.

Each check is the script or tool .ci/run runs, called here so that `python -m pytest` holds it too; each
test also shows that its check can fail, on a small planted tree.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_private_name_is_used_across_modules_in_the_package_tests_or_scripts(capsys):
    assert _script("private_names").main([]) == 0, capsys.readouterr().out


def test_the_private_name_scan_finds_an_import_an_attribute_and_a_monkeypatch(tmp_path):
    scan = _script("private_names")
    planted = tmp_path / "test_planted.py"
    planted.write_text(
        "from kdcompress.train import _rng_state\n"
        "import kdcompress.models as models\n"
        "models._IMPORT_DIRS\n"
        "def test(monkeypatch):\n"
        "    monkeypatch.setattr(models, '_ADDED', set())\n"
    )
    found = scan.scan(planted, module="tests.test_planted")
    assert len(found) == 3, found


def test_no_product_function_is_over_60_lines_of_code(capsys):
    assert _script("long_functions").main([]) == 0, capsys.readouterr().out


def test_the_length_count_skips_docstrings_comments_and_blank_lines(tmp_path):
    source = tmp_path / "m.py"
    source.write_text('def f():\n    """Doc.\n\n    More."""\n    # a comment\n\n    x = 1\n    return x\n')
    assert _script("long_functions").functions(source) == [(3, "f", 1)]


@pytest.mark.skipif(
    shutil.which("lint-imports") is None and not (Path(sys.executable).parent / "lint-imports").exists(),
    reason="import-linter is not installed (pip install -e '.[test]')",
)
def test_the_layers_contract_holds():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    result = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout
