"""Names a recipe gives, and what they stand for: the built-in name tables, import paths, "did you mean".

A model, dataset or loss is named by a built-in name (:data:`MODEL_NAMES`, :data:`DATASET_NAMES`,
:data:`LOSS_NAMES`; the components that build them hold the same names, which a test checks), by
``torchvision:NAME`` or ``imagefolder:PATH``, or by an import path ``package.module:factory`` to the user's
own code. Import paths are looked up as ``python -m`` would: in the current directory and in the folders of
the recipes loaded (:func:`add_import_dir`), then on ``sys.path``. The ``*_problem`` functions say why a name
stands for nothing (None when it stands for something) without building anything, so recipe validation
needs no component; ``imagefolder:PATH`` is checked by listing its folders. This module imports no torch::

    >>> model_name_problem("mpl")
    "unknown model 'mpl'; did you mean 'mlp'? (built-in: mlp, cnn, lenet5; also torchvision:NAME, or package.module:factory for your own)"
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import os
import pkgutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import ModelError, describe, did_you_mean

__all__ = [
    "MODEL_NAMES",
    "DATASET_NAMES",
    "LOSS_NAMES",
    "BAD_FILES_NAMED",
    "names_user_code",
    "add_import_dir",
    "import_dirs",
    "saved_import_dirs",
    "find_factory",
    "import_factory",
    "model_name_problem",
    "unknown_model",
    "torchvision_name_problem",
    "dataset_name_problem",
    "unknown_dataset",
    "imagefolder_dirs",
    "imagefolder_problem",
    "class_folders",
    "loss_name_problem",
]

# The built-in names, in the order messages list them: kdcompress.models.BUILTIN_MODELS,
# kdcompress.data.DATASETS and kdcompress.distill.LOSSES hold what each one stands for.
MODEL_NAMES: tuple[str, ...] = ("mlp", "cnn", "lenet5")
DATASET_NAMES: tuple[str, ...] = ("fashion-mnist-mini", "fashion-mnist", "mnist")
LOSS_NAMES: tuple[str, ...] = ("kd", "dkd")
BAD_FILES_NAMED = 10  # a message names this many unreadable files, then counts the rest


def names_user_code(name: str, prefixes: tuple[str, ...] = ("torchvision",)) -> bool:
    """Whether a name is an import path (``package.module:factory``): using it imports and runs the user's code.

    ``prefixes`` are the ``NAME:`` forms that are not import paths: ``torchvision:`` for models (the default),
    ``imagefolder:`` for datasets, none for losses.

        >>> names_user_code("mypkg.nets:build"), names_user_code("torchvision:resnet18"), names_user_code("mlp")
        (True, False, False)
        >>> names_user_code("imagefolder:data/pets", prefixes=("imagefolder",))
        False
    """
    return ":" in name and name.partition(":")[0] not in prefixes


# Folders of the recipes loaded in this process, newest first: their import paths find modules beside them.
_IMPORT_DIRS: list[str] = []
_ADDED_TO_SYS_PATH: set[str] = set()  # the folders kdc put on sys.path (it moves only these)


def add_import_dir(folder: str | os.PathLike) -> None:
    """Let import paths (``mynets:build``) find modules in ``folder``; load_recipe adds the recipe's folder.

    Example: ``add_import_dir("experiments")`` and then ``model: mynets:build``
    imports ``experiments/mynets.py``.
    """
    path = str(Path(folder).resolve())
    if path in _IMPORT_DIRS:
        _IMPORT_DIRS.remove(path)
    _IMPORT_DIRS.insert(0, path)


def import_dirs() -> list[str]:
    """The folders :func:`add_import_dir` gave this process, newest first (for a child process to find the same
    modules)."""
    return list(_IMPORT_DIRS)


@contextlib.contextmanager
def saved_import_dirs(clear: bool = False) -> Iterator[None]:
    """Put the folders :func:`add_import_dir` gave this process (and which of them kdc put on ``sys.path``)
    back as they were on leaving; ``clear`` starts with none. For tests and tools that load many recipes::

        >>> with saved_import_dirs(clear=True):
        ...     add_import_dir("experiments")
        >>> "experiments" in " ".join(import_dirs())
        False
    """
    dirs, added = list(_IMPORT_DIRS), set(_ADDED_TO_SYS_PATH)
    if clear:
        _IMPORT_DIRS.clear()
        _ADDED_TO_SYS_PATH.clear()
    try:
        yield
    finally:
        _IMPORT_DIRS[:] = dirs
        _ADDED_TO_SYS_PATH.clear()
        _ADDED_TO_SYS_PATH.update(added)


def _search_dirs() -> list[str]:
    """The current directory, then the recipes' folders (as ``python -m`` puts the current directory first)."""
    dirs = []
    for folder in [os.getcwd(), *_IMPORT_DIRS]:
        if folder not in dirs and os.path.isdir(folder):
            dirs.append(folder)
    return dirs


def _import_module(module_name: str):
    """Import ``module_name``, looking in :func:`_search_dirs` first, then on ``sys.path``."""
    dirs = [d for d in _search_dirs() if d not in sys.path or d in _ADDED_TO_SYS_PATH]
    for folder in dirs:
        while folder in sys.path:
            sys.path.remove(folder)
    sys.path[:0] = dirs
    _ADDED_TO_SYS_PATH.update(dirs)
    importlib.invalidate_caches()  # a module written since the folder was last listed must be found
    try:
        return importlib.import_module(module_name)
    finally:
        # The folders move to the end of sys.path rather than leave it: a factory may import a sibling module
        # only when called, and DataLoader workers started with spawn unpickle datasets by module name. At the
        # end they can no longer shadow anything installed.
        for folder in dirs:
            if folder in sys.path:
                sys.path.remove(folder)
            sys.path.append(folder)


def find_factory(
    path: str, prefixes: tuple[str, ...] = ("torchvision",)
) -> tuple[Callable[..., Any] | None, str | None]:
    """(the factory an import path names, None) or (None, why not): one mechanism for models and datasets.

    ``prefixes`` are the ``NAME:`` forms that are not import paths (``torchvision:`` for models,
    ``imagefolder:`` for datasets): a module name close to one of them is most likely that one misspelt.
    """
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        return None, f"'{path}' is not an import path; write package.module:factory"
    try:
        module = _import_module(module_name)
    except Exception as exc:
        top = module_name.split(".")[0]
        if isinstance(exc, ModuleNotFoundError) and exc.name == top:  # the module itself, not one it imports
            local = [m.name for m in pkgutil.iter_modules(_search_dirs())]
            close = difflib.get_close_matches(top, [*prefixes, *local], n=1)
            if close:
                return None, (
                    f"cannot import '{module_name}' ({type(exc).__name__}: {exc}); did you mean "
                    f"'{close[0]}{module_name[len(top) :]}:{attr}'?"
                )
        return None, (
            f"cannot import '{module_name}' ({type(exc).__name__}: {exc}); check the name and that the module is "
            f"installed, or a .py file (or package) in the current directory or the recipe's"
        )
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(module) if not n.startswith("_")]
            return None, f"module '{module_name}' has no attribute '{attr}'{did_you_mean(part, names)}"
        obj = getattr(obj, part)
    if not callable(obj):
        return None, f"'{path}' is not callable; point it at a function or class that builds it"
    return obj, None


def import_factory(path: str, where: str, prefixes: tuple[str, ...] = ("torchvision",)) -> Callable[..., Any]:
    """The factory an import path names (see :func:`find_factory`); ModelError naming ``where`` when none."""
    factory, error = find_factory(path, prefixes)
    if error:
        raise ModelError(f"{where}: {error}")
    return factory


def model_name_problem(name: str) -> str | None:
    """Why ``name`` names no model, or None when it does; builds nothing.

    The message is the one :func:`kdcompress.models.build_model` raises, without the section.
    An import path is imported (torchvision only for ``torchvision:NAME``)::

        >>> model_name_problem("mpl")
        "unknown model 'mpl'; did you mean 'mlp'? (built-in: mlp, cnn, lenet5; also torchvision:NAME, or package.module:factory for your own)"
    """
    if name.startswith("torchvision:"):
        return torchvision_name_problem(name.split(":", 1)[1])
    if ":" in name:
        return find_factory(name, ("torchvision",))[1]
    return None if name in MODEL_NAMES else unknown_model(name)


def unknown_model(name: str) -> str:
    """The message for a model name that is neither built in nor ``NAME:``-shaped; a torchvision model's name
    (``resnet50``) is pointed to ``torchvision:resnet50``."""
    hint = did_you_mean(name, MODEL_NAMES)
    if name.isidentifier() and torchvision_name_problem(name) is None:
        hint = f"; did you mean 'torchvision:{name}'?"
    return (
        f"unknown model '{name}'{hint} (built-in: {', '.join(MODEL_NAMES)}; also torchvision:NAME, "
        f"or package.module:factory for your own)"
    )


def torchvision_name_problem(name: str) -> str | None:
    """Why torchvision has no classification model ``name`` (with the closest one it has), or None."""
    from torchvision import models as tvm  # only here: importing torchvision takes a second or two

    available = tvm.list_models(module=tvm)
    if name in available:
        return None
    return f"torchvision has no classification model '{name}'{did_you_mean(name, available, 'torchvision:')}"


def dataset_name_problem(name: str) -> str | None:
    """Why ``name`` names no dataset, or None when it does; reads no data.

    The message is the one loading the dataset raises, without ``data.dataset:``.
    ``imagefolder:PATH`` needs its folders; an import path is imported::

        >>> dataset_name_problem("fashion-mnst")
        "unknown dataset 'fashion-mnst'; did you mean 'fashion-mnist'? (known: fashion-mnist-mini, fashion-mnist, mnist; also imagefolder:PATH, or package.module:factory for your own)"
    """
    if name.startswith("imagefolder:"):
        return imagefolder_problem(name)
    if ":" in name:  # package.module:factory, read through a DataLoader
        return find_factory(name, ("imagefolder",))[1]
    return None if name in DATASET_NAMES else unknown_dataset(name)


def unknown_dataset(name: str) -> str:
    """The message for a dataset name that is neither built in nor ``NAME:``-shaped."""
    return (
        f"unknown dataset '{name}'{did_you_mean(name, DATASET_NAMES)} (known: {', '.join(DATASET_NAMES)}; also imagefolder:PATH, or "
        f"package.module:factory for your own)"
    )


def imagefolder_dirs(name: str) -> tuple[tuple[Path, Path] | None, str | None]:
    """((train folder, test folder), None) for ``imagefolder:PATH``, or (None, why not)."""
    root = Path(name.split(":", 1)[1]).expanduser()
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        return None, f"{name} needs {root}/train/<class>/*.png and {root}/test/<class>/... (or val/); not found"
    return (root / "train", test_dir), None


def class_folders(folder: Path) -> list[str]:
    """The class folders of one split, as torchvision's ImageFolder finds them: every sub-folder, sorted."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def _quoted(names, limit: int = BAD_FILES_NAMED) -> str:
    names = sorted(names)
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def imagefolder_problem(name: str) -> str | None:
    """Why ``imagefolder:PATH`` cannot be used as its folders stand, or None; lists folders, reads no image.

    The held-out split (``test/``, else ``val/``) must hold the same class folders as
    ``train/``: labels are numbered from train's sorted class names, and a class missing
    from one split would shift every later label of the other (torchvision numbers each
    split on its own).
    """
    dirs, error = imagefolder_dirs(name)
    if error:
        return error
    train_dir, test_dir = dirs
    try:
        train, held = class_folders(train_dir), class_folders(test_dir)
    except OSError as exc:
        return f"{name}: cannot list its class folders: {describe(exc)}"
    if not train:
        return f"{name}: {train_dir} has no class folders; put each class's images in {train_dir}/<class>/"
    missing, extra = set(train) - set(held), set(held) - set(train)
    if not missing and not extra:
        return None
    differences = []
    if missing:
        differences.append(f"{test_dir} lacks {_folders(missing)}, which {train_dir} has")
    if extra:
        differences.append(f"{test_dir} has {_folders(extra)}, which {train_dir} lacks")
    return (
        f"{name}: its splits hold different classes: {'; '.join(differences)}. Labels are numbered from the class "
        f"folders of {train_dir}, so every split needs the same ones: add the missing folders with their images, or "
        f"remove the extra ones"
    )


def _folders(names) -> str:
    """ "the class folder 'bee'" or "the class folders 'ant', 'bee'", for messages."""
    return f"the class folder{'s' if len(names) != 1 else ''} {_quoted(names)}"


def loss_name_problem(name: str) -> str | None:
    """Why ``name`` names no distillation loss, or None when it does; an import path is imported.

    >>> loss_name_problem("dkdd")
    "unknown loss 'dkdd'; did you mean 'dkd'? (built-in: kd, dkd; or package.module:function for your own)"
    """
    if ":" in name:
        return find_factory(name, ())[1]
    if name in LOSS_NAMES:
        return None
    return (
        f"unknown loss '{name}'{did_you_mean(name, LOSS_NAMES)} (built-in: {', '.join(LOSS_NAMES)}; or "
        f"package.module:function for your own)"
    )
