"""Errors that kdc reports to a person as one clear message.

Library code raises a :class:`KdcError` (or a subclass) whenever the cause is
something the user can fix: a recipe value, a missing file, a stage run out of
order. The CLI prints ``str(error)`` without a traceback and exits with
``error.exit_code``. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "describe",
    "did_you_mean",
    "KdcError",
    "RecipeError",
    "Problem",
    "DataError",
    "ModelError",
    "StageOrderError",
    "CheckpointError",
    "ArtifactError",
    "ScheduleError",
    "MissingPackageError",
    "UsageError",
    "RunLockedError",
]


def did_you_mean(word, choices, prefix: str = "") -> str:
    """``"; did you mean 'PREFIX<closest choice>'?"`` for a misspelt name, or ``""`` when nothing is close.

    >>> did_you_mean("mpl", ["mlp", "cnn"])
    "; did you mean 'mlp'?"
    """
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def describe(exc: BaseException, limit: int = 200) -> str:
    """First line of an exception's message (its type name when the message is empty), for error texts."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


class KdcError(Exception):
    """A user-fixable problem: what went wrong, where, and how to fix it."""

    exit_code = 1


@dataclass(frozen=True)
class Problem:
    """One problem found in a recipe: the key path, its YAML line and a message."""

    path: str
    message: str
    line: int | str | None = None  # a YAML line, or the --set override the value came from

    def __str__(self) -> str:
        where = self.path or "(top level)"
        if isinstance(self.line, str):
            where += f" (from {self.line})"
        elif self.line is not None:
            where += f" (line {self.line})"
        return f"{where}: {self.message}"


class RecipeError(KdcError):
    """A recipe that cannot be used; holds every problem found, not just the first."""

    exit_code = 2

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = list(problems)
        count = len(self.problems)
        head = f"{source}: {count} problem{'s' if count != 1 else ''} in the recipe"
        body = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{head}\n{body}")


class DataError(KdcError):
    """A dataset that cannot be found, read or used."""

    exit_code = 2


class ModelError(KdcError):
    """A model that cannot be built from its recipe entry."""

    exit_code = 2


class StageOrderError(KdcError):
    """A stage was asked for before the stage it depends on has run."""

    exit_code = 2


class CheckpointError(KdcError):
    """A checkpoint that is missing, corrupt, unsafe or from an incompatible version."""

    exit_code = 2


class ArtifactError(CheckpointError):
    """An export artifact is missing, damaged or not one kdc wrote."""


class ScheduleError(KdcError):
    """A pruning schedule that does not fit in its retraining (see :func:`kdcompress.prune.plan_schedule`)."""

    exit_code = 2


class MissingPackageError(KdcError):
    """The recipe asks for something that needs an optional package which is not installed."""

    exit_code = 2


class UsageError(KdcError):
    """Command-line arguments that cannot work together or name nothing (a missing run directory, a bad option)."""

    exit_code = 2


class RunLockedError(KdcError):
    """Another kdc process is writing the run directory (see :mod:`kdcompress.run.lock`)."""

    exit_code = 2
