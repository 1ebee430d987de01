"""``python -m kdcompress`` runs the kdc command line."""

from .cli import entry

entry()
