"""The run directory as kdc's own: the run marker (``kdc-run.json``, which says kdc wrote the folder and
in which run format), the check made before writing there, the lock held while writing, and the resolved
``recipe.yaml`` every writer leaves behind."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import yaml

from .._version import __version__
from ..errors import KdcError
from ..files import atomic_write_text
from ..recipe import Recipe, recipe_to_dict
from . import layout
from .layout import LOCK_FILE
from .lock import run_dir_lock

__all__ = ["RUN_FORMAT", "check_run_dir", "lock_run_dir", "mark_run_dir", "write_resolved_recipe"]


RUN_FORMAT = 1  # bump when a run directory's layout changes incompatibly


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run directory written by an incompatible kdc; mark a new one as ours."""
    marker = layout.marker_path(run_dir)
    if marker.is_file():
        try:
            found = json.loads(marker.read_text())
            fmt = found["format"]
        except (OSError, ValueError, KeyError, TypeError):
            raise KdcError(f"{marker} is damaged; delete it (or the whole run directory) and rerun") from None
        if fmt != RUN_FORMAT:
            raise KdcError(
                f"{run_dir} was written by kdc {found.get('kdc_version', '?')} (run format {fmt}); this kdc "
                f"{__version__} reads run format {RUN_FORMAT}. Use another run.name (or run.out_dir), or the kdc "
                f"version that wrote it"
            )
    elif run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        raise KdcError(
            f"{run_dir} exists but was not written by kdc (no {layout.RUN_MARKER}); choose another run.name or "
            f"run.out_dir, or empty it"
        )


@contextlib.contextmanager
def lock_run_dir(run_dir: Path) -> Iterator[None]:
    """Check that ``run_dir`` is kdc's (or new), then hold its lock (:func:`kdcompress.run.lock.run_dir_lock`).

    Checked first so that no lock file goes into a folder kdc did not make; a second kdc writing
    there is refused with RunLockedError (exit 2).
    """
    check_run_dir(Path(run_dir))
    with run_dir_lock(run_dir):
        yield


def mark_run_dir(run_dir: Path) -> None:
    """Write the run marker into ``run_dir`` unless it is there: the folder is kdc's, in this run format."""
    marker = layout.marker_path(run_dir)
    if not marker.is_file():
        atomic_write_text(marker, json.dumps({"format": RUN_FORMAT, "kdc_version": __version__}) + "\n")


def write_resolved_recipe(recipe: Recipe) -> None:
    """Write ``recipe.yaml`` into the run directory: every value ``recipe`` holds, defaults included."""
    text = "# resolved recipe written by kdc: every value, defaults included\n" + yaml.safe_dump(
        recipe_to_dict(recipe), sort_keys=False
    )
    atomic_write_text(layout.recipe_path(recipe.run_dir), text)
