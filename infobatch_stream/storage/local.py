"""Local files: positioned reads (``os.pread``), no seek state, so reads can share one descriptor."""

from __future__ import annotations

import os
from typing import BinaryIO

from . import ObjectInfo, StorageError, local_path


class LocalBackend:
    concurrent = False  # a page-cached pread returns in microseconds: nothing to overlap

    def open(self, url: str) -> tuple[int, ObjectInfo]:
        """A descriptor and the file's info at open (what the reader checks against the index)."""
        path = local_path(url)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as e:  # a folder, a name too long, a NUL in the name
            raise StorageError(f"shard {url[:300]!r} cannot be opened ({e}); check the index's shard URLs") from None
        try:
            st = os.fstat(fd)
            if not os.path.isfile(path):
                raise StorageError(f"{url} is not a regular file")
        except BaseException:
            os.close(fd)
            raise
        return fd, ObjectInfo(st.st_size, st.st_mtime)

    def read_fd(self, fd: int, url: str, start: int, end: int) -> bytes:
        parts, pos = [], start
        while pos < end:
            chunk = os.pread(fd, end - pos, pos)
            if not chunk:
                break
            parts.append(chunk)
            pos += len(chunk)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if len(data) != end - start:
            raise StorageError(f"shard {url} ended at byte {start + len(data)}, the index expects {end}; re-index it")
        return data

    def read(self, url: str, start: int, end: int) -> tuple[bytes, ObjectInfo | None]:
        fd, info = self.open(url)
        try:
            return self.read_fd(fd, url, start, end), info
        finally:
            os.close(fd)

    def stream(self, url: str) -> tuple[BinaryIO, ObjectInfo | None]:
        try:
            f = open(local_path(url), "rb")
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as e:
            raise StorageError(f"shard {url[:300]!r} cannot be opened ({e}); check the index's shard URLs") from None
        st = os.fstat(f.fileno())
        return f, ObjectInfo(st.st_size, st.st_mtime)
