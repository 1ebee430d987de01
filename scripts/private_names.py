"""Find private names used across module boundaries (issue 19: there must be none).

A private name starts with one underscore (``_fit``; dunders such as ``__version__`` are public). Flagged,
in every .py file under the given folders (default: kdcompress/, tests/, scripts/):

* ``from kdcompress.x import _name`` and ``from .x import _name``: a private name of another module;
* ``module._name`` where ``module`` was bound by importing a kdcompress module (``import kdcompress.x as x``,
  ``from kdcompress import x``, ``from . import x``), and ``setattr(module, "_name", ...)`` /
  ``monkeypatch.setattr(module, "_name", ...)``, and string targets such as ``"kdcompress.x._name"``.

A private MODULE (``_helpers``) may be imported by modules of the package that holds it (its
subpackages included), not from outside it. Reads the source with :mod:`ast`; imports nothing.
Example::

    python scripts/private_names.py          # prints each use and the count; exit 1 when any
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STRING_TARGET = re.compile(r"^kdcompress(\.[A-Za-z0-9_]+)*\.(_[A-Za-z0-9][A-Za-z0-9_]*)$")


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def module_of(path: Path) -> tuple[str, bool]:
    """(dotted module name, is a package __init__) for a file under ROOT."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_init = parts[-1] == "__init__"
    if is_init:
        parts = parts[:-1]
    return ".".join(parts), is_init


def absolute(node: ast.ImportFrom, module: str, is_init: bool) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_init else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def may_use_private_module(importer: str, target: str) -> bool:
    """A module inside the package that holds the private module ``target``."""
    parts = target.split(".")
    for i, part in enumerate(parts):
        if private(part):
            package = ".".join(parts[:i])
            return importer == package or importer.startswith(package + ".")
    return True


def scan(path: Path, module: str | None = None) -> list[str]:
    """Each private name ``path`` uses across modules; ``module``: its dotted name (default: from its place)."""
    module, is_init = (module, path.name == "__init__.py") if module else module_of(path)
    tree = ast.parse(path.read_text())
    found: list[str] = []
    modules: set[str] = set()  # local names bound to kdcompress modules

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("kdcompress"):
                    modules.add(alias.asname or alias.name.split(".")[0])
                    if not may_use_private_module(module, alias.name):
                        found.append(f"{path}:{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            source = absolute(node, module, is_init)
            if not source.startswith("kdcompress"):
                continue
            for alias in node.names:
                target = f"{source}.{alias.name}"
                if private(alias.name) and not may_use_private_module(module, target):
                    found.append(f"{path}:{node.lineno}: from {source} import {alias.name}")
                elif not may_use_private_module(module, source):
                    found.append(f"{path}:{node.lineno}: from {source} import {alias.name}")
                else:
                    modules.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            if isinstance(node.value, ast.Name) and node.value.id in modules:
                found.append(f"{path}:{node.lineno}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.Call) and len(node.args) >= 2:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first, second = node.args[0], node.args[1]
            if name in ("setattr", "delattr") and isinstance(first, ast.Name) and first.id in modules:
                if isinstance(second, ast.Constant) and isinstance(second.value, str) and private(second.value):
                    found.append(f'{path}:{node.lineno}: {name}({first.id}, "{second.value}")')
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and STRING_TARGET.match(node.value):
            found.append(f'{path}:{node.lineno}: "{node.value}"')
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "folders", nargs="*", type=Path, default=[ROOT / "kdcompress", ROOT / "tests", ROOT / "scripts"]
    )
    args = parser.parse_args(argv)
    found = [hit for folder in args.folders for path in sorted(folder.resolve().rglob("*.py")) for hit in scan(path)]
    for hit in found:
        print(hit)
    print(f"{len(found)} private names used across modules")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
