"""List product functions longer than a limit, counted in lines of code (issue 19: none over 60).

A function's lines of code are the lines from its ``def`` to its last line that hold code: blank lines,
comment-only lines and the docstring are not counted; a nested function counts in its own right and in
its parent. Reads the source with :mod:`ast`, imports nothing. Example::

    python scripts/long_functions.py            # kdcompress/, limit 60; exit 1 when any is over
    python scripts/long_functions.py --limit 40 --all
"""

from __future__ import annotations

import argparse
import ast
import io
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def code_lines(source: str) -> set[int]:
    """Line numbers that hold a token other than a comment, newline or indentation."""
    lines: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return lines


def docstring_lines(node: ast.AST) -> set[int]:
    body = getattr(node, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        if isinstance(body[0].value.value, str):
            return set(range(body[0].lineno, body[0].end_lineno + 1))
    return set()


def functions(path: Path) -> list[tuple[int, str, int]]:
    """(lines of code, qualified name, first line) of every function in ``path``."""
    source = path.read_text()
    tree = ast.parse(source)
    code = code_lines(source)
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                span = set(range(start, child.end_lineno + 1)) & code
                found.append((len(span - docstring_lines(child)), name, child.lineno))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, default=[ROOT / "kdcompress"])
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--all", action="store_true", help="list every function over the limit's half too")
    args = parser.parse_args(argv)
    rows = []
    for base in args.paths:
        for path in sorted(base.rglob("*.py")) if base.is_dir() else [base]:
            for loc, name, line in functions(path):
                rows.append((loc, f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}", name))
    rows.sort(reverse=True)
    shown = [r for r in rows if r[0] > (args.limit // 2 if args.all else args.limit)]
    for loc, where, name in shown:
        print(f"{loc:4d}  {where}  {name}")
    over = sum(1 for r in rows if r[0] > args.limit)
    print(f"{over} of {len(rows)} functions over {args.limit} lines of code; longest {rows[0][0] if rows else 0}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
