"""One storage layer under the index builder and the reader: what a shard URL's bytes are.

For a URL, :func:`backend_for` picks the one module that serves its scheme:

=========================================  ==========================================================
URL                                        backend
=========================================  ==========================================================
``path``, ``file:path``, ``file://path``   :mod:`.local`: positioned reads (``os.pread``)
``s3://``, ``gs://``, ``az://``, ...       :mod:`.objstore`: ``obstore`` (Rust ``object_store``)
``http(s)://`` without a query string      :mod:`.objstore` (HTTP store: redirects followed per request)
other schemes fsspec knows (``hf://``...)  :mod:`.fsspec_backend`, also signed ``http(s)://...?sig``
``pipe:command``                           :mod:`.pipe`: a shell command's stdout, sequential only
=========================================  ==========================================================

Every backend gives the same two things (:class:`Backend`): exact byte ranges (thread-safe, so
a reader can keep several in flight) and a sequential stream, each with the object's size and
version (:class:`ObjectInfo`) where the response tells them, so the stale-index check costs no
extra request. Remote backends live in the ``remote`` extra; a missing one is an
error that says what to install.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from dataclasses import dataclass
from typing import BinaryIO, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import RangeNotSupported, StorageError  # noqa: F401 - re-exported for the backends

__all__ = [
    "ObjectInfo",
    "Backend",
    "StorageError",
    "RangeNotSupported",
    "backend_for",
    "is_local",
    "local_path",
    "identity",
    "expand_listing",
    "uses_obstore",
    "REMOTE_EXTRA",
]

REMOTE_EXTRA = "pip install 'infobatch-stream[remote]'"

_OBJECT_STORE_SCHEMES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "azure", "adl"}
# query parameters of presigned URLs: they change at every signing, the object does not
_SIGNATURE_PARAMS = {
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-date",
    "x-amz-expires",
    "x-amz-security-token",
    "x-amz-algorithm",
    "x-amz-signedheaders",
    "x-goog-signature",
    "x-goog-credential",
    "x-goog-date",
    "x-goog-expires",
    "x-goog-algorithm",
    "x-goog-signedheaders",
    "signature",
    "expires",
    "googleaccessid",
    "awsaccesskeyid",
    "sig",
    "se",
    "st",
    "sp",
    "sv",
    "sr",
    "skoid",
    "sktid",
    "skt",
    "ske",
    "sks",
    "skv",
    "spr",
    "token",
    "policy",
    "key-pair-id",
}


@dataclass(frozen=True)
class ObjectInfo:
    """What identifies one version of an object: its size, and mtime (files) or ETag/generation."""

    size: int
    mtime: float | None = None
    etag: str | None = None


class Backend(Protocol):
    """One scheme's way to a shard's bytes (see the module docstring)."""

    concurrent: bool  # several requests in flight pay off (each one waits for the network)

    def read(self, url: str, start: int, end: int) -> tuple[bytes, ObjectInfo | None]:
        """Exactly bytes ``[start, end)`` and, where the response says, the object's info.

        Raises :class:`StorageError` on a short or long body, :class:`RangeNotSupported` when the
        server ignores ranges. Safe to call from several threads at once."""
        ...

    def stream(self, url: str) -> tuple[BinaryIO, ObjectInfo | None]:
        """The whole object as a read-only stream (``close()`` it), and its info where known."""
        ...


def is_local(url: str) -> bool:
    """A path or ``file:`` URL (no other scheme, not ``pipe:``)."""
    return "://" not in url and not url.startswith("pipe:") or url.startswith("file://")


def runs_command(url: str) -> bool:
    """Whether opening ``url`` may run a shell command: here only an exact ``pipe:`` does, but
    WebDataset's ``gopen`` (``wds.tarfile_to_samples()``) applies ``GOPEN_REWRITE`` and parses the
    scheme with ``urlparse``, which lower-cases it and strips leading blanks (``" PIPE:cmd"``)."""
    candidates = [url]
    if os.environ.get("GOPEN_REWRITE"):  # the only input of gopen's rewrite (importing it imports torch)
        try:
            from webdataset.gopen import rewrite_url

            candidates.append(rewrite_url(url))
        except Exception:  # noqa: BLE001 - no WebDataset, or a rewrite rule that fails: gopen fails too
            pass
    for candidate in candidates:
        try:
            scheme = urlsplit(candidate).scheme
        except ValueError:  # gopen's urlparse raises too: it would not open it
            scheme = ""
        if candidate.startswith("pipe:") or scheme == "pipe":
            return True
    return False


def local_path(url: str) -> str:
    """The file path of a local URL (``file://`` and ``file:`` stripped)."""
    if url.startswith("file://"):
        return url[len("file://") :]
    if url.startswith("file:"):
        return url[len("file:") :]
    return url


def _scheme(url: str) -> str:
    """The scheme exactly as written: ``PIPE:`` is not ``pipe:`` (nothing here lower-cases it)."""
    if url.startswith("pipe:"):
        return "pipe"
    head, sep, _ = url.partition("://")
    return head if sep else ""


def identity(url: str) -> str:
    """The URL without the parts of a presigned URL that change at each signing (signature,
    expiry, credentials): what names the shard in the index."""
    if "?" not in url or _scheme(url) not in ("http", "https"):
        return url
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k.lower() not in _SIGNATURE_PARAMS]
    return urlunsplit(parts._replace(query=urlencode(query)))


_backends: dict[tuple[int, str], Backend] = {}


def _kind(url: str) -> str:
    scheme = _scheme(url)
    if is_local(url):
        return "local"
    if scheme == "pipe":
        return "pipe"
    if scheme in _OBJECT_STORE_SCHEMES or (scheme in ("http", "https") and "?" not in url):
        return "objstore"
    return "fsspec"


def uses_obstore(url: str) -> bool:
    """Whether ``url`` is read through obstore (whose threads do not survive ``fork()``)."""
    return _kind(url) == "objstore"


def backend_for(url: str) -> Backend:
    """The backend that serves ``url`` (one instance per process and kind)."""
    kind = _kind(url)
    key = (os.getpid(), kind)
    backend = _backends.get(key)
    if backend is None:
        backend = _make(kind)
        _backends[key] = backend
    return backend


def _make(kind: str) -> Backend:
    if kind == "local":
        from .local import LocalBackend

        return LocalBackend()
    if kind == "pipe":
        from .pipe import PipeBackend

        return PipeBackend()
    if kind == "objstore":
        from .objstore import ObjectStoreBackend

        return ObjectStoreBackend()
    from .fsspec_backend import FsspecBackend

    return FsspecBackend()


def expand_listing(url: str) -> list[str]:
    """A URL with ``*``/``?``/``[`` in its last parts, expanded by listing the folder or prefix
    (local glob, or an object-store listing); any other URL is returned as it is."""
    scheme = _scheme(url)
    if not any(c in url for c in "*?[") or scheme in ("pipe", "http", "https"):
        return [url]  # commands and HTTP URLs (query strings) are never patterns
    if is_local(url):
        if os.path.exists(local_path(url)):
            return [url]  # a file whose name has brackets
        found = sorted(glob.glob(local_path(url)))
        if not found:
            raise FileNotFoundError(f"no file matches {url}")
        return found
    if scheme in _OBJECT_STORE_SCHEMES:
        from .objstore import list_prefix

        names = list_prefix(url)
    else:
        from .fsspec_backend import list_prefix as fs_list

        names = fs_list(url)
    depth = url.count("/")  # like a local glob, * stays within one folder level
    found = sorted(n for n in names if n.count("/") == depth and fnmatch.fnmatchcase(n, url))
    if not found:
        raise FileNotFoundError(f"no object matches {url}")
    return found
