"""HTTP(S) reads for shards: Range requests on a kept-alive connection, or a plain stream.

One connection per (process, scheme, host) is reused across ranges and shards, so a pruned
shard costs one request per kept run, not one TCP handshake per sample.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_connections: dict[tuple[int, str, str], http.client.HTTPConnection] = {}
_resolved: dict[str, str] = {}  # shard URL -> where its redirects led (per process)
_REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5


class HTTPShardError(IOError):
    """A shard URL answered with an error; the message names the URL and the status."""


@dataclass
class RangeResponse:
    data: bytes
    total: int | None  # full size of the resource, from Content-Range
    etag: str | None
    whole: bytes | None = None  # the full body, when the server ignored Range (HTTP 200)


def is_http(url: str) -> bool:
    return url.startswith("http://") or url.startswith("https://")


def _connection(scheme: str, netloc: str, timeout: float) -> http.client.HTTPConnection:
    key = (os.getpid(), scheme, netloc)
    conn = _connections.get(key)
    if conn is None:
        cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        conn = cls(netloc, timeout=timeout)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small requests, sent at once
        _connections[key] = conn
    return conn


def _request(url: str, headers: dict[str, str], timeout: float) -> http.client.HTTPResponse:
    """GET on the cached connection, reconnecting once if the server closed it."""
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    for attempt in (0, 1):
        conn = _connection(parts.scheme, parts.netloc, timeout)
        try:
            conn.request("GET", path or "/", headers=headers)
            return conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                http.client.CannotSendRequest, http.client.ResponseNotReady):
            conn.close()
            _connections.pop((os.getpid(), parts.scheme, parts.netloc), None)
            if attempt:
                raise
    raise AssertionError("unreachable")


def _follow(url: str, headers: dict[str, str], timeout: float) -> http.client.HTTPResponse:
    """GET ``url`` following redirects (hubs and object stores redirect to signed URLs); the
    final URL is remembered so later ranges of the same shard go straight there."""
    target = _resolved.get(url, url)
    for _ in range(MAX_REDIRECTS + 1):
        resp = _request(target, headers, timeout)
        if resp.status not in _REDIRECTS:
            if target != url:
                _resolved[url] = target
            return resp
        location = resp.getheader("Location")
        resp.read()
        if not location:
            raise HTTPShardError(f"{url}: HTTP {resp.status} redirect without a Location header")
        target = urljoin(target, location)
    raise HTTPShardError(f"{url}: more than {MAX_REDIRECTS} redirects")


def get_range(url: str, start: int, end: int, timeout: float = 60.0) -> RangeResponse:
    """Bytes ``[start, end)`` of ``url`` with one Range request."""
    resp = _follow(url, {"Range": f"bytes={start}-{end - 1}"}, timeout)
    body = resp.read()
    if resp.status == 206:
        match = _CONTENT_RANGE.match(resp.getheader("Content-Range", ""))
        total = int(match.group(3)) if match and match.group(3) != "*" else None
        if len(body) != end - start:
            raise HTTPShardError(f"{url}: asked for bytes {start}-{end - 1}, got {len(body)} bytes; the shard changed or "
                                 "the server is broken: re-index it")
        return RangeResponse(body, total, resp.getheader("ETag"))
    if resp.status == 200:
        # The server ignores Range: the whole body came back; cut the range out of it.
        return RangeResponse(body[start:end], len(body), resp.getheader("ETag"), whole=body)
    if resp.status == 416:
        raise HTTPShardError(f"{url}: bytes {start}-{end - 1} are past the end of the shard (HTTP 416); "
                             "the shard is shorter than the index says: re-index it")
    raise HTTPShardError(f"{url}: HTTP {resp.status} {resp.reason}")


class _ResponseStream:
    """A whole-body GET as a read-only stream that keeps the ETag and size it came with."""

    def __init__(self, resp: http.client.HTTPResponse, conn: http.client.HTTPConnection | None = None) -> None:
        self.resp = resp
        self.conn = conn  # a connection of its own: closed with the stream
        self.etag = resp.getheader("ETag")
        length = resp.getheader("Content-Length")
        self.length = int(length) if length is not None else None

    def read(self, n: int = -1) -> bytes:
        return self.resp.read(None if n is None or n < 0 else n)

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.resp.close()
        if self.conn is not None:
            self.conn.close()


def open_stream(url: str, timeout: float = 60.0) -> _ResponseStream:
    """GET the whole shard as a stream (for indexing and for servers without Range), following
    redirects. It uses a fresh connection: the body may be abandoned before its end."""
    target = _resolved.get(url, url)
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(target)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(parts.netloc, timeout=timeout)
        try:
            conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
            resp = conn.getresponse()
        except BaseException:
            conn.close()
            raise
        if resp.status in _REDIRECTS and resp.getheader("Location"):
            target = urljoin(target, resp.getheader("Location"))
            conn.close()
            continue
        if resp.status != 200:
            conn.close()
            raise HTTPShardError(f"{url}: HTTP {resp.status} {resp.reason}")
        return _ResponseStream(resp, conn)
    raise HTTPShardError(f"{url}: more than {MAX_REDIRECTS} redirects")
