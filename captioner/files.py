"""Writing files so that a reader never sees half of one, whatever kills the writer, and locking
them so that two writers never interleave."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once, at import: os.umask can only be read by setting it


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Write via a temporary file in the same folder and rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class LockHeld(RuntimeError):
    """Another process holds the lock; `pid` is its process id when it could be read."""

    def __init__(self, path: Path, pid: int | None):
        super().__init__(f"{path} is locked by {'process ' + str(pid) if pid else 'another process'}")
        self.path, self.pid = path, pid


class ExclusiveLock:
    """An exclusive lock on the file `path` (created holding our pid, removed on release);
    `acquire` raises LockHeld at once if another process holds it. Also a context manager.

    A POSIX advisory lock (flock): the kernel drops it when its holder dies, so a killed run
    never leaves a stale lock behind. Without fcntl (Windows) nothing is locked.
    """

    def __init__(self, path: Path):
        self.path, self.fd = path, -1

    def acquire(self) -> None:
        if fcntl is not None:
            self.fd = _acquire(self.path)

    def release(self) -> None:
        if self.fd >= 0:
            with suppress(OSError):
                os.unlink(self.path)  # still holding the lock: whoever opened it before retries
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> ExclusiveLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _acquire(path: Path) -> int:
    """Open, lock and return the lock file's descriptor, with our pid written in it."""
    assert fcntl is not None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            try:  # the last holder removes the file on release: lock the file that is there now
                current = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                current = False
            if current:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise LockHeld(path, pid) from None
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None  # its holder has not written it yet
