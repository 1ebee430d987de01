"""kdcompress: knowledge distillation and pruning from one YAML recipe (command: ``kdc``).

``kdcompress.load_model(path)`` returns a trained stage's model (eval mode) and
the ``preprocess`` callable that feeds it; see :mod:`kdcompress.loading`.
"""

from ._version import __version__

__all__ = ["__version__", "load_model"]


def __getattr__(name: str):
    # imported on first use, so that `import kdcompress` (and the CLI's start) does not pay for torch
    if name == "load_model":
        from .loading import load_model

        globals()["load_model"] = load_model  # later look-ups find it without coming here
        return load_model
    raise AttributeError(f"module 'kdcompress' has no attribute {name!r}")
