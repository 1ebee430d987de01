"""Bounds on data read from files: how big a graph of shared values would be once written out.

YAML aliases and pickle's memo both let a few hundred bytes name the same value many times over:
written out (``yaml.safe_dump``, ``json.dumps``, ``==``, ``copy.deepcopy``), a 400-byte document can
become billions of values. :func:`first_oversized` measures such a graph in time proportional to its
distinct values, before anything expands it. Example::

    >>> level = ["x"] * 10
    >>> for _ in range(8):
    ...     level = [level] * 10  # 10**9 strings once written out, 90 lists in memory
    >>> first_oversized(level, value_children, value_size, limit=1000)[0]  # the first part past the limit
    (0, 0, 0, 0, 0, 0)
"""

from __future__ import annotations

from typing import Any

__all__ = ["first_oversized", "value_children", "value_size"]


def first_oversized(root: Any, children, size, limit: int) -> tuple[tuple, Any, Any, bool] | None:
    """Where a graph of values is too big once every shared value is counted each time it is reached.

    ``children(value)`` lists ``(key, child)`` pairs and ``size(value)`` a value's own size. Each distinct
    value (by identity) is visited once, so a document of N values costs O(N) however far its shared parts
    would expand. Returns None when the expansion stays within ``limit``; else ``(path, value, container,
    cyclic)``: the first value found whose expansion passes the limit (``cyclic`` False), or a value reached
    again from inside itself (``cyclic`` True; ``container`` holds the reference back).
    """
    sizes: dict[int, int] = {}
    open_: set[int] = set()  # the values whose children are being measured: the current value's ancestors
    stack: list[tuple[Any, tuple, bool]] = [(root, (), False)]
    while stack:
        value, path, done = stack.pop()
        if done:
            open_.discard(id(value))
            total = size(value) + sum(sizes[id(child)] for _, child in children(value))
            if total > limit:
                return path, value, value, False
            sizes[id(value)] = total
            continue
        if id(value) in sizes:  # reached again through another alias: measured already
            continue
        open_.add(id(value))
        stack.append((value, path, True))
        for key, child in reversed(children(value)):  # reversed: popped in document order, anchors first
            if id(child) in open_:
                return path + (key,), child, value, True
            if id(child) not in sizes:
                stack.append((child, path + (key,), False))
    return None


def value_children(value: Any) -> list[tuple[Any, Any]]:
    """``(key, child)`` pairs of a plain value (dict keys and values, list and tuple items); none for a leaf."""
    if isinstance(value, dict):
        return [(str(k), child) for k, v in value.items() for child in (k, v)]
    if isinstance(value, (list, tuple)):
        return list(enumerate(value))
    return []


def value_size(value: Any) -> int:
    """A plain value's own size: 1, plus its length for text and bytes."""
    return 1 + len(value) if isinstance(value, (str, bytes)) else 1
