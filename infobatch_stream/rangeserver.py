"""A small threaded HTTP file server with Range support and byte counters, for tests and benchmarks.

It stands in for an object store on 127.0.0.1: ``GET`` with ``Range: bytes=a-b`` answers 206,
every response carries an ``ETag``, and ``/__stats__`` reports the body bytes and requests served
so that benchmarks measure what crossed the wire, not what the client believes it asked for.
``/__redirect__/PATH`` answers 302 to ``/PATH``, as hubs and object stores redirect to signed URLs.

Run: ``python -m infobatch_stream.rangeserver DIR`` (prints the URL it serves on).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class _Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bytes = 0
        self.requests = 0

    def add(self, nbytes: int, requests: int = 1) -> None:
        with self.lock:
            self.bytes += nbytes
            self.requests += requests


def make_handler(root: str, counters: _Counters, *, ranges: bool = True) -> type[BaseHTTPRequestHandler]:
    root = os.path.realpath(root)

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

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/__stats__":
                with counters.lock:
                    return self._json({"bytes": counters.bytes, "requests": counters.requests})
            if self.path == "/__reset__":
                with counters.lock:
                    counters.bytes = counters.requests = 0
                return self._json({})
            if self.path.startswith("/__redirect__/"):  # like a hub answering with a signed URL
                self.send_response(302)
                self.send_header("Location", self.path[len("/__redirect__"):])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            path = os.path.realpath(os.path.join(root, self.path.split("?", 1)[0].lstrip("/")))
            if not path.startswith(root + os.sep) or not os.path.isfile(path):
                self.send_error(404)
                return
            st = os.stat(path)
            size = st.st_size
            start, end = 0, size
            match = _RANGE.match(self.headers.get("Range", "")) if ranges else None
            if match and (match.group(1) or match.group(2)):
                if match.group(1):
                    start = int(match.group(1))
                    end = min(size, int(match.group(2)) + 1) if match.group(2) else size
                else:
                    start = max(0, size - int(match.group(2)))
                if start >= size or start >= end:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    counters.add(0)
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(end - start))
            self.send_header("ETag", f'"{size:x}-{st.st_mtime_ns:x}"')
            self.send_header("Accept-Ranges", "bytes" if ranges else "none")
            self.end_headers()
            # Counted before the body goes out: a client that has read the whole body and then asks
            # /__stats__ must see it (counting after the last write raced with that request).
            counters.add(end - start)
            sent = 0
            with open(path, "rb") as f:
                f.seek(start)
                remaining = end - start
                try:
                    while remaining:
                        chunk = f.read(min(remaining, 1 << 20))
                        if not chunk:
                            break
                        self.wfile.write(chunk)
                        sent += len(chunk)
                        remaining -= len(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client abandoned the body (a reader that stops early)
            if sent != end - start:
                counters.add(sent - (end - start), requests=0)  # only what went out

    return Handler


class RangeServer:
    """Serve ``root`` on 127.0.0.1 in a background thread (``with RangeServer(dir) as url: ...``)."""

    def __init__(self, root: str, port: int = 0, *, ranges: bool = True) -> None:
        self.counters = _Counters()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), make_handler(root, self.counters, ranges=ranges))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a folder over HTTP with Range support on 127.0.0.1.",
                                     epilog="example: python -m infobatch_stream.rangeserver shards/ --port 8000")
    parser.add_argument("root")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--no-ranges", action="store_true", help="ignore Range headers (answer 200 with the whole file)")
    args = parser.parse_args(argv)
    server = RangeServer(args.root, args.port, ranges=not args.no_ranges)
    print(f"serving {os.path.abspath(args.root)} on {server.url}", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
