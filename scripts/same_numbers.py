"""Do two report.json files hold the same training numbers? Everything but times and latencies must be equal.

For "training numbers unchanged" checks: run the quickstart (``kdc run``) before and after a change, then::

    python scripts/same_numbers.py before/runs/quickstart/report.json after/runs/quickstart/report.json

Keys left out, at any depth: ``generated_at``, ``latency_measured_at``, any key with ``seconds`` or
``latency`` in its name, and any ending in ``_ms`` (latency statistics). Every other value (accuracies,
losses, curves, confusion-derived per-class figures, parameter counts, bytes) must be equal exactly.
Prints each difference by its path; exit code 0 when there is none, 1 otherwise.
"""

from __future__ import annotations

import json
import sys


def timeless(value):
    """``value`` without the keys that hold times (see the module docstring)."""
    if isinstance(value, dict):
        return {
            k: timeless(v)
            for k, v in value.items()
            if not (
                k in ("generated_at", "latency_measured_at") or "seconds" in k or "latency" in k or k.endswith("_ms")
            )
        }
    if isinstance(value, list):
        return [timeless(v) for v in value]
    return value


def differences(a, b, path: str = "") -> list[str]:
    """Where ``a`` and ``b`` differ, one line each."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in list(a) + [k for k in b if k not in a]:
            if key not in a or key not in b:
                out.append(f"{path}.{key}: only in {'the second' if key not in a else 'the first'}")
            else:
                out += differences(a[key], b[key], f"{path}.{key}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [line for i, (x, y) in enumerate(zip(a, b)) for line in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path or '.'}: {json.dumps(a)[:100]} != {json.dumps(b)[:100]}"]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    a, b = (timeless(json.loads(open(path, encoding="utf-8").read())) for path in argv)
    found = differences(a, b)
    for line in found:
        print(line)
    print(
        f"{len(found)} difference(s) outside times and latencies"
        if found
        else "same numbers (times and latencies aside)"
    )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
