"""Writing a run's report files: report.json, report.md and report.html, as a set, under the run's lock."""

from __future__ import annotations

import json
from pathlib import Path

from ..files import atomic_write_files
from ..recipe import Recipe
from ..run.layout import report_path
from ..run.lock import run_dir_lock
from .collect import build_report
from .markdown import report_markdown

__all__ = ["write_report", "REPORT_WAIT_ADVICE"]


# Why the report refuses a live run rather than waiting: the writer is nearly always a training run that
# holds the lock for minutes or hours, so a short wait would end in the same refusal, and the report
# writes into the run directory itself (the report files, the latency cache).
REPORT_WAIT_ADVICE = "wait for it to finish, then make the report"


def write_report(
    run_dir: str | Path, latency: bool | None = None, threads: int | None = None, recipe: Recipe | None = None
) -> dict:
    """Build the report and write ``report.json``, ``report.md`` and ``report.html`` into ``run_dir``.

    ``recipe``: the recipe you gave for the run, whose models are built (see :func:`build_report`).
    The three files are replaced as a set: all of them, or none (a full disk keeps the previous three).
    The run directory's lock (:func:`kdcompress.run.lock.run_dir_lock`) is held throughout, so the
    report reads no file another kdc is writing; while one writes there it is refused at once.
    """
    from .html import render_html  # matplotlib is imported only when a report is written

    run_dir = Path(run_dir)
    with run_dir_lock(run_dir, advice=REPORT_WAIT_ADVICE, create=False):
        report = build_report(run_dir, latency=latency, threads=threads, recipe=recipe)
        atomic_write_files(
            {
                report_path(run_dir, "json"): json.dumps(report, indent=2) + "\n",
                report_path(run_dir, "md"): report_markdown(report),
                report_path(run_dir, "html"): render_html(report),
            }
        )
    return report
