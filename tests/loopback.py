"""A real HTTP server on 127.0.0.1 for the tests that read rasters over the network (remote
inputs, STAC assets, the map app's catalogue search).

A few lines of the standard library's ``http.server`` (threads, HTTP/1.1 keep-alive, single
byte ranges as object stores serve them), written here rather than taken from a package so
that it can count what it sends: the bytes per file, and whole-file against range requests,
which is what the tests assert on.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class LoopbackServer:
    """Serves the files under ``root`` (started by :meth:`start`); counts the body bytes
    sent per file name (``sent``) and the ``whole`` and ``range`` GET requests
    (``requests``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sent: Counter[str] = Counter()
        self.requests: Counter[str] = Counter(whole=0, range=0)
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def start(self) -> LoopbackServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def count(self, name: str, n: int, ranged: bool) -> None:
        with self.lock:
            self.sent[name] += n
            self.requests["range" if ranged else "whole"] += 1


def _handler(server: LoopbackServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as GDAL uses it

        def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
            self._serve(body=False)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            name = unquote(urlsplit(self.path).path).lstrip("/")
            path = (server.root / name).resolve()
            if not path.is_relative_to(server.root.resolve()) or not path.is_file():
                self._empty(404)
                return
            size = path.stat().st_size
            start, end, status = 0, size - 1, 200
            wanted = self.headers.get("Range")
            if wanted is not None:
                m = re.fullmatch(r"bytes=(\d*)-(\d*)", wanted.strip())
                if m is None or not (m[1] or m[2]) or (m[1] and int(m[1]) >= size):
                    self._empty(416)  # multiple ranges are not served: none were asked
                    return
                if m[1]:
                    start = int(m[1])
                    end = min(int(m[2]) if m[2] else size - 1, size - 1)
                else:  # the last N bytes
                    start = max(size - int(m[2]), 0)
                status = 206
            self.send_response(status)
            self.send_header("Content-Type", "image/tiff")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start + 1))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if body:
                with open(path, "rb") as f:
                    f.seek(start)
                    data = f.read(end - start + 1)
                self.wfile.write(data)
                server.count(name, len(data), ranged=status == 206)

        def _empty(self, status: int) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:  # quiet
            pass

    return Handler
