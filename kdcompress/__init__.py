"""kdcompress: knowledge distillation and pruning from one YAML recipe (command: ``kdc``)."""

__version__ = "0.1.0"

__all__ = ["__version__"]
