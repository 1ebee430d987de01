"""Latency of a run's models for its report, timed once per file and cached in ``<run dir>/cache/latency.json``.

Every stage checkpoint and artifact is timed in the same interleaved rounds in a separate process
(:mod:`kdcompress.timing`); :class:`LatencyCache` keeps each figure keyed by the file's SHA-256 and the timing
settings, so a later report reuses it and report.json stays a pure function of the run directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

from ..errors import KdcError
from ..files import atomic_write_text
from ..measure import LATENCY_ROUNDS, cpu_name, paired_ratio
from ..recipe import ReportSection
from ..run.layout import CACHE_DIR, LATENCY_FILE
from ..stats import finite
from ..timing import ModelFile, time_in_child

__all__ = [
    "LATENCY_CACHE",
    "LATENCY_CACHE_VERSION",
    "LATENCY_MIN_RUN_TIME",
    "LATENCY_THREADS",
    "MAX_ROUNDS",
    "LatencyCache",
    "available_cores",
    "latency_ratios",
    "latency_settings",
    "now",
    "set_latency",
]


# Latency runs on a fixed thread count (report.threads; fewer if the machine has fewer cores): "all cores"
# on a shared machine is not a fixed setting.
LATENCY_THREADS = ReportSection().threads
LATENCY_MIN_RUN_TIME = 0.5  # seconds of timed runs per model and batch size, spread over LATENCY_ROUNDS rounds


# latency measured once per checkpoint (or artifact) file, relative to the run directory: reused by later reports
LATENCY_CACHE = Path(CACHE_DIR) / LATENCY_FILE
# 2: timed in interleaved rounds in a child process (kdcompress.timing); version 1's figures were timed one model
# after the other in the report's own process, so they are timed again; 3: the child's allocator thresholds are
# fixed (kdcompress.timing.MALLOC_SETTINGS), so a figure no longer depends on the models timed beside it; 4: the
# built-in CNNs pool through kdcompress.models.MaxPool2x2 at inference, about twice as fast as version 3 timed them
LATENCY_CACHE_VERSION = 4
MAX_ROUNDS = 10_000  # a cached figure with more rounds than this is not one kdc wrote: timed afresh


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def latency_settings(section: dict) -> tuple[bool, list[int], int]:
    """(measure latency?, batch sizes, threads asked) from a recipe's ``report`` section as a plain dict.

    A dict, not a ReportSection, because a checkpoint's recipe may come from an older kdc: the
    deprecated ``latency_batch`` (one size) stands for ``latency_batches: [size]``.
    """
    default = ReportSection()
    single = section.get("latency_batch")
    batches = [single] if single is not None else section.get("latency_batches") or default.latency_batches
    threads = int(section.get("threads") or default.threads)
    return bool(section.get("latency", default.latency)), [int(b) for b in batches], threads


def now() -> str:
    """The current time, ISO-8601 in UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class LatencyCache:
    """Latency per model file, kept in ``<run dir>/cache/latency.json`` so a later report reuses it.

    An entry is keyed by the file's SHA-256 (a stage checkpoint's, or an artifact's, from its manifest), the
    batch size, the thread count, the timing budget (seconds and rounds), the runtime's version (torch, or
    onnxruntime for an onnx/int8 artifact) and the machine (platform, processor, core count): a changed file or
    setting is measured again, an unchanged one never, so report.json stays a pure function of the run
    directory. A missing or damaged cache file is started afresh; one that cannot be written is skipped (the
    numbers are in the report all the same).

    :meth:`time` times every missing figure in one child process (:func:`kdcompress.timing.time_in_child`): at
    each batch size, all the models missing there in the same interleaved rounds. A figure found in the cache is
    not timed again, so after one stage is rerun its figure comes from new rounds and the others' from the
    rounds that timed them before: a ratio between the two compares different rounds. Each figure's
    ``round_set`` names its rounds (the same value: timed side by side); deleting the cache times all together.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LATENCY_CACHE
        self.entries: dict[str, dict] = {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("version") == LATENCY_CACHE_VERSION and isinstance(data.get("entries"), dict):
                self.entries = {k: v for k, v in data["entries"].items() if _cache_entry_ok(v)}
        except (OSError, ValueError, AttributeError):
            pass
        self.changed = False
        self.used_shas: set[str] = set()
        self.used_times: list[str] = []
        self.used_policies: set[str | None] = set()
        self.machine = {"platform": platform.platform(), "cpu": cpu_name(), "cpu_count": os.cpu_count()}

    def _fields(self, sha256: str, batch: int, threads: int, runtime: str) -> dict:
        return {
            "sha256": sha256,
            "batch": int(batch),
            "threads": int(threads),
            "runtime": runtime,
            "min_run_time": LATENCY_MIN_RUN_TIME,
            "rounds": LATENCY_ROUNDS,
            **self.machine,
        }

    @staticmethod
    def _key(fields: dict) -> str:
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]

    def time(self, files: dict[str, tuple[ModelFile, str]], batches: list[int], threads: int) -> dict[str, dict]:
        """Each of ``files`` (key -> (file, runtime version)) at each batch size: key -> {"1": timing, ...}.

        Figures found in the cache are taken from it; the others are timed in one child process, those of one
        batch size in the same rounds.
        """
        sets = []
        for batch in batches:
            missing = [
                key
                for key, (file, runtime) in files.items()
                if self._key(self._fields(file.sha256, batch, threads, runtime)) not in self.entries
            ]
            if missing:
                sets.append((int(batch), missing))
        if sets:
            timed, policy = time_in_child(
                {key: files[key][0] for _, keys in sets for key in keys},
                sets,
                threads,
                rounds=LATENCY_ROUNDS,
                min_run_time=LATENCY_MIN_RUN_TIME,
            )
            measured_at = now()
            for (batch, keys), timing in zip(sets, timed):
                # one name per set of rounds: the figures that share it were timed side by side
                members = sorted(f"{files[key][0].sha256} {files[key][1]}" for key in keys)
                round_set = hashlib.sha256(json.dumps([measured_at, batch, members]).encode()).hexdigest()[:12]
                for key in keys:
                    fields = self._fields(files[key][0].sha256, batch, threads, files[key][1])
                    self.entries[self._key(fields)] = {
                        **fields,
                        "measured_at": measured_at,
                        "omp_wait_policy": policy,
                        "timing": {**timing[key], "round_set": round_set},
                    }
            self.changed = True
        found: dict[str, dict] = {}
        for key, (file, runtime) in files.items():
            self.used_shas.add(file.sha256)
            found[key] = {}
            for batch in batches:
                entry = self.entries[self._key(self._fields(file.sha256, batch, threads, runtime))]
                found[key][str(int(batch))] = entry["timing"]
                self.used_times.append(entry["measured_at"])
                self.used_policies.add(entry.get("omp_wait_policy"))
        return found

    def measured_at(self) -> str | None:
        """When the newest of the latencies used was measured (ISO-8601 UTC), None if none was."""
        return max(self.used_times) if self.used_times else None

    def wait_policy(self) -> str | None:
        """The OpenMP wait policy the latencies used were timed under (several joined by ", "), None if none."""
        policies = sorted(str(p) for p in self.used_policies)
        return ", ".join(policies) if policies else None

    def save(self) -> None:
        """Write the cache when something was measured, dropping entries of files no longer in the run."""
        kept = {k: v for k, v in self.entries.items() if v.get("sha256") in self.used_shas}
        if not self.changed and len(kept) == len(self.entries):
            return
        text = json.dumps({"version": LATENCY_CACHE_VERSION, "entries": kept}, indent=1, sort_keys=True) + "\n"
        try:
            atomic_write_text(self.path, text)
        except (KdcError, OSError):  # a read-only run directory: the report is made all the same
            pass


def _cache_entry_ok(entry) -> bool:
    """A latency cache entry of the shape kdc writes (the file is data: anything else is timed afresh)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("measured_at"), str):
        return False
    timing = entry.get("timing")
    if not isinstance(timing, dict) or not isinstance(timing.get("rounds_ms"), list):
        return False
    return (
        isinstance(entry.get("omp_wait_policy"), (str, type(None)))
        and isinstance(timing.get("round_set"), str)
        and all(
            finite(timing.get(key)) is not None and timing[key] >= 0
            for key in ("median_ms", "iqr_ms", "p25_ms", "p75_ms")
        )
        and 0 < len(timing["rounds_ms"]) <= MAX_ROUNDS
        and all(finite(t) is not None and t >= 0 for t in timing["rounds_ms"])
    )


def latency_ratios(first: dict, second: dict) -> dict[str, float | None] | None:
    """How many times faster ``second`` is than ``first`` at each batch size: the median of the per-round ratios of
    the rounds that timed both (:func:`kdcompress.measure.paired_ratio`); None at a batch size whose two figures
    come from different rounds. None when latency was not measured."""
    a, b = first.get("latency") or {}, second.get("latency") or {}
    if not a or not b:
        return None
    ratios = {}
    for batch in (batch for batch in a if batch in b):
        same = a[batch].get("round_set") == b[batch].get("round_set")
        try:
            ratios[batch] = paired_ratio(a[batch]["rounds_ms"], b[batch]["rounds_ms"]) if same else None
        except ValueError:  # a cached figure whose rounds took no time (planted): nothing to compare
            ratios[batch] = None
    return ratios


def set_latency(row: dict, timing: dict | None) -> None:
    """A stage's or artifact's ``latency`` ({"1": timing, ...}) and ``latency_ms`` (the medians)."""
    if timing:
        row["latency"] = timing
        row["latency_ms"] = {b: t["median_ms"] for b, t in timing.items()}
