"""The comparison report: a pure function of a run directory.

For every stage checkpoint found in ``<run dir>`` (teacher, student,
distilled, pruned) it measures the saved model and writes ``report.json``
and ``report.md`` next to them. Example::

    >>> from kdcompress.report import build_report
    >>> report = build_report("runs/quickstart")  # doctest: +SKIP
    >>> [row["stage"] for row in report["stages"]]  # doctest: +SKIP
    ['teacher', 'student', 'distilled', 'pruned']

Besides the measurements, a report carries what a ship decision needs: each
stage's settings, the noise in its test accuracy (binomial standard error),
distilled against the student trained alone with the standard error of the
difference, latency as a median with its spread at each batch size, dense
MACs beside the MACs of the non-zero weights alone, and ``warnings`` for results
that should not be trusted as they stand, a stage whose checkpoint is stale
against the run's ``recipe.yaml`` among them. It also carries what the HTML
report draws: each stage's training curve, per-class accuracy with its
confusion matrix (recorded at training time), the weights or channels kept per
layer, the confusions that changed most, the resolved recipe and the
environment. Latency is timed once per file, every stage and artifact in the
same interleaved rounds in a separate process (:mod:`kdcompress.timing`), and
cached in ``cache/latency.json``, so report.json depends on the run directory alone
(``generated_at`` aside); its keys are listed in the README ("report.json
fields").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Group
from rich.table import Table
from rich.text import Text

from ..checkpoint import atomic_write_files, atomic_write_text, load_checkpoint, read_manifest
from ..errors import ArtifactError, KdcError
from ..measure import LATENCY_ROUNDS, count_macs, count_nonzero, count_params, count_sparse_macs, paired_ratio
from ..models import build_from_checkpoint, build_model, names_user_code
from ..prune import prunable_weights, weight_sparsity
from ..recipe import Recipe, ReportSection, read_yaml, recipe_from_dict, recipe_to_dict
from ..runlock import run_dir_lock
from ..stages import STAGES, stage_named
from ..timing import ModelFile, time_in_child
from ..train import has_batchnorm
from ..trust import MODEL_KEYS, outside_files, refuse_untrusted_code

__all__ = [
    "build_report",
    "write_report",
    "report_table",
    "report_markdown",
    "accuracy_se",
    "compare_accuracy",
    "NOISE_Z",
    "LATENCY_THREADS",
    "SCHEMA_VERSION",
    "LATENCY_CACHE",
]

STAGE_ORDER = tuple(stage.name for stage in STAGES)  # declared once, in stages.STAGES
DESCRIPTIONS = {stage.name: stage.description for stage in STAGES}
# A difference within NOISE_Z standard errors (about 95 % for a normal estimate) is called within noise.
NOISE_Z = 2.0
# Latency runs on a fixed thread count (report.threads; fewer if the machine has fewer cores): "all cores"
# on a shared machine is not a fixed setting.
LATENCY_THREADS = ReportSection().threads
LATENCY_MIN_RUN_TIME = 0.5  # seconds of timed runs per model and batch size, spread over LATENCY_ROUNDS rounds
PRUNING_METHODS = {  # recipe prune.method -> words in the report
    "unstructured": "unstructured magnitude",
    "structured": "structured, whole channels",
}
# (first stage, second stage): the report states second - first with its standard error
COMPARISONS = (("student", "distilled"), ("distilled", "pruned"))
# report.json's layout; bumped when a key changes meaning or goes (new keys alone do not bump it)
SCHEMA_VERSION = 1
# latency measured once per checkpoint (or artifact) file, relative to the run directory: reused by later reports
LATENCY_CACHE = Path("cache") / "latency.json"
# 2: timed in interleaved rounds in a child process (kdcompress.timing); version 1's figures were timed one model
# after the other in the report's own process, so they are timed again
LATENCY_CACHE_VERSION = 2
MAX_ROUNDS = 10_000  # a cached figure with more rounds than this is not one kdc wrote: timed afresh
# (before, after): the confusion changes the report lists, the largest CLASS_CHANGES_SHOWN of them overall
CLASS_CHANGE_PAIRS = (("student", "distilled"), ("distilled", "pruned"), ("student", "pruned"))
CLASS_CHANGES_SHOWN = 10


def accuracy_se(accuracy: float, n: int | None) -> float | None:
    """Binomial standard error of an accuracy measured on ``n`` test samples: sqrt(p(1-p)/n).

    About 0.008 (0.8 point) for p = 0.85 on 2,000 images. None when ``n`` is unknown.

    >>> round(accuracy_se(0.85, 2000), 4)
    0.008
    """
    if not n:
        return None
    return math.sqrt(max(0.0, accuracy * (1.0 - accuracy)) / n)


def compare_accuracy(first: dict, second: dict, z: float = NOISE_Z) -> dict:
    """``second``'s accuracy minus ``first``'s (``stage`` minus ``against``), with the standard error of
    the difference.

    The two errors are combined as for independent samples, sqrt(se1^2 + se2^2):
    both models are scored on the same test images, so this is on the cautious
    side. ``within_noise`` is None when either error is unknown. An error of 0
    (both scores 0 % or 100 %) is exact: a difference of 0 is within noise (``z``
    0), any other is beyond it, by infinitely many errors, which no JSON number
    says (``z`` None).

    >>> perfect = {"stage": "student", "accuracy": 1.0, "accuracy_se": 0.0}
    >>> compare_accuracy(perfect, {**perfect, "stage": "distilled"})["within_noise"]
    True
    """
    difference = second["accuracy"] - first["accuracy"]
    se1, se2 = first.get("accuracy_se"), second.get("accuracy_se")
    se = math.sqrt(se1**2 + se2**2) if se1 is not None and se2 is not None else None
    if se is None:
        ratio, within = None, None
    elif se > 0:
        ratio, within = difference / se, abs(difference) <= z * se
    else:
        within = difference == 0
        ratio = 0.0 if within else None
    return {
        "stage": second["stage"],
        "against": first["stage"],
        "difference": difference,
        "se": se,
        "z": ratio,
        "within_noise": within,
        "noise_z": z,
    }


def _standard_errors(comp: dict, unit: str = "SE") -> str:
    """How many standard errors a comparison's difference is: '0.6 SE'; with an error of 0, '0.0 SE' for no
    difference and 'infinitely many SE' for any other. From ``difference`` and ``se``, so reports written
    before ``z`` was defined for an error of 0 read the same."""
    difference, se = abs(comp["difference"]), comp["se"]
    if se > 0:
        return f"{difference / se:.1f} {unit}"
    return f"0.0 {unit}" if difference == 0 else f"infinitely many {unit}"


def _stage_settings(stage: str, recipe: dict, metrics: dict, arch: dict | None = None) -> dict:
    """What the stage was trained with, from the recipe stored in its checkpoint (and its ``arch``)."""
    run, data = recipe.get("run", {}), recipe.get("data", {})
    student, distill, prune = recipe.get("student", {}), recipe.get("distill", {}), recipe.get("prune", {})
    model_section = recipe.get("teacher", {}) if stage == "teacher" else student
    train = {"teacher": recipe.get("teacher", {}), "pruned": prune}.get(stage, distill)
    kd = stage == "distilled" or (stage == "pruned" and prune.get("distill", True))
    settings = {
        "model": model_section.get("model"),
        "args": model_section.get("args"),
        "loss": "distillation" if kd else "cross-entropy",
        "epochs": train.get("epochs"),
        "optimizer": train.get("optimizer"),
        "lr": train.get("lr"),
        "schedule": train.get("schedule"),
        "weight_decay": train.get("weight_decay"),
        "batch_size": data.get("batch_size"),
        "seed": run.get("seed"),
        "bn_recalibrate_batches": metrics.get("bn_recalibrate_batches", 0),
    }
    if kd:
        loss = distill.get("loss", "kd")  # run directories from before distill.loss: kd
        settings.update(distill_loss=loss, temperature=distill.get("temperature"), alpha=distill.get("alpha"))
        if loss == "dkd":
            # the pruned stage retrains an already distilled student: no warm-up there (pipeline._distill_loss)
            warmup = min(distill.get("dkd_warmup", 0), distill.get("epochs", 0)) if stage == "distilled" else 0
            settings.update(dkd_alpha=distill.get("dkd_alpha"), dkd_beta=distill.get("dkd_beta"), dkd_warmup=warmup)
        elif loss != "kd":
            settings.update(loss_args=distill.get("loss_args", {}))
        if stage == "distilled" and distill.get("features"):  # the pruned stage retrains with the logit loss only
            settings["features"] = [
                {k: term.get(k) for k in ("loss", "teacher", "student", "weight")} for term in distill["features"]
            ]
    if metrics.get("supplied_from"):  # teacher.checkpoint: the user's own teacher, not trained here
        settings.update(supplied_from=metrics["supplied_from"], epochs=0)
        if arch:  # a kdc checkpoint brings its own architecture
            settings.update(model=arch.get("model"), args=arch.get("args"))
    if metrics.get("pretrained_from"):
        settings["pretrained_from"] = metrics["pretrained_from"]
    if stage == "pruned":
        settings.update(
            method=PRUNING_METHODS[prune.get("method", "unstructured")]
            + (f" by {prune.get('importance', 'l1')}" if prune.get("method") == "structured" else ""),
            scope=prune.get("scope"),
            rate=prune.get("rate"),
            target_sparsity=prune.get("target_sparsity", metrics.get("target_sparsity")),
            sparsity_schedule=prune.get(
                "sparsity_schedule", "iterative"
            ),  # run directories from before schedules: iterative
            every=prune.get("every"),
            include=prune.get("include"),
            exclude=prune.get("exclude"),
            pruning_steps=metrics.get("pruning_steps"),
        )
    return settings


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _latency_settings(section: dict) -> tuple[bool, list[int], int]:
    """(measure latency?, batch sizes, threads asked) from a recipe's ``report`` section as a plain dict.

    A dict, not a ReportSection, because a checkpoint's recipe may come from an older kdc: the
    deprecated ``latency_batch`` (one size) stands for ``latency_batches: [size]``.
    """
    default = ReportSection()
    single = section.get("latency_batch")
    batches = [single] if single is not None else section.get("latency_batches") or default.latency_batches
    threads = int(section.get("threads") or default.threads)
    return bool(section.get("latency", default.latency)), [int(b) for b in batches], threads


def _run_recipe(run_dir: str | Path) -> tuple[Recipe | None, str | None]:
    """The recipe ``run_dir/recipe.yaml`` holds (the resolved recipe written at each stage start), pointed at
    ``run_dir`` wherever the directory now is; or (None, why not).

    Read as data, like a checkpoint's recipe: ``recipe_from_dict`` validates every value but imports no
    model or dataset named in it (``kdc report`` of a directory from elsewhere runs no code for it).
    """
    run_dir = Path(run_dir)
    recipe, problem = _read_run_recipe(run_dir)
    if recipe is None:
        return None, problem
    # a copied or moved run directory: its stages are here, not where run.out_dir/run.name pointed
    run = dataclasses.replace(recipe.run, out_dir=str(run_dir.parent), name=run_dir.name)
    return dataclasses.replace(recipe, run=run), None


def _read_run_recipe(run_dir: Path) -> tuple[Recipe | None, str | None]:
    """``run_dir/recipe.yaml`` as written (run.out_dir and run.name untouched), validated; or (None, why not)."""
    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        return None, f"{path} is missing"
    try:
        raw = read_yaml(path.read_text(encoding="utf-8"), source=str(path))[0]
        return recipe_from_dict(raw if isinstance(raw, dict) else {}, source=str(path)), None
    except (OSError, UnicodeDecodeError, KdcError) as exc:
        return None, f"{path} does not load ({' '.join(str(exc).split())})"


def _stale_stages(recipe: Recipe, stages: list[str]) -> dict[str, str | None]:
    """Per stage: why its checkpoint is not what ``recipe`` describes (``pipeline.stage_status``), or None."""
    from ..pipeline import stage_status  # the rule the stage commands skip or rerun by

    stale = {}
    for stage in stages:
        try:
            status = stage_status(recipe, stage)
            stale[stage] = None if status.done else status.reason
        except KdcError as exc:
            stale[stage] = f"cannot tell whether it is up to date: {exc}"
    return stale


def _now() -> str:
    """The current time, ISO-8601 in UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _cpu_name() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _LatencyCache:
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
        self.machine = {"platform": platform.platform(), "cpu": _cpu_name(), "cpu_count": os.cpu_count()}

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
            measured_at = _now()
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
        and all(_finite(timing.get(key)) and timing[key] >= 0 for key in ("median_ms", "iqr_ms", "p25_ms", "p75_ms"))
        and 0 < len(timing["rounds_ms"]) <= MAX_ROUNDS
        and all(_finite(t) and t >= 0 for t in timing["rounds_ms"])
    )


def _finite(value) -> bool:
    """A JSON number (not a bool) that is finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


MAX_METRICS_BYTES = 64 << 20  # a metrics.jsonl over this is not one kdc wrote (about 300,000 epochs)


def _relative(text: str | None, run_dir: Path) -> str | None:
    """``text`` with paths inside ``run_dir`` written relative to it, so the report does not depend on where the
    run directory is (``runs/x/distilled/model.pt`` -> ``distilled/model.pt``)."""
    if not text:
        return text
    # the longer first: the absolute path holds the relative one
    for prefix in sorted({str(run_dir.resolve()), str(run_dir)}, key=len, reverse=True):
        if prefix not in (".", ""):
            text = text.replace(prefix + os.sep, "")
    return text


def _curve(run_dir: Path, stage: str, ckpt: dict) -> list[dict]:
    """The stage's epochs from ``metrics.jsonl`` (else the checkpoint's history), one dict per epoch.

    The per-epoch evaluation is on the validation split when one was held out (``val_*``), else on the test
    split (``test_*``); the other pair is None. ``sparsity`` is the pruning schedule's measured sparsity
    after the epoch (for structured pruning, the share of channels removed); None outside the pruned stage.
    """
    records = None
    path = run_dir / stage / "metrics.jsonl"
    try:  # data anyone could write (it has no manifest): read within a bound, each value checked below
        if path.stat().st_size <= MAX_METRICS_BYTES:
            records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        records = None
    if records is None:
        records = ckpt.get("history") or []
    curve = []
    for record in records:
        if not isinstance(record, dict):
            continue
        point = {
            key: _finite(record.get(key))
            for key in (
                "epoch",
                "train_loss",
                "train_accuracy",
                "test_loss",
                "test_accuracy",
                "val_loss",
                "val_accuracy",
                "lr",
                "first_batch_loss",
                "max_batch_loss",
            )
        }
        point["sparsity"] = _finite(record.get("sparsity")) if stage == "pruned" else None
        point["seconds"] = _finite(record.get("seconds"))
        curve.append(point)
    return curve


def _finite(value) -> int | float | None:
    """``value`` when it is a finite number (not a bool), else None: a curve's values are read from a file."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return value
    return None


def _class_names(ckpt: dict, count: int) -> list[str]:
    """The names of a checkpoint's classes in label order: its preprocess entry's, the built-in dataset's, else
    "0", "1", ..."""
    from ..data import preprocess_info

    classes = (ckpt.get("preprocess") or {}).get("classes")
    if not classes and ckpt.get("dataset"):  # a checkpoint from before preprocess was recorded
        classes = preprocess_info(str(ckpt["dataset"]), ckpt["arch"].get("input_shape") or [])["classes"]
    if isinstance(classes, (list, tuple)) and len(classes) == count:
        return [str(c) for c in classes]
    return [str(i) for i in range(count)]


def _per_class(ckpt: dict) -> dict | None:
    """Per-class test accuracy and the confusion matrix recorded at training time; None when the checkpoint did
    not record it (written before it was)."""
    confusion = ckpt["metrics"].get("confusion")
    if not (
        isinstance(confusion, list)
        and confusion
        and all(isinstance(row, list) and len(row) == len(confusion) for row in confusion)
    ):
        return None
    confusion = [[int(c) for c in row] for row in confusion]
    return {
        "classes": _class_names(ckpt, len(confusion)),
        "accuracy": [row[i] / sum(row) if sum(row) else None for i, row in enumerate(confusion)],
        "confusion": confusion,
    }


def _out_size(module) -> int:
    """A layer's output channels (convolution) or features (linear)."""
    return int(getattr(module, "out_channels", None) or getattr(module, "out_features"))


def _layers(model, recipe: dict, structured: bool, dense_model=None) -> list[dict]:
    """One entry per prunable layer (Conv/Linear weight selected by the recipe's prune include/exclude).

    Dense and unstructured-pruned models: ``kind`` "weights", ``total`` the layer's weights, ``kept`` those
    not exactly zero. A structured-pruned model (``structured``): ``kind`` "channels", ``total`` the layer's
    output channels (features) in ``dense_model`` (the distilled student it was pruned from), ``kept`` in
    ``model``.
    """
    prune = recipe.get("prune", {})
    weights = prunable_weights(model, prune.get("include", ["*"]), prune.get("exclude", []))
    layers = []
    for key, weight in weights.items():
        name = key[: -len(".weight")] if key.endswith(".weight") else ""
        module = model.get_submodule(name)
        if structured:
            try:
                total = _out_size(dense_model.get_submodule(name))
            except AttributeError:  # not in the dense model: nothing to compare with
                total = None
            layers.append({"name": name, "kind": "channels", "total": total, "kept": _out_size(module)})
        else:
            layers.append(
                {
                    "name": name,
                    "kind": "weights",
                    "total": weight.numel(),
                    "kept": int(torch.count_nonzero(weight.detach())),
                }
            )
    return layers


def _class_changes(by_stage: dict) -> list[dict]:
    """The off-diagonal confusion counts that changed most from one model to the next (CLASS_CHANGE_PAIRS), the
    CLASS_CHANGES_SHOWN largest in size over all pairs."""
    changes = []
    for order, (first, second) in enumerate(CLASS_CHANGE_PAIRS):
        a = (by_stage.get(first) or {}).get("per_class")
        b = (by_stage.get(second) or {}).get("per_class")
        if not a or not b or len(a["confusion"]) != len(b["confusion"]):
            continue
        for i, (row_a, row_b) in enumerate(zip(a["confusion"], b["confusion"])):
            for j, (before, after) in enumerate(zip(row_a, row_b)):
                if i != j and after != before:
                    changes.append((order, i, j, before, after, b["classes"]))
    changes.sort(key=lambda c: (-abs(c[4] - c[3]), c[0], c[1], c[2]))
    return [
        {
            "from_stage": CLASS_CHANGE_PAIRS[order][0],
            "to_stage": CLASS_CHANGE_PAIRS[order][1],
            "true": i,
            "predicted": j,
            "true_name": classes[i],
            "predicted_name": classes[j],
            "before": before,
            "after": after,
            "change": after - before,
        }
        for order, i, j, before, after, classes in changes[:CLASS_CHANGES_SHOWN]
    ]


def _train_device(checkpoints: dict) -> str | None:
    """The devices the stages trained on, as recorded in their checkpoints ("cpu", "cuda:0 (NAME)"), in stage
    order without repeats; a checkpoint from before it was recorded counts by its recipe's run.device unless
    that was "auto". None when no stage says."""
    seen = []
    for ckpt in checkpoints.values():
        device = ckpt["metrics"].get("train_device")
        if device is None:
            asked = ckpt.get("recipe", {}).get("run", {}).get("device")
            device = asked if asked and asked != "auto" else None
        if device is not None and device not in seen:
            seen.append(str(device))
    return ", ".join(seen) or None


def _environment(checkpoints: dict, latency_threads: int | None, measured_at: str | None) -> dict:
    """Versions and machine of this report, the training device, and the latency's threads and time."""
    from .. import __version__

    return {
        "kdcompress": __version__,
        "torch": torch.__version__,
        "torchvision": _version_of("torchvision"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "train_device": _train_device(checkpoints),
        "latency_threads": latency_threads,
        "latency_measured_at": measured_at,
    }


def _with_checked_recipe(ckpt: dict) -> dict:
    """``ckpt`` with its stored recipe validated and written out whole, types checked (the file is data: its
    settings are read for every row); one that does not validate is dropped, and the rows show no settings."""
    if ckpt.get("recipe"):
        try:
            ckpt["recipe"] = recipe_to_dict(recipe_from_dict(ckpt["recipe"], source="the checkpoint's recipe"))
        except KdcError:
            ckpt["recipe"] = {}
    return ckpt


def _resolved_recipe(run_dir: Path, checkpoints: dict, found: list[str]) -> dict:
    """The run's resolved recipe as written in ``recipe.yaml`` (validated), else the last checkpoint's."""
    recipe, _ = _read_run_recipe(run_dir)
    if recipe is not None:
        return recipe_to_dict(recipe)
    return checkpoints[found[-1]].get("recipe", {})


def build_report(
    run_dir: str | Path,
    latency: bool | None = None,
    threads: int | None = None,
    batches: list[int] | None = None,
    recipe: Recipe | None = None,
) -> dict:
    """Measure every stage checkpoint in ``run_dir``; return the report as a dict.

    ``latency``, ``threads`` and ``batches`` default to the run's recipe (``report.latency``,
    ``report.threads``, ``report.latency_batches``); latency is timed on the CPU with that many
    threads, at most as many as the machine has cores, once per checkpoint: later reports take it from
    ``run_dir/cache/latency.json`` (:class:`_LatencyCache`), so the report is a pure function of the run
    directory, the same for a copy of it elsewhere but for ``generated_at``. Each stage row says whether its
    checkpoint is ``stale`` against ``run_dir/recipe.yaml`` (why, or None). The keys are listed in the
    README ("report.json fields").

    Only the models a recipe names are built from the run's files: ``recipe``, the one you gave for this
    run (trusted: the code it names is imported), else ``run_dir/recipe.yaml``, which is data: a model of
    your own code it names raises UsageError before anything is imported (pass the recipe to trust it).
    """
    generated_at = _now()
    run_dir = Path(run_dir)
    found = [s for s in STAGE_ORDER if (run_dir / s / "model.pt").is_file()]
    if not found:
        raise KdcError(
            f"no stage checkpoints in {run_dir} (looked for {', '.join(f'{s}/model.pt' for s in STAGE_ORDER)}); "
            f"run `kdc run RECIPE` first, or pass the run directory (runs/<recipe name>)"
        )
    checkpoints = {stage: _with_checked_recipe(load_checkpoint(run_dir / stage / "model.pt")) for stage in found}
    current, recipe_problem = _run_recipe(run_dir)
    check_stale = current is not None
    if recipe is None and current is not None:
        refuse_untrusted_code(current, run_dir / "recipe.yaml", MODEL_KEYS, file_keys=(), instead="")
        outside = outside_files(current, run_dir)
        if outside:  # telling whether the teacher is up to date would read that file: only with --trust-code
            key, path = outside[0]
            recipe_problem = recipe_problem or (
                f"its recipe.yaml names {key} {path}, outside the run, which kdc reads only when you trust the run "
                f"(`kdc report RUN --trust-code`)"
            )
            check_stale = False
    trusted = recipe if recipe is not None else current
    stale = _stale_stages(current, found) if check_stale else dict.fromkeys(found)
    # one setting for every stage, so that their latencies compare: the run's, else the last stage's
    if current is not None:
        section = recipe_to_dict(current.report)
    else:
        section = checkpoints[found[-1]].get("recipe", {}).get("report", {})
    do_latency, asked_batches, asked_threads = _latency_settings(section)
    do_latency = do_latency if latency is None else latency
    batches = [int(b) for b in (batches or asked_batches)]
    asked_threads = asked_threads if threads is None else int(threads)
    threads = max(1, min(asked_threads, _available_cores()))
    cache = _LatencyCache(run_dir) if do_latency else None
    rows = []
    timed: dict[str, tuple[ModelFile, str]] = {}  # what to time: key -> (file, runtime), timed together below
    recipe_name = dataset = None
    dense_student = None  # the distilled model: what structured pruning removed channels from
    for stage in found:
        ckpt = checkpoints[stage]
        written = ckpt.get("recipe", {})
        metrics = ckpt["metrics"]
        recipe_name = recipe_name or written.get("run", {}).get("name")
        dataset = dataset or ckpt.get("dataset")
        prune = written.get("prune", {})
        expected = stage_named(stage).model(trusted) if trusted is not None else None
        name = ckpt["arch"].get("model")  # not yet checked: build_from_checkpoint refuses a damaged spec
        if stale[stage] and isinstance(name, str) and not names_user_code(name):
            expected = None  # an out-of-date stage may be of a built-in model the recipe no longer names: no code
        model = build_from_checkpoint(ckpt, where=f"{stage} checkpoint", expected=expected)
        model.eval()
        shape = tuple(ckpt["arch"]["input_shape"])
        weights = prunable_weights(model, prune.get("include", ["*"]), prune.get("exclude", []))
        accuracy = float(metrics["test_accuracy"])
        test_samples = metrics.get("test_samples")  # checkpoints from before it was recorded lack it
        num_classes = ckpt["arch"].get("num_classes")
        curve = _curve(run_dir, stage, ckpt)
        if cache is not None:
            sha = read_manifest(run_dir / stage / "model.pt")["sha256"]  # checked against the file on loading
            source = ModelFile("checkpoint", str(run_dir / stage / "model.pt"), sha, expected, f"{stage} checkpoint")
            timed[f"stage {stage}"] = (source, f"torch {torch.__version__}")
        structured = stage == "pruned" and metrics.get("channel_sparsity") is not None
        if structured and dense_student is None:  # no distilled checkpoint: the plain architecture is its shape
            dense_student = build_model(ckpt["arch"], where=f"{stage} checkpoint")
        row = {
            "stage": stage,
            "description": DESCRIPTIONS[stage],
            "model": ckpt["arch"]["model"],
            "stale": _relative(stale[stage], run_dir),
            "accuracy": accuracy,
            "accuracy_se": accuracy_se(accuracy, test_samples),
            "test_samples": test_samples,
            "test_loss": metrics.get("test_loss"),
            "train_accuracy": curve[-1]["train_accuracy"] if curve else None,
            "num_classes": num_classes,
            "chance_accuracy": 1.0 / num_classes if num_classes else None,
            "has_batchnorm": has_batchnorm(model),
            "epochs": metrics.get("epochs"),
            "settings": _stage_settings(stage, written, metrics, ckpt.get("arch")),
            "params": count_params(model),
            "nonzero_params": count_nonzero(model),
            "sparsity": weight_sparsity({k: v.detach() for k, v in weights.items()}),
            # structured pruning: the share of prunable channels removed (their weights are gone, not zero)
            "channel_sparsity": metrics.get("channel_sparsity"),
            "target_sparsity": metrics.get("target_sparsity"),
            "checkpoint_bytes": (run_dir / stage / "model.pt").stat().st_size,
            "macs": count_macs(model, shape),
            "sparse_macs": count_sparse_macs(model, shape),
            # {"1": median ms, "64": median ms}; the spread of each in "latency" (filled in below)
            "latency_ms": None,
            "latency": None,
            "train_seconds": metrics.get("seconds"),
            "curve": curve,
            "per_class": _per_class(ckpt),
            "layers": _layers(model, written, structured, dense_student),
        }
        rows.append(row)
        if stage == "distilled":
            dense_student = model
    by_stage = {r["stage"]: r for r in rows}
    teacher = by_stage.get("teacher")
    for row in rows:
        if teacher is not None:
            row["nonzero_ratio_vs_teacher"] = teacher["nonzero_params"] / max(1, row["nonzero_params"])
            row["compression_vs_teacher"] = row["nonzero_ratio_vs_teacher"]  # the old name of the same ratio
            row["bytes_ratio_vs_teacher"] = teacher["checkpoint_bytes"] / max(1, row["checkpoint_bytes"])
            row["accuracy_change_vs_teacher"] = row["accuracy"] - teacher["accuracy"]
        else:
            row["nonzero_ratio_vs_teacher"] = row["compression_vs_teacher"] = None
            row["bytes_ratio_vs_teacher"] = row["accuracy_change_vs_teacher"] = None
    comparisons = [
        compare_accuracy(by_stage[a], by_stage[b]) for a, b in COMPARISONS if a in by_stage and b in by_stage
    ]
    seeds = (
        list(current.run.seeds)
        if current is not None
        else list(checkpoints[found[-1]].get("recipe", {}).get("run", {}).get("seeds") or [])
    )
    if len(seeds) > 1:
        _add_seed_statistics(run_dir, seeds, rows, comparisons)
    models = {stage.name: stage.model(trusted) for stage in STAGES} if trusted is not None else {}
    artifacts = _artifact_rows(run_dir, by_stage, models, timed if cache is not None else None)
    if cache is not None:
        # every stage and artifact at once: those timed now share their rounds, so their ratios hold
        timings = cache.time(timed, batches, threads)
        for row in rows:
            _set_latency(row, timings.get(f"stage {row['stage']}"))
        for row in artifacts:
            _set_latency(row, timings.get(f"artifact {row['path']}"))
        cache.save()
    for comp in comparisons:
        comp["latency_ratio"] = _latency_ratios(by_stage[comp["against"]], by_stage[comp["stage"]])
    report = {
        "schema_version": SCHEMA_VERSION,
        "generated_at": generated_at,
        "run_name": recipe_name,
        "recipe": recipe_name,
        "dataset": dataset,
        "latency_batches": batches if do_latency else None,
        "latency_rounds": LATENCY_ROUNDS if do_latency else None,
        "threads": threads,
        "threads_asked": asked_threads,
        # what the timing process ran with (kdcompress.timing): PASSIVE keeps waiting threads from spinning
        "omp_wait_policy": cache.wait_policy() if cache is not None else None,
        "noise_z": NOISE_Z,
        "stale_checked": check_stale,
        "stale_check_problem": _relative(recipe_problem, run_dir),
        "stages": rows,
        "comparisons": comparisons,
        "class_changes": _class_changes(by_stage),
        "artifacts": artifacts,
        "recipe_resolved": _resolved_recipe(run_dir, checkpoints, found),
        "environment": _environment(
            checkpoints, threads if do_latency else None, cache.measured_at() if cache is not None else None
        ),
    }
    report["warnings"] = report_warnings(report)
    return report


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (n - 1; None for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _add_seed_statistics(run_dir: Path, seeds: list[int], rows: list[dict], comparisons: list[dict]) -> None:
    """Each stage's accuracy over the seeds of ``kdc run --seeds`` and each comparison's difference per seed.

    The first seed's run is ``run_dir``, seed s's ``run_dir/seeds/seed-<s>`` (:func:`kdcompress.seeds.seed_run_dirs`);
    a seed whose checkpoint is missing (an interrupted run) is left out. A row's ``trained_once`` says that every
    seed holds the same checkpoint (the teacher, pinned to the first seed): its spread is not seed noise.
    A comparison's ``seeds`` holds the per-seed differences, their mean, sample std and standard error
    std / sqrt(n), and whether the mean is above ``NOISE_Z`` times that error.
    """
    from ..seeds import seed_run_dirs

    dirs = seed_run_dirs(run_dir, seeds)
    per_seed: dict[str, dict[int, float]] = {}
    for row in rows:
        stage = row["stage"]
        found, fingerprints = {}, set()
        for seed, folder in dirs.items():
            path = folder / stage / "model.pt"
            if not path.is_file():
                continue
            ckpt = load_checkpoint(path)
            found[seed] = row["accuracy"] if folder == run_dir else float(ckpt["metrics"]["test_accuracy"])
            fingerprints.add(ckpt.get("fingerprint"))
        per_seed[stage] = found
        mean, std = _mean_std(list(found.values()))
        row["seeds"] = [{"seed": seed, "accuracy": acc} for seed, acc in found.items()]
        row["accuracy_mean"], row["accuracy_std"] = mean, std
        row["trained_once"] = len(fingerprints) == 1 and len(found) > 1
    for comp in comparisons:
        first, second = per_seed.get(comp["against"], {}), per_seed.get(comp["stage"], {})
        common = [seed for seed in second if seed in first]
        if not common:
            continue
        differences = [second[seed] - first[seed] for seed in common]
        mean, std = _mean_std(differences)
        se = std / math.sqrt(len(differences)) if std is not None else None
        comp["seeds"] = {
            "n": len(differences),
            "differences": [{"seed": seed, "difference": d} for seed, d in zip(common, differences)],
            "mean": mean,
            "std": std,
            "se": se,
            "noise_z": NOISE_Z,
            "mean_above_2se": mean > NOISE_Z * se if se is not None else None,
        }


def _latency_ratios(first: dict, second: dict) -> dict[str, float | None] | None:
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


def _set_latency(row: dict, timing: dict | None) -> None:
    """A stage's or artifact's ``latency`` ({"1": timing, ...}) and ``latency_ms`` (the medians)."""
    if timing:
        row["latency"] = timing
        row["latency_ms"] = {b: t["median_ms"] for b, t in timing.items()}


def _artifact_rows(
    run_dir: Path,
    by_stage: dict,
    models: dict[str, str] | None = None,
    timed: dict[str, tuple[ModelFile, str]] | None = None,
) -> list[dict]:
    """One row per artifact in ``export/artifacts.json``: its recorded accuracy and its bytes; with ``timed``,
    each loaded file is added to it (``"artifact <path>"`` -> (file, runtime)), to be timed with the stages.

    Each file is checked against its manifest and loaded through :func:`kdcompress.export.load_artifact`,
    which unpickles nothing: a damaged or replaced file is ``refused`` (with the reason) and never run, and
    so is one naming another model than ``models`` gives for its stage (the recipe's names).
    """
    from ..checkpoint import confined_path, read_manifest
    from ..export import ARTIFACTS_FILE, EXPORT_DIR, load_artifact, read_artifacts, verify_artifact

    try:
        recorded = read_artifacts(run_dir)
    except KdcError as exc:
        return [{"path": "export/artifacts.json", "refused": _relative(str(exc), run_dir)}]
    teacher = by_stage.get("teacher")
    rows = []
    for found in recorded:
        row = {
            key: found.get(key)
            for key in (
                "stage",
                "format",
                "path",
                "accuracy",
                "test_samples",
                "test_loss",
                "stage_accuracy",
                "accuracy_change_vs_stage",
                "stage_checkpoint_bytes",
                "options",
                "info",
            )
        }
        row["refused"] = row["stale"] = None
        row["latency_ms"] = row["latency"] = None
        try:  # a row that points out of the run directory would show another run's file as this run's
            path = confined_path(run_dir, found["path"], f"{EXPORT_DIR}/{ARTIFACTS_FILE}")
            manifest, _ = verify_artifact(path)
        except KdcError as exc:
            row["refused"] = _relative(str(exc), run_dir)
            rows.append(row)
            continue
        row["bytes"] = manifest["bytes"]
        row["accuracy_se"] = accuracy_se(row["accuracy"], row["test_samples"]) if row["accuracy"] is not None else None
        source = by_stage.get(row["stage"])
        if source is not None:
            row["compression_vs_stage"] = source["checkpoint_bytes"] / max(1, row["bytes"])
            try:
                current = read_manifest(run_dir / row["stage"] / "model.pt").get("fingerprint")
            except KdcError:
                current = None
            if current != found.get("source_fingerprint"):
                row["stale"] = f"the {row['stage']} checkpoint changed after this file was exported"
        else:
            row["compression_vs_stage"] = None
        row["compression_vs_teacher"] = teacher["checkpoint_bytes"] / max(1, row["bytes"]) if teacher else None
        try:  # decoded even without latency: a file that is no artifact of kdc's is refused here, not shipped
            model = load_artifact(path, expected=(models or {}).get(str(row["stage"])))
        except ArtifactError as exc:
            row["refused"] = _relative(str(exc), run_dir)
            rows.append(row)
            continue
        except KdcError as exc:  # its runtime (onnxruntime) is not installed
            row["latency_problem"] = _relative(str(exc), run_dir)
            model = None
        if timed is not None and model is not None:
            runtime = f"torch {torch.__version__}"
            if hasattr(model, "set_threads"):  # an onnxruntime session: its version goes into the cache key
                runtime = f"onnxruntime {_version_of('onnxruntime')}"
            expected = (models or {}).get(str(row["stage"]))
            timed[f"artifact {row['path']}"] = (
                ModelFile("artifact", str(path), manifest["sha256"], expected, f"artifact {row['path']}"),
                runtime,
            )
        rows.append(row)
    return rows


def _version_of(package: str) -> str | None:
    """An installed package's version, None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _near_chance(row: dict) -> bool:
    """Test accuracy within three standard errors of guessing (at least 2 points, for large test sets)."""
    chance, n = row["chance_accuracy"], row["test_samples"]
    margin = max(0.02, 3 * accuracy_se(chance, n)) if n else 0.02
    return row["accuracy"] <= chance + margin


# A training loss this many times its first batch's: training diverged, whatever the epochs' means show.
LOSS_GROWTH_LIMIT = 1e6
TRAIN_SECTIONS = {"teacher": "teacher", "pruned": "prune"}  # the recipe section a stage trains with; else distill


def _untrained_warnings(row: dict, where: str) -> list[str]:
    """A stage whose result means nothing: trained 0 epochs, a teacher at chance, a loss that exploded."""
    stage, settings, accuracy = row["stage"], row.get("settings") or {}, row.get("accuracy")
    section = TRAIN_SECTIONS.get(stage, "distill")
    supplied = settings.get("supplied_from")  # teacher.checkpoint: trained elsewhere, 0 epochs here is right
    scored = f" ({accuracy:.1%})" if accuracy is not None else ""
    warnings = []
    if row.get("epochs") == 0 and not supplied:
        what = {
            "teacher": "its random initial weights and every stage distilled from it learned from noise",
            "pruned": "the distilled model as it was, with no retraining after pruning",
        }.get(stage, "its random initial weights")
        warnings.append(
            f"{stage}: trained 0 epochs ({section}.epochs: 0), so it is {what}; its test accuracy{scored} measures "
            f"no training. `kdc run {where} --set {section}.epochs={getattr(Recipe(), section).epochs}` trains it."
        )
    elif (
        stage == "teacher"
        and accuracy is not None
        and row.get("chance_accuracy") is not None
        and _near_chance(row)
        and not _chance_after_training(row)
    ):
        fix = (
            f"check that teacher.checkpoint ({supplied}) holds a trained model for this dataset, prepared like "
            f"this data"
            if supplied
            else f"check teacher.lr ({settings.get('lr')}) and teacher.epochs ({settings.get('epochs')}), and that the "
            f"data's labels match its images"
        )
        warnings.append(
            f"teacher: test accuracy {accuracy:.1%} is at chance (1/{row['num_classes']} = "
            f"{row['chance_accuracy']:.1%}, within noise of guessing): it has nothing to teach, so the distilled "
            f"and pruned rows say nothing about distillation; {fix}."
        )
    curve = row.get("curve") or []
    # per-batch values where recorded; a checkpoint from before they were has the epochs' means only
    first = (curve[0].get("first_batch_loss") or curve[0].get("train_loss")) if curve else None
    peak = max((p.get("max_batch_loss") or p.get("train_loss") or 0.0 for p in curve), default=None)
    if first is not None and peak is not None and first > 0 and peak > LOSS_GROWTH_LIMIT * first:
        lr = settings.get("lr")
        lr = f"{lr:g}" if isinstance(lr, (int, float)) else lr
        warnings.append(
            f"{stage}: its training loss grew from {first:.3g} (first batch) to {peak:.3g}, more than a million "
            f"times: training diverged, and its test accuracy{scored} comes from broken weights. Lower "
            f"{section}.lr ({lr} with {settings.get('optimizer')}; adam and adamw usually train near 0.001, sgd "
            f"near 0.05) with `kdc run {where} --set {section}.lr=VALUE`."
        )
    return warnings


def _chance_after_training(row: dict) -> bool:
    """At chance on the test set while the last training epoch was good: a mismatch, not an untrained model."""
    chance, train = row.get("chance_accuracy"), row.get("train_accuracy")
    # "good": at least halfway from guessing to perfect
    return chance is not None and train is not None and _near_chance(row) and train >= chance + 0.5 * (1.0 - chance)


def report_warnings(report: dict, run_dir: str | Path | None = None) -> list[str]:
    """Results in ``report`` that should not be trusted or shipped as they stand, one sentence each.

    Commands in them name the run directory ``run_dir``; without it, ``RUN_DIR`` (report.json does not
    depend on where the run directory is, so the warnings it holds say RUN_DIR).
    """
    warnings = []
    where = str(run_dir if run_dir is not None else report.get("run_dir") or "RUN_DIR")  # run_dir: reports before v1
    recipe_file = Path(where) / "recipe.yaml"
    for row in report["stages"]:
        if row.get("stale"):
            warnings.append(
                f"{row['stage']} is stale: its checkpoint is not what {recipe_file} now describes ({row['stale']}); "
                f"its row shows that older checkpoint. `kdc run {where}` reruns what is out of date."
            )
    if report.get("stale_check_problem"):
        warnings.append(
            f"cannot tell whether the stages are up to date: {report['stale_check_problem']}; the rows show the "
            f"checkpoints as they are."
        )
    for row in report["stages"]:
        warnings.extend(_untrained_warnings(row, where))
        chance, train = row.get("chance_accuracy"), row.get("train_accuracy")
        if _chance_after_training(row):
            message = (
                f"{row['stage']}: test accuracy {row['accuracy']:.1%} is at chance (1/{row['num_classes']} = "
                f"{chance:.1%}) while its last training epoch reached {train:.1%}. "
            )
            used = row["settings"].get("bn_recalibrate_batches")
            if row.get("has_batchnorm") and not used:
                message += (
                    "Its BatchNorm running statistics have probably not settled (a slow momentum such as "
                    "torchvision:mobilenet_v3_small's 0.01, few epochs); recompute them after training with "
                    "`--set run.bn_recalibrate=100` (or `run: {bn_recalibrate: 100}` in the recipe) and rerun, "
                    "or train longer."
                )
            elif row.get("has_batchnorm"):
                message += (
                    f"Its BatchNorm statistics were already recomputed from {used} training batches; check that "
                    f"the test data is prepared like the training data."
                )
            else:
                message += "Check that the test data is prepared like the training data, and the learning rate."
            warnings.append(message)
    for art in report.get("artifacts", []):
        if art.get("refused"):
            warnings.append(f"artifact {art['path']} was not loaded: {art['refused']}")
            continue
        if art.get("stale"):
            warnings.append(
                f"artifact {art['path']} is stale: {art['stale']}; `kdc export {where} --force` writes it again."
            )
        if art.get("latency_problem"):
            warnings.append(f"artifact {art['path']}: latency not measured ({art['latency_problem']})")
        change, se = art.get("accuracy_change_vs_stage"), art.get("accuracy_se")
        if change is not None and se is not None and change < -max(0.005, NOISE_Z * math.sqrt(2) * se):
            warnings.append(
                f"artifact {art['path']} scores {-change * 100:.2f} points below the {art['stage']} checkpoint it was "
                f"made from ({art['accuracy']:.2%} against {art['stage_accuracy']:.2%}); ship it only if that loss "
                f"is acceptable" + (", or export with more --bits" if art.get("format") == "shared" else "") + "."
            )
    by_stage = {r["stage"]: r for r in report["stages"]}
    # a teacher with nothing to teach (its own warning above says why): tuning distillation would not help
    teacher = by_stage.get("teacher")
    hopeless = teacher is not None and bool(_untrained_warnings(teacher, where))
    for comp in report.get("comparisons", []):
        if (comp["stage"], comp["against"]) != ("distilled", "student") or comp["difference"] >= 0:
            continue
        d, s = by_stage["distilled"], by_stage["student"]
        seeded = comp.get("seeds") or {}
        if seeded.get("n", 0) > 1:  # several seeds: their mean decides, not the first seed's run alone
            continue
        message = (
            f"distillation came out worse than the baseline: distilled {d['accuracy']:.2%} against the student "
            f"trained alone {s['accuracy']:.2%}, {-comp['difference'] * 100:.2f} points lower"
        )
        if comp["se"] is None:
            message += (
                "; its noise is unknown (the checkpoints predate the recorded test-set size: rerun the stages with "
                "--force to record it)."
            )
        elif comp["within_noise"]:
            message += (
                f", within noise (standard error of the difference {comp['se'] * 100:.2f} points, "
                f"{_standard_errors(comp)}): this run shows no gain from distillation, and no loss either."
            )
        else:
            message += (
                f", beyond noise ({_standard_errors(comp, 'standard errors')} of {comp['se'] * 100:.2f} points): "
                + _retry_hint((d.get("settings") or {}).get("distill_loss", "kd"), hopeless)
            )
        warnings.append(message)
    for comp in report.get("comparisons", []):
        seeded = comp.get("seeds") or {}
        if (comp["stage"], comp["against"]) != ("distilled", "student") or seeded.get("n", 0) < 2:
            continue
        if seeded["mean"] >= 0:
            continue
        d, s = by_stage["distilled"], by_stage["student"]
        message = (
            f"distillation came out worse than the baseline over {seeded['n']} seeds: distilled "
            f"{d['accuracy_mean']:.2%} against the student trained alone {s['accuracy_mean']:.2%} on average, "
            f"{-seeded['mean'] * 100:.2f} points lower (std {seeded['std'] * 100:.2f}, standard error of the mean "
            f"{seeded['se'] * 100:.2f} points)"
        )
        if -seeded["mean"] <= NOISE_Z * seeded["se"]:
            message += f", within seed noise (at most {NOISE_Z:g} SE): no gain from distillation, and no loss either."
        else:
            message += f", beyond seed noise (more than {NOISE_Z:g} SE): " + _retry_hint(
                (d.get("settings") or {}).get("distill_loss", "kd"), hopeless
            )
        warnings.append(message)
    return warnings


def _retry_hint(loss: str, hopeless_teacher: bool = False) -> str:
    """What to change when the distilled student came out worse, for each kind of ``distill.loss``.

    ``hopeless_teacher``: the teacher itself is untrained or diverged, so the fix is there, not in the loss.
    """
    if hopeless_teacher:
        return "fix the teacher first (see its warning): a student distilled from it learns nothing to gain."
    if loss == "dkd":
        # beta T^2 makes DKD's gradient some beta*T times KD's: a small student without BatchNorm can diverge
        return "try a lower distill.dkd_beta or distill.lr, another distill.temperature, or more distill.epochs."
    if loss != "kd":
        return "try other distill.loss_args, or more distill.epochs."
    return "try another distill.temperature or distill.alpha, or more distill.epochs."


# --------------------------------------------------------------------------- formatting


def _three_digits(n: float, units: tuple[tuple[str, float], ...]) -> str:
    """``n`` in the largest unit it reaches, to three significant digits (999,999 -> 1M, not 1e+03k)."""
    for i, (unit, scale) in enumerate(units):
        if abs(n) >= scale:
            text = f"{n / scale:.3g}"
            if "e" in text:  # rounded up to 1000: the next unit up, or every digit in the largest
                text, unit = (f"{n / units[i - 1][1]:.3g}", units[i - 1][0]) if i else (f"{n / scale:,.0f}", unit)
            return text + unit
    return f"{n:,}"


def _compact(n: int | None) -> str:
    """25,450 -> 25.4k; 11,689,512 -> 11.7M (the terminal table; md and json keep every digit)."""
    if n is None:
        return ""
    if abs(n) < 10_000:
        return f"{n:,}"
    return _three_digits(n, (("G", 1e9), ("M", 1e6), ("k", 1e3)))


def _bytes(n: int) -> str:
    """207,325 -> 207 kB (decimal units, as disk sizes are sold)."""
    return _three_digits(n, ((" GB", 1e9), (" MB", 1e6), (" kB", 1e3))) if n >= 1000 else f"{n} B"


def _ratio(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.1f}x" if value >= 10 else f"{value:.2f}x"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {sec:02d}s"
    return f"{minutes // 60}h {minutes % 60:02d}m"


def _latency_text(timing: dict | None) -> str:
    if not timing:
        return "-"
    median = timing["median_ms"]
    digits = 0 if median >= 100 else 1 if median >= 10 else 2 if median >= 1 else 3
    return f"{median:.{digits}f} ({timing['iqr_ms']:.{digits}f})"


def _points(value: float | None) -> str:
    return "" if value is None else f"{value * 100:+.2f}"


def _seeded(row: dict) -> bool:
    return len(row.get("seeds") or []) > 1


def _accuracy_text(row: dict) -> str:
    if _seeded(row):  # several seeds: mean ± sample std over them
        std = row.get("accuracy_std")
        return f"{row['accuracy_mean'] * 100:.2f} ±{(std or 0.0) * 100:.2f}"
    se = row.get("accuracy_se")
    return f"{row['accuracy'] * 100:.2f} ±{se * 100:.2f}" if se is not None else f"{row['accuracy'] * 100:.2f} ±?"


def _schedule_words(settings: dict) -> str:
    """'iterative, rate 0.3, steps spaced automatically' and the like, for a pruned stage's settings line."""
    schedule = settings.get("sparsity_schedule") or "iterative"
    every = settings.get("every")
    spacing = "steps spaced automatically" if every == "auto" else f"a step every {every} epochs"
    if schedule == "one-shot":
        return "one-shot"
    if schedule == "agp":
        return f"agp, {spacing}"
    return f"{schedule}, rate {settings.get('rate')}, {spacing}"


def _settings_text(settings: dict) -> str:
    """A stage's settings on one line: model, loss, pruning, optimiser."""
    parts = []
    args = settings.get("args")
    model = settings.get("model") or "?"
    parts.append(model + ("" if not args else " " + " ".join(f"{k}={v}" for k, v in args.items())))
    if settings.get("supplied_from"):  # not trained: no loss or schedule to show
        return "; ".join(parts + [f"supplied: {settings['supplied_from']}"])
    if settings.get("method"):
        target = settings.get("target_sparsity")
        steps = settings.get("pruning_steps")
        parts.append(
            f"{settings['method']} ({settings.get('scope')}), {_schedule_words(settings)} to target {target * 100:g}%"
            if target is not None
            else f"{settings['method']} ({settings.get('scope')})"
        )
        if steps is not None:
            parts[-1] += f" in {steps} steps"
    if settings.get("loss") == "distillation" and settings.get("distill_loss", "kd") == "dkd":
        parts.append(
            f"DKD T={settings.get('temperature')} alpha={settings.get('dkd_alpha')} beta={settings.get('dkd_beta')}"
            + (f", warm-up {settings['dkd_warmup']} epochs" if settings.get("dkd_warmup") else "")
        )
    elif settings.get("loss") == "distillation" and settings.get("distill_loss", "kd") != "kd":
        args = settings.get("loss_args") or {}
        parts.append(f"distillation {settings['distill_loss']}" + (f" args {args}" if args else ""))
    elif settings.get("loss") == "distillation":
        parts.append(f"distillation T={settings.get('temperature')} alpha={settings.get('alpha')}")
    else:
        parts.append("cross-entropy")
    for term in settings.get("features") or []:
        parts.append(f"+ {term['loss']} {term['student']} <- teacher {term['teacher']} (weight {term['weight']:g})")
    parts.append(
        f"{settings.get('epochs')} epochs {settings.get('optimizer')} lr {settings.get('lr')} {settings.get('schedule')}, "
        f"batch {settings.get('batch_size')}"
    )
    if settings.get("pretrained_from"):
        parts.append(f"from pretrained weights {settings['pretrained_from']}")
    if settings.get("bn_recalibrate_batches"):
        parts.append(f"BatchNorm recalibrated on {settings['bn_recalibrate_batches']} batches")
    return "; ".join(parts)


def _comparison_text(comp: dict) -> str:
    """'+0.70 points ± 1.18 (SE): 0.6 SE, within noise (<= 2 SE); latency distilled/pruned 2.61x at batch 64' for
    one comparison."""
    head = f"{comp['difference'] * 100:+.2f} points"
    if comp["se"] is None:
        return head + " (noise unknown: the checkpoints predate the recorded test-set size)" + _latency_ratio_text(comp)
    verdict = "within noise (<=" if comp["within_noise"] else "beyond noise (>"
    return (
        f"{head} ± {comp['se'] * 100:.2f} (SE): {_standard_errors(comp)}, {verdict} {comp['noise_z']:g} SE)"
        + _latency_ratio_text(comp)
    )


def _latency_ratio_text(comp: dict) -> str:
    """'; latency distilled/pruned 2.11x at batch 1, 2.61x at batch 64', or "" without latency."""
    ratios = comp.get("latency_ratio") or {}
    if not ratios:
        return ""
    parts = [
        f"{r:.2f}x at batch {b}" if r is not None else f"not compared at batch {b} (timed in different rounds)"
        for b, r in ratios.items()
    ]
    return f"; latency {comp['against']}/{comp['stage']} {', '.join(parts)}"


def _seed_comparison_text(seeded: dict) -> str:
    """'mean -0.37 points ± 0.09 (SE over 3 seeds; std 0.15): below 2 SE; per seed 0: -0.46, 1: ...'."""
    se, std = seeded.get("se"), seeded.get("std")
    verdict = "above" if seeded.get("mean_above_2se") else "not above"
    per_seed = ", ".join(f"{d['seed']}: {d['difference'] * 100:+.2f}" for d in seeded["differences"])
    return (
        f"mean {seeded['mean'] * 100:+.2f} points ± {(se or 0.0) * 100:.2f} (SE over {seeded['n']} seeds, std "
        f"{(std or 0.0) * 100:.2f}): {verdict} {seeded['noise_z']:g} SE; per seed {per_seed}"
    )


def _seeds_note(rows: list[dict]) -> str:
    seeds = sorted({e["seed"] for r in rows for e in r.get("seeds") or []})
    once = [r["stage"] for r in rows if r.get("trained_once")]
    return (
        f"test acc and vs teacher: mean ± sample std (n-1) over seeds {', '.join(map(str, seeds))}; the other "
        f"columns are the first seed's" + (f"; trained once, shared by every seed: {', '.join(once)}" if once else "")
    )


def _comparison_name(comp: dict) -> str:
    return f"{comp['stage']} - {comp['against']}"


def _round_sets(report: dict) -> dict[str, int]:
    """Per batch size measured, how many sets of rounds its stage and artifact figures come from."""
    sets: dict[str, set] = {}
    for row in [*report.get("stages", []), *report.get("artifacts", [])]:
        for batch, timing in (row.get("latency") or {}).items():
            sets.setdefault(str(batch), set()).add((timing or {}).get("round_set"))
    return {batch: len(found) for batch, found in sets.items()}


def _latency_note(report: dict) -> str:
    if not report.get("latency_batches"):
        return "latency not measured (report.latency: false)"
    threads, asked = report.get("threads"), report.get("threads_asked")
    fewer = f" ({asked} asked; the machine has {threads} cores)" if asked and asked != threads else ""
    sizes = " and ".join(str(b) for b in report["latency_batches"])
    rounds = report.get("latency_rounds")
    turns = f" over {rounds} rounds in which every model ran in turn, so that ratios hold as the load changes"
    turns = turns if rounds else ""  # a report.json from before the rounds
    mixed = [f"batch {b}: {n} sets" for b, n in _round_sets(report).items() if n > 1]
    mixed_note = (
        f". Some figures were timed in earlier rounds ({', '.join(mixed)}; a rerun stage is timed anew, the cached "
        f"ones are not), so a ratio across sets compares different moments: delete cache/latency.json to time all "
        f"together"
        if mixed
        else ""
    )
    return (
        f"latency: CPU forward pass of a batch of {sizes}, {threads} thread{'' if threads == 1 else 's'}{fewer}, "
        f"median (interquartile range) in ms{turns}, timed in a separate process with OMP_WAIT_POLICY="
        f"{report.get('omp_wait_policy') or 'unset'}: waiting threads sleep there, where spinning ones take the cores "
        f"the work needs on a busy machine (resnet18 at batch 1 with 2 spinning threads under load took 440 ms "
        f"instead of 4 ms){mixed_note}"
    )


SPARSE_MACS_NOTE = (
    "MACs if sparse: only the non-zero weights' multiply-accumulates, what sparse kernels could reach at best; "
    "dense kernels, as timed here, pay the full MACs"
)
STALE_NOTE = "*: stale, the checkpoint is not what the run's recipe.yaml now describes (see the warnings)"


def _stage_name(row: dict) -> str:
    return row["stage"] + ("*" if row.get("stale") else "")


def report_table(report: dict) -> Group:
    """The report for the terminal: three tables that fit 100 columns (accuracy; size; MACs and latency, one
    column per batch size), their notes, the stage settings and the distilled-against-baseline comparison. A
    stale stage is named ``stage*`` (warnings are in ``report["warnings"]``; the CLI prints them)."""
    rows = report["stages"]
    first = Table(title=f"kdc report: {report['recipe']} on {report['dataset']}", title_justify="left")
    first.add_column("stage", no_wrap=True)
    first.add_column("model", overflow="fold")  # the one column that may wrap: names can be long
    seeded = any(_seeded(r) for r in rows)
    accuracy_header = "test acc %\nmean ± std" if seeded else "test acc %\n± SE"
    for header in ("epochs", "train\ntime", "train\nacc %", accuracy_header, "vs teacher\npoints"):
        first.add_column(header, justify="right", no_wrap=True)
    teacher_mean = next((r.get("accuracy_mean") for r in rows if r["stage"] == "teacher"), None)
    for r in rows:
        change = r.get("accuracy_change_vs_teacher")
        if seeded and _seeded(r) and teacher_mean is not None:  # beside a mean, the change of the means
            change = r["accuracy_mean"] - teacher_mean
        first.add_row(
            _stage_name(r),
            Text(r["model"]),  # Text: a name is never read as rich markup
            "" if r.get("epochs") is None else str(r["epochs"]),
            _duration(r.get("train_seconds")),
            "" if r.get("train_accuracy") is None else f"{r['train_accuracy'] * 100:.2f}",
            _accuracy_text(r),
            _points(change),
        )
    second = Table(caption="ratio: teacher's / stage's (non-zero parameters; checkpoint bytes)", caption_justify="left")
    second.add_column("stage", no_wrap=True)
    for header in ("params", "non-zero", "sparsity", "non-zero\nratio", "bytes", "bytes\nratio"):
        second.add_column(header, justify="right", no_wrap=True)
    for r in rows:
        second.add_row(
            _stage_name(r),
            _compact(r["params"]),
            _compact(r["nonzero_params"]),
            _sparsity_cell(r),
            _ratio(r.get("nonzero_ratio_vs_teacher")),
            _bytes(r["checkpoint_bytes"]),
            _ratio(r.get("bytes_ratio_vs_teacher")),
        )
    # what a forward pass costs: a table of its own, so that a latency column per batch size fits
    batches = report.get("latency_batches") or []
    third = Table()
    third.add_column("stage", no_wrap=True)
    for header in ["MACs", "MACs if\nsparse"] + [f"latency ms, batch {b}\nmedian (IQR)" for b in batches]:
        third.add_column(header, justify="right", no_wrap=True)
    for r in rows:
        timing = r.get("latency") or {}
        third.add_row(
            _stage_name(r),
            _compact(r["macs"]),
            _compact(r.get("sparse_macs")),
            *[_latency_text(timing.get(str(b))) for b in batches],
        )
    # grids, not lines of text: a long setting wraps under its own column, not under the stage names
    settings = Table.grid(padding=(0, 2))
    settings.add_column(no_wrap=True)
    settings.add_column(overflow="fold")
    for r in rows:
        settings.add_row(f" {_stage_name(r)}", Text(_settings_text(r["settings"])))
    # notes as text, not captions: a caption wraps at its table's width
    notes = ([STALE_NOTE] if any(r.get("stale") for r in rows) else []) + [SPARSE_MACS_NOTE, _latency_note(report)]
    if seeded:
        notes.insert(0, _seeds_note(rows))
    parts = [first, second, third, Text("\n".join(notes)), Text("settings", style="bold"), settings]
    if report.get("artifacts"):
        parts.append(_artifact_table(report))
    if report.get("comparisons"):
        parts.append(
            Text(
                "differences (standard error of a test accuracy: sqrt(p(1-p)/n); latency: the median of the "
                "per-round ratios, the two timed side by side)",
                style="bold",
            )
        )
        diffs = Table.grid(padding=(0, 2))
        diffs.add_column(no_wrap=True)
        diffs.add_column(overflow="fold")
        for c in report["comparisons"]:
            first_seed = f", seed {rows[0]['seeds'][0]['seed']}" if seeded and rows[0].get("seeds") else ""
            diffs.add_row(f" {_comparison_name(c)}{first_seed}", _comparison_text(c))
            if (c.get("seeds") or {}).get("n", 0) > 1:
                diffs.add_row(f" {_comparison_name(c)}, {c['seeds']['n']} seeds", _seed_comparison_text(c["seeds"]))
        parts.append(diffs)
    return Group(*parts)


def _artifact_name(a: dict) -> str:
    return Path(str(a["path"])).name + ("*" if a.get("stale") else "")


def _artifact_table(report: dict) -> Table:
    """Exported files: bytes, how many times smaller than the teacher's and the stage's checkpoints,
    accuracy measured from the loaded file (against its stage's), latency medians."""
    batches = report.get("latency_batches") or []
    table = Table(
        title="artifacts (export/): accuracy measured from each file loaded back",
        title_justify="left",
        caption="teacher / file, stage / file: checkpoint bytes over file bytes; vs stage: accuracy points against the "
        "stage checkpoint; ms: median latency",
        caption_justify="left",
    )
    table.add_column("file", overflow="fold")
    for header in ["bytes", "teacher\n/ file", "stage\n/ file", "test acc %\n± SE", "vs\nstage"]:
        table.add_column(header, justify="right", no_wrap=True)
    for b in batches:
        table.add_column(f"ms\nbatch {b}", justify="right", no_wrap=True)
    for a in report["artifacts"]:
        if a.get("refused"):
            table.add_row(Text(_artifact_name(a)), "refused", *[""] * (4 + len(batches)))
            continue
        timing = a.get("latency_ms") or {}
        table.add_row(
            Text(_artifact_name(a)),
            _bytes(a["bytes"]),
            _ratio(a.get("compression_vs_teacher")),
            _ratio(a.get("compression_vs_stage")),
            "" if a.get("accuracy") is None else _accuracy_text(a),
            _points(a.get("accuracy_change_vs_stage")),
            *["-" if timing.get(str(b)) is None else _ms(timing[str(b)]) for b in batches],
        )
    return table


def _ms(median: float) -> str:
    digits = 0 if median >= 100 else 1 if median >= 10 else 2 if median >= 1 else 3
    return f"{median:.{digits}f}"


def _sparsity_cell(r: dict) -> str:
    """Weight sparsity, or for a structurally pruned stage the share of channels removed ("ch")."""
    if r.get("channel_sparsity") is not None:
        return f"{r['channel_sparsity']:.1%} ch"
    return f"{r['sparsity']:.1%}"


def _md_row(r: dict, batches) -> list[str]:
    se, timing = r.get("accuracy_se"), r.get("latency") or {}
    target = r.get("target_sparsity")
    cells = [
        _stage_name(r),
        r["model"],
        "" if r.get("epochs") is None else str(r["epochs"]),
        "" if r.get("train_seconds") is None else f"{r['train_seconds']:.1f}",
        "" if r.get("train_accuracy") is None else f"{r['train_accuracy']:.2%}",
        f"{r['accuracy']:.2%}",
        "unknown" if se is None else f"{se * 100:.2f} pt (n={r['test_samples']:,})",
        "" if r.get("accuracy_change_vs_teacher") is None else f"{r['accuracy_change_vs_teacher'] * 100:+.2f} pt",
        f"{r['params']:,}",
        f"{r['nonzero_params']:,}",
        _sparsity_cell(r),
        "" if target is None else f"{target:.1%}",
        _ratio(r.get("nonzero_ratio_vs_teacher")),
        f"{r['checkpoint_bytes']:,}",
        _ratio(r.get("bytes_ratio_vs_teacher")),
        f"{r['macs']:,}",
        "" if r.get("sparse_macs") is None else f"{r['sparse_macs']:,}",
    ]
    for b in batches:
        lat = timing.get(str(b))
        cells += [
            "" if not lat else f"{lat['median_ms']:.4f}",
            "" if not lat else f"{lat['iqr_ms']:.4f} ({lat['p25_ms']:.4f} to {lat['p75_ms']:.4f})",
        ]
    return cells


MD_COLUMNS = [
    "stage",
    "model",
    "epochs",
    "train seconds",
    "train acc (last epoch)",
    "test acc",
    "± SE",
    "vs teacher",
    "params",
    "non-zero",
    "sparsity",
    "target",
    "non-zero ratio vs teacher",
    "bytes on disk",
    "bytes ratio vs teacher",
    "MACs",
    "MACs if sparse (non-zero weights only)",
]


def _md_columns(batches) -> list[str]:
    return MD_COLUMNS + [c for b in batches for c in (f"latency batch {b} median (ms)", f"latency batch {b} IQR (ms)")]


ARTIFACT_MD_COLUMNS = [
    "file",
    "stage",
    "format",
    "bytes",
    "smaller vs teacher",
    "smaller vs stage",
    "test acc",
    "± SE",
    "vs stage checkpoint",
]
ARTIFACTS_MD_NOTE = (
    "Files written by `kdc export` to export/. Test accuracy is measured from each file loaded back with "
    "kdcompress.export.load_artifact, never copied from the checkpoint; smaller is checkpoint bytes / file bytes; "
    "latency is timed like the stages'."
)


def _md_artifact_row(a: dict, batches) -> list[str]:
    if a.get("refused"):
        return [str(a["path"]), str(a.get("stage") or ""), str(a.get("format") or ""), "refused: " + a["refused"]] + [
            ""
        ] * (len(ARTIFACT_MD_COLUMNS) - 4 + len(batches))
    se = a.get("accuracy_se")
    timing = a.get("latency_ms") or {}
    change = a.get("accuracy_change_vs_stage")
    return [
        str(a["path"]) + ("*" if a.get("stale") else ""),
        a["stage"],
        a["format"] + _options_md(a.get("options") or {}),
        f"{a['bytes']:,}",
        _ratio(a.get("compression_vs_teacher")),
        _ratio(a.get("compression_vs_stage")),
        "" if a.get("accuracy") is None else f"{a['accuracy']:.2%}",
        "" if se is None else f"{se * 100:.2f} pt",
        "" if change is None else f"{change * 100:+.2f} pt",
    ] + ["" if timing.get(str(b)) is None else f"{timing[str(b)]:.4f}" for b in batches]


def _options_md(options: dict) -> str:
    return f" ({', '.join(f'{k} {v}' for k, v in options.items())})" if options else ""


def report_markdown(report: dict) -> str:
    """The report as Markdown, every number in full."""
    left = ("stage", "model")
    batches = report.get("latency_batches") or []
    columns = _md_columns(batches)
    note = _latency_note(report)
    lines = [
        f"# kdc report: {report['recipe']}",
        "",
        f"Dataset: {report['dataset']}. Accuracy is the final model's test accuracy; ± SE is its binomial standard "
        f"error sqrt(p(1-p)/n) over the n test images, and a difference counts as within noise when it is at most "
        f"{report.get('noise_z', NOISE_Z):g} standard errors of the difference (sqrt(se1² + se2²)). Train acc is the "
        f"last epoch's, measured in training mode. Sparsity is the share of prunable weights (Conv/Linear) that are "
        f'exactly zero; for a structurally pruned stage ("ch") it is the share of prunable channels removed, '
        f"whose weights are gone from the model. Non-zero ratio vs teacher is teacher non-zero parameters / stage non-zero parameters (it was "
        f"called compression): it counts weights, not bytes. Bytes on disk are the dense checkpoint's: zeros in a "
        f"dense tensor do not shrink it, and bytes ratio vs teacher is teacher bytes / stage bytes. MACs are dense "
        f"multiply-accumulates per sample of every matmul, convolution and attention (torch's flop counter, FLOPs / "
        f"2). {SPARSE_MACS_NOTE[0].upper() + SPARSE_MACS_NOTE[1:]}. {note[0].upper() + note[1:]}; timed with "
        f"torch.utils.benchmark (blocked_autorange), it varies between machines and with their load.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join(" --- " if c in left else " ---: " for c in columns) + "|",
    ]
    lines += ["| " + " | ".join(_md_row(r, batches)) + " |" for r in report["stages"]]
    if any(r.get("stale") for r in report["stages"]):
        lines += ["", STALE_NOTE + "."]
    if any(_seeded(r) for r in report["stages"]):
        lines += ["", "## Seeds", "", _seeds_note(report["stages"]) + ".", ""]
        seeds = sorted({e["seed"] for r in report["stages"] for e in r.get("seeds") or []})
        columns = ["stage", *(f"seed {s}" for s in seeds), "mean", "std"]
        lines += [
            "| " + " | ".join(columns) + " |",
            "|" + "|".join(" --- " if c == "stage" else " ---: " for c in columns) + "|",
        ]
        for r in report["stages"]:
            accs = {e["seed"]: e["accuracy"] for e in r.get("seeds") or []}
            std = r.get("accuracy_std")
            cells = [
                _stage_name(r),
                *("" if s not in accs else f"{accs[s]:.2%}" for s in seeds),
                "" if r.get("accuracy_mean") is None else f"{r['accuracy_mean']:.2%}",
                "" if std is None else f"{std * 100:.2f} pt",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        comps = [c for c in report.get("comparisons") or [] if (c.get("seeds") or {}).get("n", 0) > 1]
        if comps:
            lines.append("")
            lines += [
                f"- {_comparison_name(c)}, {c['seeds']['n']} seeds: {_seed_comparison_text(c['seeds'])}" for c in comps
            ]
    lines += ["", "## Stages", ""]
    lines += [f"- **{r['stage']}**: {r['description']}: {_settings_text(r['settings'])}" for r in report["stages"]]
    if report.get("artifacts"):
        lines += ["", "## Artifacts", "", ARTIFACTS_MD_NOTE, ""]
        columns = ARTIFACT_MD_COLUMNS + [f"latency batch {b} median (ms)" for b in batches]
        lines += [
            "| " + " | ".join(columns) + " |",
            "|" + "|".join(" --- " if c == "file" else " ---: " for c in columns) + "|",
        ]
        lines += ["| " + " | ".join(_md_artifact_row(a, batches)) + " |" for a in report["artifacts"]]
    if report.get("comparisons"):
        lines += [
            "",
            "## Differences",
            "",
            "Latency: the median of the per-round ratios (each round timed the two side by side).",
            "",
        ]
        lines += [f"- {_comparison_name(c)}: {_comparison_text(c)}" for c in report["comparisons"]]
    if report.get("warnings"):
        lines += ["", "## Warnings", ""]
        lines += [f"- {w}" for w in report["warnings"]]
    lines.append("")
    return "\n".join(lines)


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
    The run directory's lock (:func:`kdcompress.runlock.run_dir_lock`) is held throughout, so the
    report reads no file another kdc is writing; while one writes there it is refused at once.
    """
    from .html import render_html  # matplotlib is imported only when a report is written

    run_dir = Path(run_dir)
    with run_dir_lock(run_dir, advice=REPORT_WAIT_ADVICE, create=False):
        report = build_report(run_dir, latency=latency, threads=threads, recipe=recipe)
        atomic_write_files(
            {
                run_dir / "report.json": json.dumps(report, indent=2) + "\n",
                run_dir / "report.md": report_markdown(report),
                run_dir / "report.html": render_html(report),
            }
        )
    return report
