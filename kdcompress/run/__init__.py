"""The run layer: everything that happens inside a run directory, from the stage table to the export.

The stages are declared once (:mod:`.stages`); :mod:`.layout` names every file and folder of a run
directory, :mod:`.lock` keeps one writer there and :mod:`.marker` marks it as kdc's; :mod:`.state` says
whether a stage is up to date (fingerprints, status, resume); :mod:`.pipeline` runs the stages, whose
bodies (:mod:`.bodies`) train through the losses (:mod:`.losses`) and hooks (:mod:`.hooks`) they need;
:mod:`.export` writes the artifacts; :mod:`.checks` checks a recipe before anything trains; :mod:`.seeds`,
:mod:`.sweep` and :mod:`.share` run a recipe several times, training the stages the runs share once
(:mod:`.frontier`: a sweep with every point exported); :mod:`.trust` says what a run directory may make kdc
import or read; :mod:`.sensitivity` measures each prunable group of the distilled student alone
(``kdc sensitivity``). The names below are imported from
their modules on first use, so that the CLI, which reads the stage table as it starts, does not pay for torch.
"""

from __future__ import annotations

import importlib

_HOMES: dict[str, tuple[str, ...]] = {
    "stages": ("Stage", "STAGES", "STAGE_NAMES", "COMMAND_OF", "stage_named"),
    "layout": (
        "MODEL_FILE",
        "RECIPE_FILE",
        "RUN_MARKER",
        "RUNNING_LOG",
        "EXPORT_DIR",
        "ARTIFACTS_FILE",
        "REPORT_KINDS",
        "SWEEP_TABLE",
        "SWEEP_DATA",
        "FRONTIER_DATA",
        "FRONTIER_PAGE",
        "checkpoint_path",
        "recipe_path",
        "marker_path",
        "is_run_dir",
        "report_path",
    ),
    "lock": ("run_dir_lock", "WAIT_ADVICE"),
    "trust": ("MODEL_KEYS", "FILE_KEYS", "code_names", "outside_files", "refuse_untrusted_code"),
    "state": ("Origin", "StageStatus", "stage_status", "stage_fingerprint", "stage_inputs"),
    "marker": ("lock_run_dir",),
    "context": ("load_stage_model",),
    "checks": ("check_recipe", "check_feature_terms"),
    "pipeline": ("run_pipeline", "run_stage"),
    "export": ("EXPORT_WAIT_ADVICE", "export_stage", "read_artifacts"),
    "seeds": ("seed_list", "seed_run_dirs", "run_seeds"),
    "sweep": ("parse_grid", "grid_points", "point_name", "run_sweep"),
    "sensitivity": ("run_sensitivity", "load_sensitivity", "search_split", "sensitivity_key"),
    "frontier": ("FrontierPoint", "budget_grid", "frontier_formats", "point_label", "run_frontier"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = list(_HOME_OF)


def __getattr__(name: str):
    # imported on first use: `kdc --help` reads the stage table, and must not import torch with the pipeline
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
