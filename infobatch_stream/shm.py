"""Numpy arrays in shared memory that any process can attach to by path.

DataLoader workers (fork or spawn, persistent or not) and, later, other local ranks must read
what the training process writes. A file in ``/dev/shm`` mapped with ``MAP_SHARED`` does that
with no copy, pickles as its path, and needs no resource tracker (which, in Python < 3.13,
unlinks ``multiprocessing.shared_memory`` segments when an attaching process exits).
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import tempfile
import weakref

import numpy as np

log = logging.getLogger(__name__)
_PREFIX = "infobatch_stream-"


def shm_dir() -> str:
    """``/dev/shm`` where it exists (RAM-backed), else the temp folder."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return "/dev/shm"
    return tempfile.gettempdir()


def remove_stale(directory: str | None = None) -> int:
    """Delete segments whose creating process is gone; returns how many.

    The creator holds a shared ``flock`` on its segment for as long as it (or a forked child)
    lives, and the kernel drops it even on SIGKILL. A segment nobody locks is stale. Unlike a
    pid check this is safe when ``/dev/shm`` is shared between PID namespaces (containers).
    """
    directory = directory or shm_dir()
    removed = 0
    for name in os.listdir(directory):
        if not name.startswith(_PREFIX):
            continue
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its owner is alive
        else:
            try:
                os.unlink(path)
                removed += 1
            except OSError:
                pass
        finally:
            os.close(fd)
    return removed


def _unlink_if_owner(path: str, owner: int, lock_fd: int) -> None:
    if os.getpid() == owner:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(lock_fd)


class SharedArray:
    """A fixed-size 1-D numpy array in shared memory; the creating process owns and removes it."""

    def __init__(self, path: str, length: int, dtype: np.dtype | str) -> None:
        self.path = path
        self.length = int(length)
        self.dtype = np.dtype(dtype)
        self.array = np.memmap(path, dtype=self.dtype, mode="r+", shape=(max(self.length, 1),))[: self.length]

    @classmethod
    def create(cls, length: int, dtype: np.typing.DTypeLike, fill: float | int = 0, tag: str = "array") -> SharedArray:
        directory = shm_dir()
        remove_stale(directory)
        pid = os.getpid()
        token = secrets.token_hex(6)
        path = os.path.join(directory, f"{_PREFIX}{pid}-{token}.{tag}")
        staging = os.path.join(directory, f".staging-{pid}-{token}")  # invisible to remove_stale
        nbytes = max(int(length), 1) * np.dtype(dtype).itemsize
        lock_fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_SH)  # held while the owner lives: see remove_stale
            try:
                os.posix_fallocate(lock_fd, 0, nbytes)  # reserve now: a sparse file would SIGBUS later
            except OSError as e:
                raise OSError(
                    e.errno,
                    f"cannot reserve {nbytes / 2**20:.1f} MiB for a shared {tag} array in {directory} "
                    f"({e.strerror}); give it more room (e.g. docker --shm-size) or free space there",
                ) from None
            os.rename(staging, path)  # appears under its real name already locked
        except BaseException:
            os.close(lock_fd)
            try:
                os.unlink(staging)
            except FileNotFoundError:
                pass
            raise
        shared = cls(path, length, np.dtype(dtype))
        weakref.finalize(shared, _unlink_if_owner, path, pid, lock_fd)
        if fill != 0:
            shared.array[:] = fill
        log.debug("created shared array %s (%d bytes)", path, nbytes)
        return shared

    @property
    def nbytes(self) -> int:
        return self.length * self.dtype.itemsize

    def __getstate__(self) -> dict:
        return {"path": self.path, "length": self.length, "dtype": self.dtype.str}

    def __setstate__(self, state: dict) -> None:
        try:
            SharedArray.__init__(self, state["path"], state["length"], state["dtype"])
        except FileNotFoundError:
            raise RuntimeError(
                f"shared array {state['path']} is gone: the process that created it has exited; "
                "keep the InfoBatch object alive in the training process while loaders run"
            ) from None
