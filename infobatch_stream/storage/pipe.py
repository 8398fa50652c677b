"""``pipe:command``: the shard is what a shell command writes to stdout; it can only be streamed.

Only URLs that begin with exactly ``pipe:`` get here (:func:`..storage.backend_for` does not
lower-case schemes), and an index that lists them loads only with ``allow_pipes=True``.
"""

from __future__ import annotations

from typing import BinaryIO

from . import ObjectInfo, StorageError


class PipeBackend:
    concurrent = False

    def read(self, url: str, start: int, end: int) -> tuple[bytes, ObjectInfo | None]:
        raise StorageError(f"{url}: a pipe: shard cannot be read by ranges; it is streamed")

    def stream(self, url: str) -> tuple[BinaryIO, ObjectInfo | None]:
        if not url.startswith("pipe:"):
            raise StorageError(f"{url} is not a pipe: URL")
        import importlib

        gopen = importlib.import_module("webdataset.gopen")  # the package re-exports a function by that name
        return gopen.gopen_pipe(url, "rb"), None
