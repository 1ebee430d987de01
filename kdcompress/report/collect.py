"""The report of a run directory as a dict (report.json): :func:`build_report`, a pure function of the directory.

For every stage checkpoint found in ``<run dir>`` (teacher, student, distilled, pruned) it measures the saved
model and gathers what a ship decision needs: each stage's settings, accuracy with its standard error,
comparisons within or beyond noise, latency (:mod:`.latency`), MACs, training curves, per-class accuracy,
kept weights per layer, exported artifacts, the resolved recipe, the environment and ``warnings``
(:mod:`.warnings`). Its keys are listed in the README ("report.json fields"). Example::

    >>> from kdcompress.report import build_report
    >>> report = build_report("runs/quickstart")  # doctest: +SKIP
    >>> [row["stage"] for row in report["stages"]]  # doctest: +SKIP
    ['teacher', 'student', 'distilled', 'pruned']
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
from pathlib import Path

import torch

from .._version import __version__
from ..checkpoint import load_checkpoint, read_manifest
from ..data import preprocess_info
from ..errors import ArtifactError, KdcError, UsageError
from ..export import load_artifact, verify_artifact
from ..files import confined_path
from ..measure import LATENCY_ROUNDS, count_macs, count_nonzero, count_params, count_sparse_macs
from ..models import build_from_checkpoint, build_model
from ..names import names_user_code
from ..prune import prunable_weights, weight_sparsity
from ..recipe import Recipe, read_yaml, recipe_from_dict, recipe_to_dict
from ..run.export import read_artifacts
from ..run.layout import ARTIFACTS_FILE, EXPORT_DIR, checkpoint_path, metrics_path, recipe_path
from ..run.seeds import seed_run_dirs
from ..run.sensitivity import SOURCE_STAGE, load_sensitivity
from ..run.stages import STAGES, stage_named
from ..run.state import stage_status
from ..run.trust import MODEL_KEYS, outside_files, refuse_untrusted_code
from ..stats import NOISE_Z, accuracy_se, compare_accuracy, finite, mean_std
from ..timing import ModelFile
from ..train import has_batchnorm
from .budget import budget_block
from .latency import LatencyCache, available_cores, latency_ratios, latency_settings, now, set_latency
from .warnings import report_warnings

__all__ = ["build_report", "stage_settings", "SCHEMA_VERSION", "STAGE_ORDER", "DESCRIPTIONS"]


STAGE_ORDER = tuple(stage.name for stage in STAGES)  # declared once, in run.stages.STAGES
DESCRIPTIONS = {stage.name: stage.description for stage in STAGES}


PRUNING_METHODS = {  # recipe prune.method -> words in the report
    "unstructured": "unstructured magnitude",
    "structured": "structured, whole channels",
}
# (first stage, second stage): the report states second - first with its standard error
COMPARISONS = (("student", "distilled"), ("distilled", "pruned"))
# report.json's layout; bumped when a key changes meaning or goes (new keys alone do not bump it)
SCHEMA_VERSION = 1


# (before, after): the confusion changes the report lists, the largest CLASS_CHANGES_SHOWN of them overall
CLASS_CHANGE_PAIRS = (("student", "distilled"), ("distilled", "pruned"), ("student", "pruned"))
CLASS_CHANGES_SHOWN = 10


def stage_settings(stage: str, recipe: dict, metrics: dict, arch: dict | None = None) -> dict:
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
            # the pruned stage retrains an already distilled student: no warm-up there (kdcompress.run.losses.distill_loss)
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
            # with a budget, the share of channels its allocation removes (recorded by the stage)
            target_sparsity=metrics.get("target_sparsity")
            if prune.get("budget")
            else prune.get("target_sparsity", metrics.get("target_sparsity")),
            sparsity_schedule=prune.get(
                "sparsity_schedule", "iterative"
            ),  # run directories from before schedules: iterative
            every=prune.get("every"),
            include=prune.get("include"),
            exclude=prune.get("exclude"),
            pruning_steps=metrics.get("pruning_steps"),
        )
    return settings


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
    path = recipe_path(run_dir)
    if not path.is_file():
        return None, f"{path} is missing"
    try:
        raw = read_yaml(path.read_text(encoding="utf-8"), source=str(path))[0]
        return recipe_from_dict(raw if isinstance(raw, dict) else {}, source=str(path)), None
    except (OSError, UnicodeDecodeError, KdcError) as exc:
        return None, f"{path} does not load ({' '.join(str(exc).split())})"


def _stale_stages(recipe: Recipe, stages: list[str]) -> dict[str, str | None]:
    """Per stage: why its checkpoint is not what ``recipe`` describes (``kdcompress.run.state.stage_status``, the
    rule the stage commands skip or rerun by), or None."""
    stale = {}
    for stage in stages:
        try:
            status = stage_status(recipe, stage)
            stale[stage] = None if status.done else status.reason
        except KdcError as exc:
            stale[stage] = f"cannot tell whether it is up to date: {exc}"
    return stale


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
    path = metrics_path(run_dir, stage)
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
            key: finite(record.get(key))
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
        point["sparsity"] = finite(record.get("sparsity")) if stage == "pruned" else None
        point["seconds"] = finite(record.get("seconds"))
        curve.append(point)
    return curve


def _class_names(ckpt: dict, count: int) -> list[str]:
    """The names of a checkpoint's classes in label order: its preprocess entry's, the built-in dataset's, else
    "0", "1", ..."""
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
    ``run_dir/cache/latency.json`` (:class:`LatencyCache`), so the report is a pure function of the run
    directory, the same for a copy of it elsewhere but for ``generated_at``. Each stage row says whether its
    checkpoint is ``stale`` against ``run_dir/recipe.yaml`` (why, or None). The keys are listed in the
    README ("report.json fields").

    Only the models a recipe names are built from the run's files: ``recipe``, the one you gave for this
    run (trusted: the code it names is imported), else ``run_dir/recipe.yaml``, which is data: a model of
    your own code it names raises UsageError before anything is imported (pass the recipe to trust it).
    """
    generated_at = now()
    run_dir = Path(run_dir)
    found, checkpoints = _stage_checkpoints(run_dir)
    current, trusted, stale, check_stale, recipe_problem = _recipe_and_staleness(run_dir, found, recipe)
    do_latency, batches, threads, asked_threads = _latency_plan(current, checkpoints, found, latency, threads, batches)
    cache = LatencyCache(run_dir) if do_latency else None
    # what to time: key -> (file, runtime), timed together below
    timed: dict[str, tuple[ModelFile, str]] | None = {} if cache is not None else None
    rows, recipe_name, dataset = _stage_rows(run_dir, checkpoints, found, stale, trusted, timed)
    by_stage = {r["stage"]: r for r in rows}
    _add_teacher_ratios(rows, by_stage.get("teacher"))
    comparisons = _comparisons(run_dir, current, checkpoints, found, rows, by_stage)
    models = {stage.name: stage.model(trusted) for stage in STAGES} if trusted is not None else {}
    artifacts = _artifact_rows(run_dir, by_stage, models, timed)
    if cache is not None:
        _time_latency(cache, timed, batches, threads, rows, artifacts)
    for comp in comparisons:
        comp["latency_ratio"] = latency_ratios(by_stage[comp["against"]], by_stage[comp["stage"]])
    report = {
        "schema_version": SCHEMA_VERSION,
        "generated_at": generated_at,
        "run_name": recipe_name,
        "recipe": recipe_name,
        "dataset": dataset,
        "input": _input_record(checkpoints, found),
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
        "budget": budget_block(checkpoints.get("pruned")),  # prune.budget: its target and what was reached
        "artifacts": artifacts,
        "sensitivity": _sensitivity_block(run_dir),
        "recipe_resolved": _resolved_recipe(run_dir, checkpoints, found),
        "environment": _environment(
            checkpoints, threads if do_latency else None, cache.measured_at() if cache is not None else None
        ),
    }
    report["warnings"] = report_warnings(report)
    return report


def _sensitivity_block(run_dir: Path) -> dict | None:
    """``kdc sensitivity``'s record of the run (sensitivity.json) for the report, or None when there is none.

    Its data as written, plus ``unit`` (channels or weights) and ``stale``: whether the distilled checkpoint
    changed since it was measured (None when there is no distilled checkpoint to compare with). A damaged file
    gives ``{"problem": why}`` instead: the report still gets written.
    """
    try:
        found = load_sensitivity(run_dir, None)
    except KdcError as exc:
        return {"problem": _relative(str(exc), run_dir)}
    if found is None:
        return None
    try:
        current = read_manifest(checkpoint_path(run_dir, SOURCE_STAGE)).get("fingerprint")
    except KdcError:
        current = None
    return {
        **found.to_dict(),
        "unit": found.unit,
        "stale": None if current is None else current != found.source_fingerprint,
    }


TEXT_LIMIT = 500  # characters of a text a checkpoint gives the report (data: a file cannot fill the report)


def _input_record(checkpoints: dict, found: list[str]) -> dict | None:
    """How the run's images became the models' input, from the first stage checkpoint's ``preprocess`` entry:
    channels (PIL mode) and why, input shape, normalisation (how chosen, mean, std) and resize; None when no
    checkpoint records a known transform. The entry is data: each value is checked, a wrong one left out."""

    def text(value):
        return value[:TEXT_LIMIT] if isinstance(value, str) else None

    def numbers(value, kind=(int, float)):
        ok = isinstance(value, list) and 0 < len(value) <= 4
        return (
            [v for v in value] if ok and all(isinstance(v, kind) and not isinstance(v, bool) for v in value) else None
        )

    for stage in found:
        info = checkpoints[stage].get("preprocess")
        if not isinstance(info, dict) or info.get("known") is not True:
            continue
        resize = info.get("resize")
        resize = (
            {"size": numbers(resize.get("size"), int), "method": text(resize.get("method"))}
            if isinstance(resize, dict)
            else None
        )
        return {
            "channels": text(info.get("channels")),
            "channels_why": text(info.get("channels_why")),
            "input_shape": numbers(info.get("input_shape"), int),
            # built-in sets record no 'normalize': theirs are the fixed statistics of their training split
            "normalize": text(info.get("normalize")) or "dataset",
            "mean": numbers(info.get("mean")),
            "std": numbers(info.get("std")),
            "resize": resize,
        }
    return None


def _stage_checkpoints(run_dir: Path) -> tuple[list[str], dict[str, dict]]:
    """The stages whose checkpoint ``run_dir`` holds, in stage order, and each checkpoint loaded (its recipe
    checked); KdcError when there is none."""
    found = [s for s in STAGE_ORDER if checkpoint_path(run_dir, s).is_file()]
    if not found:
        raise UsageError(
            f"no stage checkpoints in {run_dir} (looked for {', '.join(f'{s}/model.pt' for s in STAGE_ORDER)}); "
            f"run `kdc run RECIPE` first, or pass the run directory (runs/<recipe name>)"
        )
    checkpoints = {stage: _with_checked_recipe(load_checkpoint(checkpoint_path(run_dir, stage))) for stage in found}
    return found, checkpoints


def _recipe_and_staleness(
    run_dir: Path, found: list[str], recipe: Recipe | None
) -> tuple[Recipe | None, Recipe | None, dict[str, str | None], bool, str | None]:
    """(the run's recipe.yaml or None, the recipe whose models are built, per stage why it is stale or None,
    whether staleness was checked, why it could not be).

    ``recipe``: the one the user gave (trusted); else recipe.yaml, which is data: a model of the user's own code
    it names is refused before anything is imported, and a file it names outside the run is not read.
    """
    current, recipe_problem = _run_recipe(run_dir)
    check_stale = current is not None
    if recipe is None and current is not None:
        refuse_untrusted_code(current, recipe_path(run_dir), MODEL_KEYS, file_keys=(), instead="")
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
    return current, trusted, stale, check_stale, recipe_problem


def _latency_plan(
    current: Recipe | None,
    checkpoints: dict,
    found: list[str],
    latency: bool | None,
    threads: int | None,
    batches: list[int] | None,
) -> tuple[bool, list[int], int, int]:
    """(measure latency?, batch sizes, threads used, threads asked): the arguments given, else the run's
    recipe.yaml (``report`` section), else the last stage's checkpoint's."""
    # one setting for every stage, so that their latencies compare: the run's, else the last stage's
    if current is not None:
        section = recipe_to_dict(current.report)
    else:
        section = checkpoints[found[-1]].get("recipe", {}).get("report", {})
    do_latency, asked_batches, asked_threads = latency_settings(section)
    do_latency = do_latency if latency is None else latency
    batches = [int(b) for b in (batches or asked_batches)]
    asked_threads = asked_threads if threads is None else int(threads)
    threads = max(1, min(asked_threads, available_cores()))
    return do_latency, batches, threads, asked_threads


def _stage_rows(
    run_dir: Path,
    checkpoints: dict,
    found: list[str],
    stale: dict[str, str | None],
    trusted: Recipe | None,
    timed: dict[str, tuple[ModelFile, str]] | None,
) -> tuple[list[dict], str | None, str | None]:
    """(one row per stage, the run's name, its dataset). Each stage's model is built from its checkpoint (the
    model ``trusted`` names for it, if any) and, with ``timed``, its checkpoint added to what is timed."""
    rows = []
    recipe_name = dataset = None
    dense_student = None  # the distilled model: what structured pruning removed channels from
    for stage in found:
        ckpt = checkpoints[stage]
        written = ckpt.get("recipe", {})
        recipe_name = recipe_name or written.get("run", {}).get("name")
        dataset = dataset or ckpt.get("dataset")
        expected = stage_named(stage).model(trusted) if trusted is not None else None
        name = ckpt["arch"].get("model")  # not yet checked: build_from_checkpoint refuses a damaged spec
        if stale[stage] and isinstance(name, str) and not names_user_code(name):
            expected = None  # an out-of-date stage may be of a built-in model the recipe no longer names: no code
        model = build_from_checkpoint(ckpt, where=f"{stage} checkpoint", expected=expected)
        model.eval()
        if timed is not None:
            sha = read_manifest(checkpoint_path(run_dir, stage))["sha256"]  # checked against the file on loading
            source = ModelFile("checkpoint", str(checkpoint_path(run_dir, stage)), sha, expected, f"{stage} checkpoint")
            timed[f"stage {stage}"] = (source, f"torch {torch.__version__}")
        structured = stage == "pruned" and ckpt["metrics"].get("channel_sparsity") is not None
        if structured and dense_student is None:  # no distilled checkpoint: the plain architecture is its shape
            dense_student = build_model(ckpt["arch"], where=f"{stage} checkpoint")
        rows.append(_stage_row(run_dir, stage, ckpt, model, stale[stage], structured, dense_student))
        if stage == "distilled":
            dense_student = model
    return rows, recipe_name, dataset


def _stage_row(
    run_dir: Path, stage: str, ckpt: dict, model, stale: str | None, structured: bool, dense_student
) -> dict:
    """A stage's row: what its checkpoint recorded and what its ``model`` measures (latency filled in later)."""
    written = ckpt.get("recipe", {})
    metrics = ckpt["metrics"]
    prune = written.get("prune", {})
    shape = tuple(ckpt["arch"]["input_shape"])
    weights = prunable_weights(model, prune.get("include", ["*"]), prune.get("exclude", []))
    accuracy = float(metrics["test_accuracy"])
    test_samples = metrics.get("test_samples")  # checkpoints from before it was recorded lack it
    num_classes = ckpt["arch"].get("num_classes")
    curve = _curve(run_dir, stage, ckpt)
    return {
        "stage": stage,
        "description": DESCRIPTIONS[stage],
        "model": ckpt["arch"]["model"],
        "stale": _relative(stale, run_dir),
        "accuracy": accuracy,
        "accuracy_se": accuracy_se(accuracy, test_samples),
        "test_samples": test_samples,
        "test_loss": metrics.get("test_loss"),
        "train_accuracy": curve[-1]["train_accuracy"] if curve else None,
        "num_classes": num_classes,
        "chance_accuracy": 1.0 / num_classes if num_classes else None,
        "has_batchnorm": has_batchnorm(model),
        "epochs": metrics.get("epochs"),
        "settings": stage_settings(stage, written, metrics, ckpt.get("arch")),
        "params": count_params(model),
        "nonzero_params": count_nonzero(model),
        "sparsity": weight_sparsity({k: v.detach() for k, v in weights.items()}),
        # structured pruning: the share of prunable channels removed (their weights are gone, not zero)
        "channel_sparsity": metrics.get("channel_sparsity"),
        "target_sparsity": metrics.get("target_sparsity"),
        "checkpoint_bytes": (checkpoint_path(run_dir, stage)).stat().st_size,
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


def _add_teacher_ratios(rows: list[dict], teacher: dict | None) -> None:
    """Each row's non-zero and bytes ratios and accuracy change against the teacher's row (None without one)."""
    for row in rows:
        if teacher is not None:
            row["nonzero_ratio_vs_teacher"] = teacher["nonzero_params"] / max(1, row["nonzero_params"])
            row["compression_vs_teacher"] = row["nonzero_ratio_vs_teacher"]  # the old name of the same ratio
            row["bytes_ratio_vs_teacher"] = teacher["checkpoint_bytes"] / max(1, row["checkpoint_bytes"])
            row["accuracy_change_vs_teacher"] = row["accuracy"] - teacher["accuracy"]
        else:
            row["nonzero_ratio_vs_teacher"] = row["compression_vs_teacher"] = None
            row["bytes_ratio_vs_teacher"] = row["accuracy_change_vs_teacher"] = None


def _comparisons(
    run_dir: Path, current: Recipe | None, checkpoints: dict, found: list[str], rows: list[dict], by_stage: dict
) -> list[dict]:
    """The COMPARISONS of the stages found, with their statistics over the seeds when the run has several."""
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
    return comparisons


def _time_latency(
    cache: LatencyCache,
    timed: dict[str, tuple[ModelFile, str]],
    batches: list[int],
    threads: int,
    rows: list[dict],
    artifacts: list[dict],
) -> None:
    """Each stage's and artifact's latency, from ``cache`` or timed now, into its row; the cache saved."""
    # every stage and artifact at once: those timed now share their rounds, so their ratios hold
    timings = cache.time(timed, batches, threads)
    for row in rows:
        set_latency(row, timings.get(f"stage {row['stage']}"))
    for row in artifacts:
        set_latency(row, timings.get(f"artifact {row['path']}"))
    cache.save()


def _add_seed_statistics(run_dir: Path, seeds: list[int], rows: list[dict], comparisons: list[dict]) -> None:
    """Each stage's accuracy over the seeds of ``kdc run --seeds`` and each comparison's difference per seed.

    The first seed's run is ``run_dir``, seed s's ``run_dir/seeds/seed-<s>`` (:func:`kdcompress.run.seeds.seed_run_dirs`);
    a seed whose checkpoint is missing (an interrupted run) is left out. A row's ``trained_once`` says that every
    seed holds the same checkpoint (the teacher, pinned to the first seed): its spread is not seed noise.
    A comparison's ``seeds`` holds the per-seed differences, their mean, sample std and standard error
    std / sqrt(n), and whether the mean is above ``NOISE_Z`` times that error.
    """
    dirs = seed_run_dirs(run_dir, seeds)
    per_seed: dict[str, dict[int, float]] = {}
    for row in rows:
        stage = row["stage"]
        found, fingerprints = {}, set()
        for seed, folder in dirs.items():
            path = checkpoint_path(folder, stage)
            if not path.is_file():
                continue
            ckpt = load_checkpoint(path)
            found[seed] = row["accuracy"] if folder == run_dir else float(ckpt["metrics"]["test_accuracy"])
            fingerprints.add(ckpt.get("fingerprint"))
        per_seed[stage] = found
        mean, std = mean_std(list(found.values()))
        row["seeds"] = [{"seed": seed, "accuracy": acc} for seed, acc in found.items()]
        row["accuracy_mean"], row["accuracy_std"] = mean, std
        row["trained_once"] = len(fingerprints) == 1 and len(found) > 1
    for comp in comparisons:
        first, second = per_seed.get(comp["against"], {}), per_seed.get(comp["stage"], {})
        common = [seed for seed in second if seed in first]
        if not common:
            continue
        differences = [second[seed] - first[seed] for seed in common]
        mean, std = mean_std(differences)
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
    try:
        recorded = read_artifacts(run_dir)
    except KdcError as exc:
        return [{"path": f"{EXPORT_DIR}/{ARTIFACTS_FILE}", "refused": _relative(str(exc), run_dir)}]
    return [_artifact_row(run_dir, found, by_stage, models, timed) for found in recorded]


def _artifact_row(
    run_dir: Path,
    found: dict,
    by_stage: dict,
    models: dict[str, str] | None,
    timed: dict[str, tuple[ModelFile, str]] | None,
) -> dict:
    """The row of one file ``found`` in ``export/artifacts.json`` (see :func:`_artifact_rows`)."""
    teacher = by_stage.get("teacher")
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
            "int8_search",
        )
    }
    row["refused"] = row["stale"] = None
    row["latency_ms"] = row["latency"] = None
    try:  # a row that points out of the run directory would show another run's file as this run's
        path = confined_path(run_dir, found["path"], f"{EXPORT_DIR}/{ARTIFACTS_FILE}")
        manifest, _ = verify_artifact(path)
    except KdcError as exc:
        row["refused"] = _relative(str(exc), run_dir)
        return row
    row["bytes"] = manifest["bytes"]
    row["accuracy_se"] = accuracy_se(row["accuracy"], row["test_samples"]) if row["accuracy"] is not None else None
    source = by_stage.get(row["stage"])
    if source is not None:
        row["compression_vs_stage"] = source["checkpoint_bytes"] / max(1, row["bytes"])
        try:
            current = read_manifest(checkpoint_path(run_dir, row["stage"])).get("fingerprint")
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
        return row
    except KdcError as exc:  # its runtime (onnxruntime) is not installed
        row["latency_problem"] = _relative(str(exc), run_dir)
        model = None
    if timed is not None and model is not None:
        timed[f"artifact {row['path']}"] = _artifact_file(row, path, manifest, model, models)
    return row


def _artifact_file(
    row: dict, path: Path, manifest: dict, model, models: dict[str, str] | None
) -> tuple[ModelFile, str]:
    """A loaded artifact as a file to time, with its runtime's version (torch, or onnxruntime for a session)."""
    runtime = f"torch {torch.__version__}"
    if hasattr(model, "set_threads"):  # an onnxruntime session: its version goes into the cache key
        runtime = f"onnxruntime {_version_of('onnxruntime')}"
    expected = (models or {}).get(str(row["stage"]))
    return (
        ModelFile("artifact", str(path), manifest["sha256"], expected, f"artifact {row['path']}"),
        runtime,
    )


def _version_of(package: str) -> str | None:
    """An installed package's version, None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
