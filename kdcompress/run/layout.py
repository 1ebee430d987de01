"""Where things live inside a run directory: every file and folder name kdc writes there, and the paths
built from them, spelt once (the run marker ``kdc-run.json``, the lock ``.kdc.lock``, the resolved
``recipe.yaml``, each stage's ``<stage>/model.pt`` with its ``metrics.jsonl``, ``state.pt`` and
``metrics.partial.jsonl``, the teacher-logit ``cache/``, ``tensorboard/``, ``export/``, ``seeds/``,
``sweep/`` with its ``frontier.*`` files, ``sensitivity.json`` and the ``report.*`` files)."""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "MODEL_FILE",
    "RECIPE_FILE",
    "RUN_MARKER",
    "STATE_FILE",
    "METRICS_FILE",
    "RUNNING_LOG",
    "CACHE_DIR",
    "TEACHER_LOGITS_GLOB",
    "LATENCY_FILE",
    "LOCK_FILE",
    "TENSORBOARD_DIR",
    "EXPORT_DIR",
    "ARTIFACTS_FILE",
    "SEEDS_DIR",
    "SEED_GLOB",
    "SWEEP_DIR",
    "SWEEP_TABLE",
    "SWEEP_DATA",
    "FRONTIER_DATA",
    "FRONTIER_PAGE",
    "REPORT_KINDS",
    "SENSITIVITY_FILE",
    "stage_dir",
    "checkpoint_path",
    "state_path",
    "metrics_path",
    "running_log_path",
    "recipe_path",
    "marker_path",
    "lock_path",
    "is_run_dir",
    "cache_dir",
    "teacher_logits_path",
    "teacher_views_path",
    "latency_cache_path",
    "tensorboard_dir",
    "export_dir",
    "artifacts_path",
    "seed_dir",
    "related_run_dirs",
    "sweep_dir",
    "report_path",
    "sensitivity_path",
]

MODEL_FILE = "model.pt"  # a finished stage's checkpoint (its manifest beside it: checkpoint.manifest_path)
RECIPE_FILE = "recipe.yaml"  # the resolved recipe the run was last made with, every value included
RUN_MARKER = "kdc-run.json"  # says the folder is kdc's, and in which run format
STATE_FILE = "state.pt"  # an unfinished stage's resume state
METRICS_FILE = "metrics.jsonl"  # a finished stage's epochs, written with its checkpoint
# An unfinished stage's epochs, one JSON line each, beside its resume state. metrics.jsonl is written
# only with the stage's checkpoint, so it always describes that checkpoint, even after a failed rerun.
RUNNING_LOG = "metrics.partial.jsonl"
CACHE_DIR = "cache"  # the teacher's logits on the training split, reused across stages and runs
TEACHER_LOGITS_GLOB = "teacher-logits-*.pt"
LATENCY_FILE = "latency.json"  # inside CACHE_DIR: the report's timed latencies, reused by later reports
LOCK_FILE = ".kdc.lock"  # one writer per run directory (kdcompress.run.lock)
TENSORBOARD_DIR = "tensorboard"
EXPORT_DIR = "export"
ARTIFACTS_FILE = "artifacts.json"  # inside EXPORT_DIR: one row per artifact
SEEDS_DIR = "seeds"  # seed s's run directory: <run dir>/seeds/seed-<s>
SEED_GLOB = "seed-*"
SWEEP_DIR = "sweep"  # a sweep's points, each a run directory, and its ranked table
SWEEP_TABLE = "sweep.md"
SWEEP_DATA = "sweep.json"
FRONTIER_DATA = "frontier.json"  # inside SWEEP_DIR: kdc frontier's points, each marked on the frontier or not
FRONTIER_PAGE = "frontier.html"  # inside SWEEP_DIR: its charts (accuracy against latency and bytes) and table
REPORT_KINDS = ("md", "json", "html")  # report.md, report.json and report.html
SENSITIVITY_FILE = "sensitivity.json"  # kdc sensitivity: each prunable group's accuracy drop at a grid of ratios


def stage_dir(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / stage


def checkpoint_path(run_dir: str | Path, stage: str) -> Path:
    return stage_dir(run_dir, stage) / MODEL_FILE


def state_path(run_dir: str | Path, stage: str) -> Path:
    return stage_dir(run_dir, stage) / STATE_FILE


def metrics_path(run_dir: str | Path, stage: str) -> Path:
    return stage_dir(run_dir, stage) / METRICS_FILE


def running_log_path(run_dir: str | Path, stage: str) -> Path:
    return stage_dir(run_dir, stage) / RUNNING_LOG


def recipe_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / RECIPE_FILE


def marker_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / RUN_MARKER


def lock_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / LOCK_FILE


def is_run_dir(folder: str | Path) -> bool:
    """Whether ``folder`` is a kdc run directory with a resolved recipe to go on from."""
    return Path(folder).is_dir() and recipe_path(folder).is_file() and marker_path(folder).is_file()


def cache_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CACHE_DIR


def teacher_logits_path(run_dir: str | Path, key: str) -> Path:
    return cache_dir(run_dir) / f"teacher-logits-{key}.pt"


def teacher_views_path(run_dir: str | Path, key: str, partial: bool = False) -> Path:
    """The teacher-view table (distill.teacher_cache); ``partial``: the views done so far of one being built."""
    return cache_dir(run_dir) / f"teacher-views-{key}{'.partial' if partial else ''}.pt"


def latency_cache_path(run_dir: str | Path) -> Path:
    return cache_dir(run_dir) / LATENCY_FILE


def tensorboard_dir(run_dir: str | Path, stage: str | None = None) -> Path:
    folder = Path(run_dir) / TENSORBOARD_DIR
    return folder / stage if stage else folder


def export_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / EXPORT_DIR


def artifacts_path(run_dir: str | Path) -> Path:
    return export_dir(run_dir) / ARTIFACTS_FILE


def seed_dir(run_dir: str | Path, seed: int) -> Path:
    return Path(run_dir) / SEEDS_DIR / f"seed-{seed}"


def related_run_dirs(run_dir: str | Path) -> list[Path]:
    """The run directories made by the same ``kdc run --seeds`` or ``kdc sweep`` as ``run_dir``, which may hold
    caches it can share: for a further seed, the first seed's; for a sweep point (or one of its seeds), the
    sweep's other points and their seeds. Empty for a run directory of its own."""
    run_dir = Path(run_dir).resolve()
    found: list[Path] = []
    point = run_dir
    if run_dir.parent.name == SEEDS_DIR and run_dir.name.startswith("seed-") and is_run_dir(run_dir.parent.parent):
        point = run_dir.parent.parent
        found.append(point)
    if point.parent.name == SWEEP_DIR:  # the other points are checked to be run directories below
        for other in sorted(q for q in point.parent.iterdir() if q.is_dir()):
            found += [other, *sorted(q for q in (other / SEEDS_DIR).glob(SEED_GLOB) if q.is_dir())]
    return [d for d in dict.fromkeys(found) if d != run_dir and is_run_dir(d)]


def sweep_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / SWEEP_DIR


def report_path(folder: str | Path, kind: str) -> Path:
    """``<folder>/report.<kind>``, kind one of :data:`REPORT_KINDS`."""
    return Path(folder) / f"report.{kind}"


def sensitivity_path(run_dir: str | Path) -> Path:
    """``<run dir>/sensitivity.json``, written by ``kdc sensitivity`` (:mod:`kdcompress.run.sensitivity`)."""
    return Path(run_dir) / SENSITIVITY_FILE
