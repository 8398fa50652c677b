"""Any protocol fsspec registers (``hf://``, ``memory://``, signed ``https://...?sig=``, ...),
and the fallback for object stores in a process where obstore cannot run (see :mod:`.objstore`).

Range reads go through ``fs.cat_file(path, start, end)``, which is thread-safe (fsspec runs the
async filesystems on its own event loop) and fork-safe (fsspec restarts that loop in a child).
"""

from __future__ import annotations

import logging
from typing import Any, BinaryIO

from . import REMOTE_EXTRA, ObjectInfo, StorageError

log = logging.getLogger(__name__)
_PROTOCOL_PACKAGES = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
    "azure": "adlfs",
    "hf": "huggingface_hub",
    "http": "aiohttp",
    "https": "aiohttp",
}


def _filesystem(url: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError:
        raise StorageError(f"{url}: this scheme is read through fsspec: {REMOTE_EXTRA}") from None
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as exc:
        protocol = url.split("://", 1)[0]
        package = _PROTOCOL_PACKAGES.get(protocol, f"the fsspec implementation of {protocol}://")
        raise StorageError(f"{url}: reading {protocol}:// needs {package} ({exc}); pip install {package}") from None
    except ValueError as exc:
        raise StorageError(
            f"{url}: no backend reads this URL ({exc}); supported: local paths, s3://, gs://, az://, "
            "http(s)://, pipe:, and any protocol an installed fsspec implementation registers"
        ) from None
    return fs, path


def _info(meta: dict[str, Any], url: str) -> ObjectInfo:
    size = meta.get("size")
    if size is None:
        raise StorageError(f"{url}: the server does not say the object's size; it can only be streamed")
    etag = meta.get("ETag") or meta.get("etag") or meta.get("generation") or meta.get("version_id")
    return ObjectInfo(int(size), None, None if etag is None else str(etag))


class FsspecBackend:
    concurrent = True

    def __init__(self, after_fork_of: str | None = None) -> None:
        self.after_fork_of = after_fork_of
        self._sizes: dict[str, int] = {}  # per process: one metadata request per shard

    def _size(self, fs: Any, path: str, url: str) -> int:
        """The object's size, asked once per process, for the stale-index check of every read
        (ETags are not compared here: their spelling differs between clients)."""
        size = self._sizes.get(url)
        if size is None:
            size = self._sizes[url] = _info(fs.info(path), url).size
        return size

    def read(self, url: str, start: int, end: int) -> tuple[bytes, ObjectInfo | None]:
        fs, path = _filesystem(url)
        try:
            size = self._size(fs, path, url)
            data = fs.cat_file(path, start=start, end=end)
        except FileNotFoundError:
            raise FileNotFoundError(f"{url} does not exist") from None
        except OSError as exc:
            raise StorageError(f"{url}: bytes {start}-{end - 1}: {exc}") from None
        if len(data) != end - start:
            raise StorageError(
                f"shard {url}: asked for bytes {start}-{end - 1}, got {len(data)} bytes; the shard "
                "changed since it was indexed (re-index it) or the server ignores Range requests"
            )
        return bytes(data), ObjectInfo(size)

    def stream(self, url: str) -> tuple[BinaryIO, ObjectInfo | None]:
        fs, path = _filesystem(url)
        try:
            return fs.open(path, "rb", block_size=1 << 20), None
        except FileNotFoundError:
            raise FileNotFoundError(f"{url} does not exist") from None


def list_prefix(pattern: str) -> list[str]:
    """Full URLs of the objects matching a glob pattern, through fsspec's ``glob``."""
    fs, path = _filesystem(pattern)
    protocol = pattern.split("://", 1)[0]
    return [name if "://" in name else f"{protocol}://{name}" for name in fs.glob(path)]
