"""One writer per run directory: an advisory lock on ``<run dir>/.kdc.lock``.

Every kdc command that writes into a run directory (the stage commands, ``kdc run``, ``kdc export``,
each point of ``kdc sweep``, each seed of ``kdc run --seeds``, and ``kdc report``, which writes the
report files) holds this lock while it works. A second one exits at once with exit code 2::

    another kdc (pid 4242, `kdc run recipe.yaml`, started 14:03) is writing runs/recipe; wait for it
    or use another run.name

The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on the lock file. The kernel drops it when the process
ends, however it ends (a SIGKILL included), so a lock is never stale and nothing has to be cleaned
up: the file stays, and holds the holder's pid, host, command line and start time (JSON) while it is
held, empty after. What a waiting process reads there is shown, never trusted for anything else.
A command that created the run directory and wrote nothing else into it (bad input found after
the lock was taken) removes the lock file and the folders it made, so it leaves nothing behind.

It is re-entrant within a process (``kdc run`` holds it while its stages, the export and the report
take it again) and a no-op on the ranks other than 0 of a distributed run, which write nothing
(:mod:`kdcompress.distributed`).

Limits:

- Advisory: it keeps kdc processes apart, not other programs.
- NFS: Linux NFS clients implement ``flock`` with the server's byte-range (``lockf``) locks, so the
  lock holds across machines when the server supports locking (NFSv4, or NFSv3 with lockd). With
  the ``nolock`` mount option, or on systems whose NFS ``flock`` is local to one machine (some BSDs
  and older kernels), two machines can each take it: keep one writer per run directory yourself, or
  put runs on a local disk (``run.out_dir``). A file system that refuses locks is reported (exit 2).
- Where ``fcntl`` does not exist (Windows) no lock is taken and nothing is enforced: two kdc
  processes on one run directory there can still mix their files.

Example::

    >>> from kdcompress.run.lock import run_dir_lock
    >>> with run_dir_lock("runs/quickstart", "kdc report runs/quickstart"):  # doctest: +SKIP
    ...     pass  # write into runs/quickstart
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import socket
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from .. import distributed
from ..errors import RunLockedError
from .layout import LOCK_FILE, lock_path

try:
    import fcntl
except ImportError:  # Windows: see the module docstring's limits
    fcntl = None

__all__ = ["run_dir_lock", "current_command", "WAIT_ADVICE"]

WAIT_ADVICE = "wait for it or use another run.name"
_INFO_BYTES = 4096  # what is read of a lock file another process wrote: a small JSON, bounded on a crafted one
_ATTEMPTS = 20  # a lock file removed under us (by a holder tidying up) is opened again, this many times at most

_held: dict[str, list] = {}  # real path of a run directory -> [_Held, depth]
_guard = threading.Lock()


class _Held:
    """A lock this process holds: its file, and the folders it made to hold it (outermost first)."""

    def __init__(self, fd: int, path: Path, created: list[Path]):
        self.fd, self.path, self.created = fd, path, created


def current_command() -> str:
    """This process's command line as the user typed it (``kdc run recipe.yaml``), for the lock file."""
    argv = list(sys.argv) or ["?"]
    program = Path(argv[0])
    if program.name == "kdc" or (program.name == "__main__.py" and program.parent.name == "kdcompress"):
        argv = ["kdc", *argv[1:]]
    return shlex.join(argv)


def _writes_files() -> bool:
    """True except on the ranks other than 0 of a distributed run (before its process group is joined too)."""
    if distributed.is_distributed():
        return distributed.is_main()
    if distributed.launched_by_torchrun():
        return os.environ.get("RANK", "0").strip() == "0"
    return True


@contextlib.contextmanager
def run_dir_lock(
    run_dir: str | Path, command: str | None = None, advice: str = WAIT_ADVICE, create: bool = True
) -> Iterator[None]:
    """Hold the run directory's write lock for the ``with`` block; raise RunLockedError (exit 2) if another
    process holds it.

    ``command`` is what the lock file says this process is (default: its command line); ``advice`` ends
    the message a second writer gets. A missing run directory is created, or with ``create=False``
    (for commands that only add to an existing run) left alone and not locked: the caller finds
    nothing to read there and says so.
    """
    if fcntl is None or not _writes_files() or (not create and not Path(run_dir).is_dir()):
        yield
        return
    key = os.path.realpath(run_dir)
    with _guard:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
        else:
            _held[key] = [_acquire(Path(run_dir), command or current_command(), advice), 1]
    try:
        yield
    finally:
        with _guard:
            entry = _held[key]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                _release(entry[0])


def _acquire(run_dir: Path, command: str, advice: str) -> _Held:
    """Open and lock ``run_dir/.kdc.lock`` and write who holds it."""
    path = lock_path(run_dir)
    created: list[Path] = []
    for _ in range(_ATTEMPTS):
        created += _make_dirs(run_dir)
        fd = _open_locked(path, run_dir, advice)
        # a holder that made the folder and wrote nothing removes the file before it lets go (_release): the
        # file locked here must still be the one at the path, or a third process could lock a new one
        try:
            current = os.stat(path, follow_symlinks=False)
            opened = os.fstat(fd)
            if (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    else:
        raise RunLockedError(f"could not lock {path}: it kept being removed; is another program deleting it?")
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "started": time.time()}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
    except OSError:  # a full disk: the lock holds all the same, a second writer just learns less about it
        pass
    return _Held(fd, path, created)


def _make_dirs(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those made here, outermost first."""
    missing = []
    for candidate in [folder, *folder.parents]:
        if candidate.exists():
            break
        missing.append(candidate)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunLockedError(
            f"could not create the run directory {folder}: {exc.strerror or exc}; choose a run.out_dir you can write"
        ) from None
    return list(reversed(missing))


def _open_locked(path: Path, run_dir: Path, advice: str) -> int:
    """The lock file, opened (never through a link) and locked; RunLockedError when another process holds it."""
    # no O_TRUNC before the lock is ours; O_NOFOLLOW: a planted link must not make kdc write elsewhere;
    # O_NONBLOCK: a planted FIFO must not hang the open
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RunLockedError(
                f"{path} is a symbolic link; kdc follows no link planted in a run directory: delete it and rerun"
            ) from None
        raise RunLockedError(
            f"could not open the lock file {path}: {exc.strerror or exc}; kdc writes into {run_dir}, so it must be "
            f"writable (fix its permissions, or copy the run somewhere you can write)"
        ) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RunLockedError(f"{path} is not a regular file; delete it and rerun")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLockedError(f"{_holder_text(fd)} is writing {run_dir}; {advice}") from None
            raise RunLockedError(
                f"could not lock {path}: {exc.strerror or exc}; the file system does not support locks. Put the "
                f"run on a local disk (run.out_dir), and never run two kdc on it at once"
            ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _release(held: _Held) -> None:
    """Let the lock go; first, when this process made the run directory and wrote nothing else there, remove
    the lock file and the folders it made (still holding the lock, so no other process is tidied away)."""
    try:
        os.ftruncate(held.fd, 0)  # emptied while still held: what it said is no longer true
        if held.created and [p.name for p in held.path.parent.iterdir()] == [LOCK_FILE]:
            held.path.unlink()
            for folder in reversed(held.created):
                folder.rmdir()  # stops at the first folder something else was put in since
    except OSError:
        pass
    try:
        fcntl.flock(held.fd, fcntl.LOCK_UN)
    finally:
        os.close(held.fd)


def _printable(text: str, limit: int = 200) -> str:
    """``text`` without control characters (a crafted lock file must not drive the terminal), cut to ``limit``."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


def _holder_text(fd: int) -> str:
    """``another kdc (pid N, `COMMAND`, started HH:MM)`` from the lock file, as far as it can be read."""
    try:
        info = json.loads(os.pread(fd, _INFO_BYTES, 0).decode("utf-8"))
        if not isinstance(info, dict):
            raise ValueError
    except (OSError, ValueError):  # being written this instant, or empty: the holder is still real
        return "another kdc process"
    parts = []
    pid, host = info.get("pid"), info.get("host")
    if isinstance(pid, int) and not isinstance(pid, bool):
        parts.append(
            f"pid {pid}"
            + (f" on {_printable(host, 60)}" if isinstance(host, str) and host and host != socket.gethostname() else "")
        )
    if isinstance(info.get("command"), str):
        parts.append(f"`{_printable(info['command'])}`")
    started = info.get("started")
    if isinstance(started, (int, float)) and not isinstance(started, bool):
        try:
            when = time.localtime(started)
            today = time.localtime()
            same_day = (when.tm_year, when.tm_yday) == (today.tm_year, today.tm_yday)
            parts.append("started " + time.strftime("%H:%M" if same_day else "%Y-%m-%d %H:%M", when))
        except (OverflowError, OSError, ValueError):
            pass
    return f"another kdc ({', '.join(parts)})" if parts else "another kdc process"
