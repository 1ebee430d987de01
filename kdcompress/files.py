"""File mechanics every layer uses: atomic writes, the umask, sidecar manifests' names, SHA-256, temp files.

A file kdc writes is written whole or not at all: to a temporary file beside it (``.<name>.*.tmp``),
flushed to disk, then renamed into place, with the mode a plain ``open()`` would have given it. A failed
write is a :class:`~kdcompress.errors.CheckpointError` that says what was kept. A path read from a file in
a run directory is confined to it (:func:`confined_path`). This module imports no torch. Example::

    >>> atomic_write_text(Path("runs/x/notes.txt"), "hello")  # doctest: +SKIP
    >>> sha256_file(Path("runs/x/notes.txt"))  # doctest: +SKIP
    '2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824'
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path

from .errors import CheckpointError, describe

__all__ = [
    "write_error",
    "follow_umask",
    "write_temp",
    "atomic_write",
    "atomic_write_many",
    "atomic_write_files",
    "atomic_write_bytes",
    "atomic_write_text",
    "append_jsonl",
    "remove_stale_temp_files",
    "manifest_path",
    "confined_path",
    "sha256_file",
    "file_sha256",
    "user_cache_dir",
]


def write_error(path: Path, exc: BaseException, replaced: tuple[Path, ...] = ()) -> CheckpointError:
    """The message for a failed write of ``path``; ``replaced``: files of the same set already renamed into place."""
    if replaced:  # only the rename of a set can fail after some of it is in place: say which files are new
        names = ", ".join(Path(p).name for p in replaced)
        were = "was" if len(replaced) == 1 else "were"
        kept = f"; {names} {were} already replaced, the others keep their previous version"
    else:
        kept = "; the previous version is intact" if Path(path).exists() else ""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else describe(exc)
    return CheckpointError(
        f"could not write {path}: {reason}{kept}. Free some space (or fix permissions) and rerun the same command "
        f"to go on"
    )


def _umask() -> int:
    """The process's umask, read without changing it where the system allows.

    Setting the umask to read it back (``os.umask``) would briefly change it
    for every thread, so on Linux it is read from /proc instead.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(fd: int, path: str | Path) -> None:
    """Give a file made by ``tempfile.mkstemp`` the mode a plain ``open()`` would have given it.

    mkstemp always creates files 0600; renamed into place they would stay
    unreadable to the user's group and others whatever their umask says,
    so teammates on a shared machine could not read a run.
    """
    mode = 0o666 & ~_umask()
    if hasattr(os, "fchmod"):
        os.fchmod(fd, mode)
    else:
        os.chmod(path, mode)


class _RecordingWriter:
    """A file's ``write`` that remembers the OSError it raised.

    torch.save writes through a C++ zip writer that turns a failed write into a RuntimeError such as
    "unexpected pos 704 vs 598", dropping the reason; the remembered error ("No space left on device")
    is what the user is told instead.
    """

    def __init__(self, fh):
        self._fh = fh
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self._fh.flush()


def _underlying_os_error(exc: BaseException, recorded: OSError | None) -> BaseException:
    """The OSError behind ``exc`` (the one the file's write raised, or one in its context chain), else ``exc``."""
    if isinstance(exc, OSError):
        return exc
    if recorded is not None:
        return recorded
    seen = exc.__context__
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__context__
    return exc


def write_temp(path: Path, write) -> str:
    """Write through ``write(fh)`` to a temporary file beside ``path`` and fsync it; return its name.

    A failed write raises the OSError the file system gave, even when ``write`` (torch.save) hid it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            follow_umask(fh.fileno(), tmp)
            recorder = _RecordingWriter(fh)
            try:
                write(recorder)
            except RuntimeError as exc:
                found = _underlying_os_error(exc, recorder.error)
                if found is exc:
                    raise
                raise found from None
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def atomic_write_many(items: list[tuple[Path, object]]) -> None:
    """Write every ``(path, write)`` to a temporary file first, then rename them all into place.

    A crash or a full disk while writing leaves every previous file untouched; temporary files are
    removed on any error. Only a failed rename (rare: the data is on disk by then) can leave the set
    mixed, and its message names the files already replaced.
    """
    tmps: list[str] = []
    current = items[0][0]
    replaced: list[Path] = []
    try:
        for path, write in items:
            current = Path(path)
            tmps.append(write_temp(current, write))
        for (path, _), tmp in zip(items, tmps):
            current = Path(path)
            os.replace(tmp, path)
            replaced.append(current)
        tmps = []
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as RuntimeError
        raise write_error(current, exc, tuple(replaced)) from None
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def atomic_write(path: Path, write) -> None:
    """Write to a temporary file in the same folder, fsync, then rename into place."""
    atomic_write_many([(Path(path), write)])


def atomic_write_files(files: dict[Path, str | bytes]) -> None:
    """Replace several files as a set: all are written to temporary files first, then renamed into place.

    A full disk (or any write error) leaves every previous file as it was, and the CheckpointError says
    so truthfully. Text is written as UTF-8. Example::

        >>> atomic_write_files({Path("report.json"): "{}", Path("report.md"): "# report"})  # doctest: +SKIP
    """

    def writer(data: bytes):
        return lambda fh: fh.write(data)

    atomic_write_many(
        [(Path(path), writer(data.encode("utf-8") if isinstance(data, str) else data)) for path, data in files.items()]
    )


def remove_stale_temp_files(folder: Path, within: Path) -> None:
    """Delete ``.*.tmp`` files a killed process left behind in ``folder`` (not recursive).

    Call it only while holding the run directory's lock (:func:`kdcompress.run.lock.run_dir_lock`): a
    live writer's temporary files look the same. ``folder`` must lie inside ``within`` (the run
    directory) once links are resolved: a planted link to a folder outside is left alone. A ``.tmp``
    entry that is a link is removed itself, never what it points to.
    """
    folder = Path(folder)
    try:
        if not folder.resolve(strict=True).is_relative_to(Path(within).resolve(strict=True)):
            return
    except OSError:  # not there (nothing to sweep) or unreadable
        return
    for tmp in folder.glob(".*.tmp"):
        try:
            if tmp.is_symlink() or tmp.is_file():
                tmp.unlink()
        except OSError:
            pass


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, flush, then rename into place."""
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def manifest_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".manifest.json")


def confined_path(run_dir: str | Path, rel, where: str) -> Path:
    """``run_dir / rel``, resolved, for a path ``rel`` read from a file in the run directory; CheckpointError if it leaves it.

    Everything in a run directory is untrusted, so a path found in one of its files must name a file of the
    same run: ``rel`` must be a non-empty relative path (a string) without ``..`` components, and the joined
    path, symlinks followed, must still lie inside the run directory (itself resolved, so a run directory
    reached through a symlink is fine). ``where`` names the file the path came from, for the message. The
    returned path has every symlink resolved, so what is opened is what was checked.

        >>> confined_path("runs/x", "export/a.kdca", "artifacts.json") == Path("runs/x/export/a.kdca").resolve()
        True
        >>> confined_path("runs/x", "/etc/passwd", "artifacts.json")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        kdcompress.errors.CheckpointError: artifacts.json names '/etc/passwd', which is an absolute path; ...
    """
    root = Path(run_dir)
    if not isinstance(rel, str) or not rel or "\0" in rel:
        reason = "which is not a file name"
    elif Path(rel).is_absolute():
        reason = "which is an absolute path"
    elif ".." in Path(rel).parts:
        reason = "which goes up with '..'"
    else:
        try:
            base = root.resolve()
            path = (root / rel).resolve()
        except (OSError, RuntimeError, ValueError):  # a symlink loop, a name too long
            reason = "which cannot be resolved"
        else:
            if path.is_relative_to(base):
                return path
            reason = f"which leads out of the run directory (through a link, to {path})"
    raise CheckpointError(
        f"{where} names {str(rel)[:200]!r}, {reason}; kdc reads only files inside the run directory {root}, so "
        f"it was refused"
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_SHA_CACHE: dict[tuple, str] = {}


def file_sha256(path: str) -> str | None:
    """The SHA-256 of a file's content (hex), or None when it cannot be read.

    Remembered per (path, size, inode, modification and change times): fingerprints are taken many times a
    run, and a supplied teacher may be hundreds of megabytes.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):  # a device (/dev/zero) or a FIFO would never end, or block
            return None
        key = (os.path.abspath(path), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        if key not in _SHA_CACHE:
            _SHA_CACHE[key] = sha256_file(path)
        return _SHA_CACHE[key]
    except OSError:
        return None


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line and flush it to disk."""
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise write_error(path, exc) from None


def user_cache_dir() -> Path:
    """kdc's per-user cache folder, shared by every run: ``$KDC_CACHE`` if set, else the platform's user cache dir.

    Holds what is worth keeping between runs but never belongs to one run directory (the per-layer latency
    tables of :mod:`kdcompress.latency_budget`; image folders are decoded beside the datasets' root unless
    ``$KDC_CACHE`` is set). Deleting it is safe: what it held is measured or decoded again.
    """
    if os.environ.get("KDC_CACHE"):
        return Path(os.environ["KDC_CACHE"]).expanduser()
    try:
        from platformdirs import user_cache_dir as platform_cache_dir

        return Path(platform_cache_dir("kdcompress"))
    except ImportError:  # platformdirs is a dependency; this is a fallback only
        return Path.home() / ".cache" / "kdcompress"
