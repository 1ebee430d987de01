"""The comparison report of a run directory, and of several runs side by side.

:mod:`.collect` builds the report dict from the run directory (timing its models in :mod:`.latency`, saying
what should not be trusted in :mod:`.warnings`); :mod:`.text` formats its numbers; :mod:`.terminal`,
:mod:`.markdown` and :mod:`.html` (with :mod:`.charts`) render it; :mod:`.write` writes its three files;
:mod:`.compare` puts several runs side by side; :mod:`.frontier` marks a sweep's non-dominated models. The HTML modules, which import matplotlib, are not imported here.
"""

from ..stats import NOISE_Z, accuracy_se, compare_accuracy
from .collect import SCHEMA_VERSION, build_report
from .latency import LATENCY_CACHE, LATENCY_THREADS
from .markdown import report_markdown
from .terminal import report_table
from .warnings import report_warnings
from .write import write_report

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
