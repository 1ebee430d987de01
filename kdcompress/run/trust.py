"""What kdc trusts: the recipe you give it and the code that recipe names; a run directory is data.

A recipe is code its user chose to run: ``model: mynets:build`` imports ``mynets`` and calls ``build``.
Everything in a run directory or an artifact was written by whoever could write there, so:

* a model name in a checkpoint or an artifact is only compared with the recipe's
  (:func:`kdcompress.models.check_model_name`), never imported on its own say-so;
* a run directory is never on the import path (``load_recipe(..., import_folder=False)``);
* a run directory's own ``recipe.yaml`` (``kdc prune runs/NAME``) gives the settings to go on with, but
  the code it names (:data:`kdcompress.recipe.CODE_KEYS`) is imported, and a file outside the run it names
  (``teacher.checkpoint``) is read, only when you say so (``--trust-code``): it is read with
  ``load_recipe(..., import_code=False)``, then :func:`refuse_untrusted_code`.

Example::

    >>> from kdcompress.recipe import recipe_from_dict
    >>> code_names(recipe_from_dict({"student": {"model": "mynets:build"}, "data": {"dataset": "imagefolder:pets"}}))
    [('student.model', 'mynets:build')]
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ..names import names_user_code
from ..recipe import CODE_KEYS, Recipe

__all__ = ["MODEL_KEYS", "FILE_KEYS", "code_names", "outside_files", "refuse_untrusted_code"]

MODEL_KEYS = ("teacher.model", "student.model")  # what a report builds: it reads no data and computes no loss
# recipe values that name a file kdc reads: from a run directory's recipe.yaml, one outside that run could
# carry the weights of any model of yours into a folder others can read (a supplied teacher is copied there)
FILE_KEYS = ("teacher.checkpoint",)


def code_names(recipe: Recipe, keys=tuple(CODE_KEYS)) -> list[tuple[str, str]]:
    """``(key, import path)`` for each of ``keys`` whose value in ``recipe`` names your own code.

    Built-in names, ``torchvision:NAME`` and ``imagefolder:PATH`` name none.
    """
    found = []
    for key in keys:
        section, _, name = key.partition(".")
        value = getattr(getattr(recipe, section), name)
        if names_user_code(value, CODE_KEYS[key]):
            found.append((key, value))
    return found


def outside_files(recipe: Recipe, run_dir: str | Path, keys=FILE_KEYS) -> list[tuple[str, str]]:
    """``(key, path)`` for each of ``keys`` whose value in ``recipe`` is a file outside ``run_dir``."""
    inside = Path(run_dir).resolve()
    found = []
    for key in keys:
        section, _, name = key.partition(".")
        value = getattr(getattr(recipe, section), name)
        if value and not Path(value).resolve().is_relative_to(inside):
            found.append((key, str(value)))
    return found


INSTEAD = ", or give your recipe file instead of the run directory"  # for commands that take a recipe too


def refuse_untrusted_code(
    recipe: Recipe, recipe_file: str | Path, keys=tuple(CODE_KEYS), file_keys=FILE_KEYS, instead: str = INSTEAD
) -> None:
    """UsageError (exit 2) when ``recipe``, read from a run directory's ``recipe_file``, names code to import
    or (``file_keys``) a file outside that run directory to read.

    Raised before anything is imported or read. ``keys`` are the values that count (the report builds models
    only and reads no teacher file; the CLI leaves out a key the user set with ``--set``, which is their own
    word). ``instead`` ends the advice: what else the command takes (nothing else, for ``kdc report``).
    """
    run_dir = Path(recipe_file).parent
    names = code_names(recipe, keys)
    if names:
        listed = " and ".join(f"'{value}' ({key})" for key, value in names)
        raise UsageError(
            f"{recipe_file} names your own code {listed}; a run directory is data, so kdc imports code it names "
            f"only when you say so: pass --trust-code if you trust {run_dir}{instead}"
        )
    files = outside_files(recipe, run_dir, file_keys)
    if files:
        listed = " and ".join(f"{path} ({key})" for key, path in files)
        raise UsageError(
            f"{recipe_file} names {listed}, a file outside the run; a run directory is data, so kdc reads the files "
            f"outside it that it names only when you say so: pass --trust-code if you trust {run_dir}{instead}"
        )
