"""The line under the artifacts table that names what an int8 file kept in fp32 and why (``export.int8_tolerance``),
shared by the terminal, Markdown and HTML renderings."""

from __future__ import annotations

from pathlib import Path

from ..run.export_int8 import kept_text

__all__ = ["int8_notes"]


def int8_notes(report: dict) -> list[str]:
    """One sentence per int8 artifact whose export searched for nodes to keep in fp32: ``"pruned-int8.onnx: 2 nodes
    kept in fp32 (features.0 Conv: -1.20 points when quantised, ...), tolerance 0.5 points: int8 ... vs fp32 ...
    on val (3,000 images)."``; none for the others."""
    notes = []
    for row in report.get("artifacts") or []:
        search = row.get("int8_search")
        if isinstance(search, dict) and not row.get("refused"):
            notes.append(f"{Path(str(row.get('path'))).name}: {kept_text(search)}.")
    return notes
