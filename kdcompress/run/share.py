"""Stages shared between run directories: a stage whose fingerprint matches a finished one elsewhere (another
sweep point, an earlier seed) is not trained again; its checkpoint is hard-linked (copied where links are not
possible) into the run directory that needs it, with the teacher's cached logits."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..checkpoint import read_manifest
from ..errors import CheckpointError
from ..files import manifest_path
from .layout import CACHE_DIR, METRICS_FILE, MODEL_FILE, TEACHER_LOGITS_GLOB, cache_dir, checkpoint_path, stage_dir
from .stages import STAGES
from .state import stage_fingerprint

__all__ = ["expected_fingerprints", "known_checkpoints", "share_stages"]


def expected_fingerprints(recipe) -> dict[str, str]:
    """The fingerprint each enabled stage of ``recipe`` would have, computed from the recipe alone."""
    found: dict[str, str] = {}
    for stage in STAGES:
        if not stage.enabled(recipe) and stage.name != "teacher":
            continue
        deps = stage.upstream(recipe)
        if any(d not in found for d in deps):
            continue
        found[stage.name] = stage_fingerprint(recipe, stage.name, {d: found[d] for d in deps})
    return found


def known_checkpoints(folders) -> dict[str, Path]:
    """``{fingerprint: stage folder}`` of the finished stage checkpoints in ``folders`` (run directories)."""
    pool: dict[str, Path] = {}
    for folder in folders:
        for stage in STAGES:
            path = checkpoint_path(folder, stage.name)
            try:
                fingerprint = read_manifest(path).get("fingerprint")
            except CheckpointError:
                continue
            if fingerprint:
                pool.setdefault(fingerprint, path.parent)
    return pool


def _link_or_copy(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.link.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(source, tmp)
    except OSError:  # another file system, or links not allowed: a copy does as well
        shutil.copy2(source, tmp)
    os.replace(tmp, dest)


def share_stages(pool: dict[str, Path], expected: dict[str, str], run_dir: Path) -> list[str]:
    """Link into ``run_dir`` every stage checkpoint that another point (or the base run) already made."""
    shared = []
    for stage, fingerprint in expected.items():
        source = pool.get(fingerprint)
        target = stage_dir(run_dir, stage)
        if source is None or source.resolve() == target.resolve():
            continue
        try:
            if read_manifest(target / MODEL_FILE).get("fingerprint") == fingerprint:
                continue  # already there
        except CheckpointError:
            pass
        for name in (MODEL_FILE, METRICS_FILE):
            if (source / name).is_file():
                _link_or_copy(source / name, target / name)
        _link_or_copy(manifest_path(source / MODEL_FILE), manifest_path(target / MODEL_FILE))
        shared.append(stage)
    cache = [folder / CACHE_DIR for folder in {p.parent for p in pool.values()} if (folder / CACHE_DIR).is_dir()]
    for folder in cache:  # the teacher's cached logits are keyed by its checkpoint: any point may reuse them
        for item in folder.glob(TEACHER_LOGITS_GLOB):
            if not (cache_dir(run_dir) / item.name).exists():
                _link_or_copy(item, cache_dir(run_dir) / item.name)
    return shared
