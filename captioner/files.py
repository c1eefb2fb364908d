"""Writing files so that a reader never sees half of one, whatever kills the writer; locks that
keep two writers apart; disk space reserved before a file is filled."""

from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

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


# ----------------------------------------------------------------------------- locks and space

if sys.platform == "win32":  # no fcntl: no lock (one writer at a time is then the user's care)
    fcntl = None
else:
    import fcntl


class LockedError(RuntimeError):
    """Another process holds the lock; the message names the lock file and `holder`."""

    def __init__(self, message: str, holder: str):
        super().__init__(message)
        self.holder = holder


@contextmanager
def exclusive_lock(lock_file: Path, wait: bool = True) -> Iterator[None]:
    """Hold an OS lock on `lock_file` (created if need be; the OS releases it when the process
    dies, so a killed holder never leaves a stale lock). wait=False: FolderLockedError at once
    if another process holds it."""
    if fcntl is None:
        yield
        return
    with open(lock_file, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError as err:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise LockedError(f"{lock_file} is held by {holder}", holder) from err
        handle.truncate(0)
        handle.write(f"process {os.getpid()}\n")
        handle.flush()
        yield  # released when the file is closed


class DiskFullError(OSError):
    """Not enough free space for a file that is about to be written (the message says how much
    is needed, where, and how much is free)."""


def reserve_space(path: Path, size: int) -> None:
    """Give the file at `path` (created if need be) `size` bytes of real disk blocks, so that
    writing into it later (e.g. through a memory map, where a full disk is a fatal SIGBUS) cannot
    run out of space. Data already in the file is kept; the file is extended with zeros.

    Raises DiskFullError "disk full: needs X GB at PATH (Y GB free)" before allocating anything
    when the file system's free space is short, and also if the allocation itself runs out.
    """
    have = getattr(path.stat(), "st_blocks", 0) * 512 if path.exists() else 0  # allocated already
    free = shutil.disk_usage(path.parent).free
    if size - have > free:
        raise DiskFullError(f"disk full: needs {_gb(size - have)} at {path} ({_gb(free)} free)")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if size > 0 and hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
        else:
            os.ftruncate(fd, max(size, os.fstat(fd).st_size))
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(path.parent).free
            raise DiskFullError(f"disk full: needs {_gb(size - have)} at {path} ({_gb(free)} free)") from err
        if err.errno == errno.EFBIG:
            raise DiskFullError(
                f"file too large: {path} needs {_gb(size)}, more than its file system allows in one file"
            ) from err
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without fallocate:
            raise  # the free-space check is all
        os.ftruncate(fd, max(size, os.fstat(fd).st_size))
    finally:
        os.close(fd)


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e7 else f"{size / 1e6:.2f} MB"
