"""The version of kdcompress, in a module of its own so that any module can import it without the package root."""

__version__ = "0.1.0"

__all__ = ["__version__"]
