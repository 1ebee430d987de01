"""Run the layers contract of pyproject.toml on an older commit, whose modules were still flat.

The contract names today's packages (``report``, ``run``, ``recipe``...); before issue 19 their code lived in
flat modules. This maps each layer to the flat modules that held its code at ``COMMIT`` (``report`` ->
report, html, compare; ``run`` -> pipeline, stages, seeds, sweep, checks, runlock, trust; foundation ->
errors, bounds...), keeps only the modules that exist there, and runs ``lint-imports`` on a copy of that
commit's package (``git archive``), so the same rule is checked on the old tree. Example::

    python scripts/layer_contract_history.py 1786cbb      # fails: names the hidden cycles
    python scripts/layer_contract_history.py HEAD         # today's tree, through the same mapping
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
FLAT = {  # today's package -> the flat modules that held its code before issue 19
    "report": ["report", "html", "compare"],
    "run": ["run", "pipeline", "stages", "seeds", "sweep", "checks", "runlock", "trust"],
}


def modules_at(commit: str) -> set[str]:
    names = subprocess.run(
        ["git", "ls-tree", "--name-only", commit, "kdcompress/"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    return {Path(n).stem if n.endswith(".py") else Path(n).name for n in names}


def mapped_layers(layers: list[str], present: set[str]) -> list[str]:
    out = []
    for layer in layers:
        names = [n.strip() for n in layer.split(":")]
        flat = [m for n in names for m in FLAT.get(n, [n]) if m in present]
        if flat:
            out.append(" : ".join(dict.fromkeys(flat)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commit")
    args = parser.parse_args()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    present = modules_at(args.commit)
    layers = next(c for c in config["contracts"] if c["type"] == "layers")["layers"]
    lines = [
        "[importlinter]",
        "root_package = kdcompress",
        "",
        "[importlinter:contract:layers]",
        "name = Imports point down (today's layers mapped to the flat modules)",
        "type = layers",
        "containers = kdcompress",
        "layers =",
    ]
    lines += [f"    {layer}" for layer in mapped_layers(layers, present)]
    lines += [
        "",
        "[importlinter:contract:acyclic]",
        "name = No import cycles between sibling modules",
        "type = acyclic_siblings",
        "ancestors = kdcompress",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(
            ["git", "archive", args.commit, "kdcompress"], cwd=ROOT, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        ini = Path(tmp) / ".importlinter"
        ini.write_text("\n".join(lines))
        print(ini.read_text())
        env = dict(os.environ, PYTHONPATH=tmp)
        lint = Path(sys.executable).with_name("lint-imports")
        return subprocess.run([str(lint), "--config", str(ini), "--no-cache"], cwd=tmp, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
