"""Using a trained checkpoint (issue 8): who can read the files a run writes.

Defect 3: files written through temporary files follow the umask (mkstemp
alone makes them 0600).
"""

from __future__ import annotations

import gzip
import os
import stat

import torch

from kdcompress.checkpoint import atomic_write_text, manifest_path, save_checkpoint, save_state
from kdcompress.data import IDX_FILES, _unpack_gz


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class _umask:
    """Set the process umask for a block, restoring the previous one after."""

    def __init__(self, mask: int):
        self.mask = mask

    def __enter__(self):
        self.old = os.umask(self.mask)

    def __exit__(self, *exc):
        os.umask(self.old)


# --------------------------------------------------------------------------- defect 3: files follow the umask


def test_atomic_writes_follow_the_umask(tmp_path):
    # 0077 guards the other side: following the umask must not make files more open than it allows
    for mask, expected in ((0o022, 0o644), (0o077, 0o600), (0o027, 0o640)):
        folder = tmp_path / oct(mask)
        with _umask(mask):
            atomic_write_text(folder / "report.md", "# report\n")
            save_checkpoint(folder / "model.pt", {"state_dict": {"w": torch.zeros(2)}})
            save_state(folder / "state.pt", {"step": 1})
        names = ("report.md", "model.pt", manifest_path(folder / "model.pt").name, "state.pt")
        assert {n: oct(_mode(folder / n)) for n in names} == {n: oct(expected) for n in names}, oct(mask)


def test_unpacked_dataset_files_follow_the_umask(tmp_path):
    source, raw = tmp_path / "src", tmp_path / "raw"
    source.mkdir()
    for name in IDX_FILES:
        (source / f"{name}.gz").write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\x01\x07"))
    with _umask(0o022):
        _unpack_gz(source, raw)
    assert [_mode(raw / name) for name in IDX_FILES] == [0o644] * 4
