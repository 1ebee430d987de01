"""The comparison report of a run directory, and of several runs side by side.

:mod:`.collect` builds the report dict from the run directory; :mod:`.latency` times its models;
:mod:`.warnings` says what should not be trusted; :mod:`.text` formats its numbers; :mod:`.terminal`,
:mod:`.markdown` and :mod:`.html` (with :mod:`.charts`) render it; :mod:`.compare` puts several runs side by
side. The names re-exported here are the package's public API (``from kdcompress.report import build_report``).
"""

from .collect import (
    LATENCY_CACHE,
    LATENCY_THREADS,
    NOISE_Z,
    SCHEMA_VERSION,
    accuracy_se,
    build_report,
    compare_accuracy,
    report_markdown,
    report_table,
    report_warnings,
    write_report,
)

__all__ = [
    "build_report",
    "write_report",
    "report_table",
    "report_markdown",
    "report_warnings",
    "accuracy_se",
    "compare_accuracy",
    "NOISE_Z",
    "LATENCY_THREADS",
    "SCHEMA_VERSION",
    "LATENCY_CACHE",
]
