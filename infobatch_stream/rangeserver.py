"""A threaded HTTP file server with Range support, byte counters and object-store latency, for
tests and benchmarks.

It stands in for an object store on 127.0.0.1: ``GET`` with ``Range: bytes=a-b`` answers 206,
``HEAD`` answers the size, every response carries an ``ETag`` and ``Last-Modified``, and
``/__stats__`` reports the body bytes and requests served, so that benchmarks measure what
crossed the wire, not what the client believes it asked for.

Object stores make every request wait: ``ttfb`` seconds pass before each response's headers, and
``bandwidth`` paces each connection's body (bytes per second), as on S3 or GCS where one
connection carries maybe 50-100 MB/s. The listen backlog is deep, so 32 connections opened at
once are all accepted.

Paths that behave like hubs and broken servers:

- ``/__redirect__/PATH`` answers 302 to ``/PATH``;
- ``/__signed__/PATH`` answers 302 to ``/PATH?expires=T&signature=S``, a target that answers 403
  once ``signed_ttl`` seconds have passed (a presigned URL that expired);
- ``ranges=False`` ignores ``Range`` (200 with the whole file); ``endless=True`` ignores it and
  sends an endless body with no length.

Run: ``python -m infobatch_stream.rangeserver DIR [--ttfb 0.02] [--bandwidth 50e6]``.
"""

from __future__ import annotations

import argparse
import email.utils
import hashlib
import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
_CHUNK = 64 << 10


@dataclass
class Behaviour:
    """How the server answers (see the module docstring)."""

    ranges: bool = True
    ttfb: float = 0.0
    bandwidth: float = 0.0  # bytes per second per connection; 0: as fast as it goes
    endless: bool = False
    signed_ttl: float = 60.0


class _Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bytes = 0
        self.requests = 0

    def add(self, nbytes: int, requests: int = 1) -> None:
        with self.lock:
            self.bytes += nbytes
            self.requests += requests

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {"bytes": self.bytes, "requests": self.requests}

    def reset(self) -> None:
        with self.lock:
            self.bytes = self.requests = 0


def _signature(path: str, expires: str) -> str:
    return hashlib.sha256(f"{path}:{expires}".encode()).hexdigest()[:16]


# Long on purpose: a handler class factory; its methods are short and belong together.
def make_handler(root: str, counters: _Counters, behaviour: Behaviour | None = None) -> type[BaseHTTPRequestHandler]:
    root = os.path.realpath(root)
    how = behaviour or Behaviour()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def setup(self) -> None:
            super().setup()
            # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm
            # and the client's delayed ACK stall every keep-alive response by up to 40 ms.
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def _json(self, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _empty(self, status: int, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()
            counters.add(0)

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve(body=False)

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/__stats__":
                return self._json(counters.snapshot())
            if self.path == "/__reset__":
                counters.reset()
                return self._json({})
            self._serve(body=True)

        def _redirected(self, path: str) -> bool:
            """Answer the hub-like redirect paths; True when a redirect was sent."""
            if path.startswith("/__redirect__/"):
                self._empty(302, {"Location": path[len("/__redirect__") :]})
                return True
            if path.startswith("/__signed__/"):
                target = path[len("/__signed__") :]
                expires = f"{time.time() + how.signed_ttl:.3f}"
                self._empty(302, {"Location": f"{target}?expires={expires}&signature={_signature(target, expires)}"})
                return True
            return False

        def _expired(self, path: str, query: str) -> bool:
            """A signed URL past its expiry (or with a wrong signature) gets 403, as on S3."""
            args = parse_qs(query)
            if "signature" not in args:
                return False
            expires = args.get("expires", ["0"])[0]
            try:
                late = float(expires) < time.time()
            except ValueError:
                late = True
            if late or args["signature"][0] != _signature(path, expires):
                self._empty(403)
                return True
            return False

        def _serve(self, body: bool) -> None:
            if how.ttfb:
                time.sleep(how.ttfb)
            parts = urlsplit(self.path)
            if self._redirected(parts.path) or self._expired(parts.path, parts.query):
                return
            path = os.path.realpath(os.path.join(root, parts.path.lstrip("/")))
            if not path.startswith(root + os.sep) or not os.path.isfile(path):
                self._empty(404)
                return
            st = os.stat(path)
            size = st.st_size
            start, end = 0, size
            match = _RANGE.match(self.headers.get("Range", "")) if how.ranges and not how.endless else None
            if match and (match.group(1) or match.group(2)):
                if match.group(1):
                    start = int(match.group(1))
                    end = min(size, int(match.group(2)) + 1) if match.group(2) else size
                else:
                    start = max(0, size - int(match.group(2)))
                if start >= size or start >= end:
                    self._empty(416, {"Content-Range": f"bytes */{size}"})
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            else:
                self.send_response(200)
            if how.endless:
                self.send_header("Connection", "close")  # a body delimited by closing, never closed
                self.close_connection = True
            else:
                self.send_header("Content-Length", str(end - start))
            self.send_header("ETag", f'"{size:x}-{st.st_mtime_ns:x}"')
            self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
            self.send_header("Accept-Ranges", "bytes" if how.ranges else "none")
            self.end_headers()
            if not body:
                counters.add(0)
                return
            self._send_body(path, start, end)

        def _send_body(self, path: str, start: int, end: int) -> None:
            # Counted before the body goes out: a client that has read the whole body and then asks
            # /__stats__ must see it (counting after the last write raced with that request).
            counters.add(end - start)
            sent = 0
            began = time.perf_counter()
            with open(path, "rb") as f:
                f.seek(start)
                remaining = end - start
                try:
                    while remaining or how.endless:
                        chunk = f.read(min(remaining, _CHUNK)) if remaining else b"\0" * _CHUNK
                        if not chunk:
                            break
                        if how.bandwidth:  # pace this connection
                            wait = began + (sent + len(chunk)) / how.bandwidth - time.perf_counter()
                            if wait > 0:
                                time.sleep(wait)
                        self.wfile.write(chunk)
                        sent += len(chunk)
                        remaining = max(remaining - len(chunk), 0)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client abandoned the body (a reader that stops early)
            if sent != end - start:
                counters.add(sent - (end - start), requests=0)  # only what went out

    return Handler


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # listen backlog: many workers connect at once
    daemon_threads = True


class RangeServer:
    """Serve ``root`` on 127.0.0.1 in a background thread (``with RangeServer(dir) as url: ...``)."""

    def __init__(
        self,
        root: str,
        port: int = 0,
        *,
        ranges: bool = True,
        ttfb: float = 0.0,
        bandwidth: float = 0.0,
        endless: bool = False,
        signed_ttl: float = 60.0,
    ) -> None:
        self.counters = _Counters()
        self.behaviour = Behaviour(ranges, ttfb, bandwidth, endless, signed_ttl)
        self.httpd = _Server(("127.0.0.1", port), make_handler(root, self.counters, self.behaviour))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Serve a folder over HTTP with Range support on 127.0.0.1.",
        epilog="example: python -m infobatch_stream.rangeserver shards/ --ttfb 0.02 --bandwidth 50e6",
    )
    parser.add_argument("root")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--no-ranges", action="store_true", help="ignore Range headers (answer 200 with the whole file)"
    )
    parser.add_argument("--ttfb", type=float, default=0.0, help="seconds to wait before each response (default 0)")
    parser.add_argument(
        "--bandwidth", type=float, default=0.0, help="bytes per second per connection (default 0: unpaced)"
    )
    args = parser.parse_args(argv)
    server = RangeServer(args.root, args.port, ranges=not args.no_ranges, ttfb=args.ttfb, bandwidth=args.bandwidth)
    print(f"serving {os.path.abspath(args.root)} on {server.url}", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
