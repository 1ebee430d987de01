"""What a stage body works with: the stage context (recipe, data, device, where to write) and the trained
models of earlier stages, loaded from their checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from ..checkpoint import load_checkpoint
from ..data import DataSplits
from ..models import build_from_checkpoint
from ..progress import RunProgress
from ..recipe import Recipe
from .layout import checkpoint_path
from .stages import stage_named

__all__ = ["StageContext", "load_stage_model"]


@dataclass
class StageContext:
    """What every stage function gets: the recipe, the data and where to write."""

    recipe: Recipe
    stage: str
    data: DataSplits
    device: torch.device
    console: Console
    log_path: Path  # the running log (RUNNING_LOG); metrics.jsonl is written with the checkpoint
    state_path: Path
    tag: str
    progress: RunProgress | None = None  # the run's, so the time left covers the stages to come


def load_stage_model(recipe: Recipe, stage: str, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """A stage's trained model, on ``device``, and its architecture spec.

    Only the model ``recipe`` names for the stage is built: a checkpoint naming another is refused.
    """
    ckpt = load_checkpoint(checkpoint_path(recipe.run_dir, stage))
    model = build_from_checkpoint(ckpt, where=f"{stage} checkpoint", expected=stage_named(stage).model(recipe))
    return model.to(device), ckpt["arch"]
