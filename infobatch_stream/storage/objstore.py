"""Object stores and plain HTTP(S) through ``obstore`` (the Rust ``object_store`` crate).

One client per (process, scheme, bucket or host) keeps its connections alive; range reads are
blocking calls that release the GIL, so a reader keeps several in flight from a few threads.
Credentials and endpoints come from the standard settings, read by ``object_store`` itself:
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_REGION``, ... (an ``AWS_PROFILE`` is resolved
through boto3), ``GOOGLE_APPLICATION_CREDENTIALS``, ``AZURE_STORAGE_ACCOUNT_NAME``, ...

**fork.** ``object_store`` runs on a tokio runtime whose threads do not survive ``fork()``: a
process forked after its parent used obstore would hang on its first request. Such a process
(a DataLoader worker started with ``fork`` after the training process read shards itself) is
served by the fsspec backend instead, with a warning, or gets an error that says what to do.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from datetime import timedelta
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

from . import REMOTE_EXTRA, ObjectInfo, RangeNotSupported, StorageError

log = logging.getLogger(__name__)

_stores: dict[tuple[int, str, str], Any] = {}
_used_in: int | None = None  # pid of the process whose tokio runtime obstore started
_forked_after_use = False
CLIENT_OPTIONS = {"timeout": "300s", "connect_timeout": "20s", "pool_idle_timeout": "20s"}
RETRY = {"max_retries": 4, "retry_timeout": timedelta(seconds=60)}


def _after_fork() -> None:
    global _forked_after_use
    if _used_in is not None:
        _forked_after_use = True


os.register_at_fork(after_in_child=_after_fork)


def used_here() -> bool:
    """Whether this process has started obstore's runtime (a fork of it could not use obstore)."""
    return _used_in == os.getpid()


def _obstore() -> Any:
    try:
        import obstore
    except ImportError:
        raise StorageError(f"reading object stores and http(s) shards needs obstore: {REMOTE_EXTRA}") from None
    return obstore


def _split(url: str) -> tuple[str, str, str]:
    """``(scheme, bucket or host, path in it)``."""
    parts = urlsplit(url)
    if not parts.netloc:
        raise StorageError(f"{url}: no bucket or host in the URL (expected scheme://bucket/path)")
    return parts.scheme, parts.netloc, unquote(parts.path.lstrip("/"))


def _make_store(scheme: str, netloc: str) -> Any:
    from obstore.store import HTTPStore, from_url

    options: dict[str, Any] = dict(CLIENT_OPTIONS)
    if scheme in ("http", "https"):
        options["allow_http"] = scheme == "http"
        return HTTPStore.from_url(f"{scheme}://{netloc}", client_options=options, retry_config=RETRY)  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    if scheme in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
        if endpoint.startswith("http://"):  # the user pointed us at a plain-HTTP endpoint (MinIO, moto)
            options["allow_http"] = True
        if os.environ.get("AWS_PROFILE") and not os.environ.get("AWS_ACCESS_KEY_ID"):
            import boto3
            from obstore.auth.boto3 import Boto3CredentialProvider

            kwargs["credential_provider"] = Boto3CredentialProvider(boto3.Session())
            region = boto3.Session().region_name
            if region and not (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")):
                kwargs["region"] = region
    return from_url(f"{scheme}://{netloc}", client_options=options, retry_config=RETRY, **kwargs)  # type: ignore[call-overload]


def _store(url: str) -> tuple[Any, str]:
    global _used_in
    scheme, netloc, path = _split(url)
    key = (os.getpid(), scheme, netloc)
    store = _stores.get(key)
    if store is None:
        _obstore()
        try:
            store = _make_store(scheme, netloc)
        except ImportError as exc:
            raise StorageError(f"{url}: {exc}; AWS_PROFILE is resolved through boto3: pip install boto3") from None
        except Exception as exc:  # noqa: BLE001 - a bad setting: name the URL
            raise StorageError(
                f"{url}: cannot configure the client ({exc}); check the endpoint and credential settings"
            ) from None
        _stores[key] = store
        _used_in = os.getpid()
    return store, path


def _info(meta: dict[str, Any]) -> ObjectInfo:
    etag = meta.get("e_tag") or meta.get("version")
    return ObjectInfo(int(meta["size"]), None, etag)


def _translate(url: str, exc: Exception) -> Exception:
    """obstore's errors as ours, naming the URL and saying what to do."""
    from obstore import exceptions as ox

    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, ox.NotFoundError) or "404 Not Found" in str(exc) or " not found" in first:
        return FileNotFoundError(f"{url} does not exist (the store answered: {first})")
    if isinstance(exc, ox.NotSupportedError) and "Range" in str(exc):
        return RangeNotSupported(f"{url}: the server ignores Range requests; the shard is read as a stream")
    if isinstance(exc, (ox.PermissionDeniedError, ox.UnauthenticatedError)):
        return StorageError(
            f"{url}: access denied ({first}); check the credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE, "
            "GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_ACCOUNT_KEY, ...) and the endpoint"
        )
    return StorageError(f"{url}: {first}")


class ObjectStoreBackend:
    concurrent = True

    def __init__(self) -> None:
        self._fallback: Any = None

    def _delegate(self, url: str) -> Any:
        """The fsspec backend, in a process forked after its parent used obstore (see above)."""
        if self._fallback is None:
            from .fsspec_backend import FsspecBackend

            message = (
                "this process was forked after its parent read shards through obstore, whose threads do not "
                "survive fork(); reading through fsspec instead. Faster: DataLoader(..., "
                "multiprocessing_context='forkserver') or 'spawn'"
            )
            log.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            self._fallback = FsspecBackend(after_fork_of=url)
        return self._fallback

    def read(self, url: str, start: int, end: int) -> tuple[bytes, ObjectInfo | None]:
        if _forked_after_use:
            return self._delegate(url).read(url, start, end)
        store, path = _store(url)
        want = end - start
        try:
            result = _obstore().get(store, path, options={"range": (start, end)})
            chunks, got = [], 0
            for chunk in result.stream(min_chunk_size=max(want, 1 << 16)):
                got += len(chunk)
                if got > want:  # never hold more than was asked for, whatever the server sends
                    raise StorageError(
                        f"{url}: asked for bytes {start}-{end - 1}, the server sent more; "
                        "it is not a conforming object store"
                    )
                chunks.append(chunk)
            meta = result.meta
        except (StorageError, FileNotFoundError):
            raise
        except Exception as exc:  # noqa: BLE001 - translated
            raise _translate(url, exc) from None
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        info = _info(meta)
        if len(data) != want:
            raise StorageError(
                f"shard {url} ended at byte {start + len(data)} ({info.size} bytes), the index expects "
                f"{end}; re-index it"
            )
        return bytes(data), info

    def stream(self, url: str) -> tuple[BinaryIO, ObjectInfo | None]:
        if _forked_after_use:
            return self._delegate(url).stream(url)
        store, path = _store(url)
        try:
            result = _obstore().get(store, path)
            return _ChunkStream(result.stream(min_chunk_size=1 << 20), url), _info(result.meta)  # type: ignore[return-value]
        except Exception as exc:  # noqa: BLE001 - translated
            raise _translate(url, exc) from None


class _ChunkStream(io.RawIOBase):
    """obstore's chunk iterator as a read-only stream."""

    def __init__(self, chunks: Any, url: str) -> None:
        self.chunks, self.url = iter(chunks), url
        self.head = b""

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            parts = [self.head]
            while (chunk := self._next()) is not None:
                parts.append(chunk)
            self.head = b""
            return b"".join(parts)
        while not self.head:
            chunk = self._next()
            if chunk is None:
                return b""
            self.head = chunk
        out, self.head = self.head[:n], self.head[n:]
        return out

    def _next(self) -> bytes | None:
        try:
            return bytes(next(self.chunks))
        except StopIteration:
            return None
        except Exception as exc:  # noqa: BLE001 - translated
            raise _translate(self.url, exc) from None

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def list_prefix(pattern: str) -> list[str]:
    """URLs of the objects under the fixed prefix of a glob pattern (``s3://b/p/shard-*.tar``)."""
    scheme, netloc, path = _split(pattern)
    cut = min(i for i, c in enumerate(path) if c in "*?[")
    prefix = path[:cut]
    folder = prefix[: prefix.rfind("/") + 1] if "/" in prefix else ""
    store, _ = _store(pattern)
    out: list[str] = []
    try:
        for batch in _obstore().list(store, prefix=folder or None):
            out.extend(f"{scheme}://{netloc}/{meta['path']}" for meta in batch)
    except Exception as exc:  # noqa: BLE001 - translated
        raise _translate(pattern, exc) from None
    return out
