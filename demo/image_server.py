"""A stand-in for an image CDN on 127.0.0.1, for the tests and the benchmark of image URLs.

It serves photos at `/img/<name>` with an ETag and a Last-Modified, and answers a conditional GET with 304
when the photo has not changed. A fixed latency per response stands in for a CDN's. Other paths plant the
faults a crawler meets, each ending in a photo's name:
    /flaky/<name>    503 the first time, then the photo
    /busy/<name>     429 with Retry-After: 1 the first time, then the photo
    /moved/<name>    a 302 to /img/<name>
    /missing/<name>  404
    /slow/<name>     the photo, after `slow_s` seconds
    /huge/<name>     `huge_bytes` of a body, with no Content-Length
    /page/<name>     an HTML page
It counts requests and the image bodies it sent, by path.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter, defaultdict
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ImageServer:
    def __init__(self, photos: dict[str, bytes], latency_s: float = 0.0, slow_s: float = 3.0,
                 huge_bytes: int = 3_000_000):
        self.photos = dict(photos)
        self.modified = {name: time.time() for name in photos}
        self.latency_s = latency_s
        self.slow_s = slow_s
        self.huge_bytes = huge_bytes
        self.requests: Counter[str] = Counter()
        self.bodies: Counter[str] = Counter()         # image bodies sent (200 with the photo)
        self.times: defaultdict[str, list[float]] = defaultdict(list)
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> ImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_port}{path}"

    def replace(self, name: str, data: bytes) -> None:
        """A new photo under an old name, as a shop re-uploads one."""
        self.photos[name] = data
        self.modified[name] = time.time() + 1

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.bodies.clear()
            self.times.clear()

    def seen(self, path: str) -> int:
        """Requests for `path` so far, counting this one."""
        with self._lock:
            self.requests[path] += 1
            self.times[path].append(time.monotonic())
            return self.requests[path]

    def sent_body(self, path: str) -> None:
        with self._lock:
            self.bodies[path] += 1


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """Clients that hang up (a timeout, a cap on the body) are part of the tests, not errors to print."""


def _handler(server: ImageServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:   # quiet: the counts are the record
            pass

        def do_GET(self) -> None:   # noqa: N802 - http.server's name
            path = self.path
            nth = server.seen(path)
            if server.latency_s:
                time.sleep(server.latency_s)
            kind, _, name = path.strip("/").partition("/")
            if name not in server.photos or kind == "missing":
                return self._plain(404, b"not found")
            if (kind == "flaky" and nth == 1) or (kind == "busy" and nth == 1):
                headers = {"Retry-After": "1"} if kind == "busy" else {}
                return self._plain(429 if kind == "busy" else 503, b"try again", headers)
            if kind == "moved":
                return self._plain(302, b"", {"Location": f"/img/{name}"})
            if kind == "slow":
                time.sleep(server.slow_s)
            if kind == "huge":
                return self._endless()
            if kind == "page":
                return self._plain(200, b"<html><body>Sold out</body></html>", {"Content-Type": "text/html"})
            self._photo(path, name)

        def _photo(self, path: str, name: str) -> None:
            data = server.photos[name]
            etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
            modified = formatdate(server.modified[name], usegmt=True)
            if self.headers.get("If-None-Match") == etag:
                return self._plain(304, b"", {"ETag": etag, "Last-Modified": modified})
            server.sent_body(path)
            self._plain(200, data, {"Content-Type": "image/jpeg", "ETag": etag, "Last-Modified": modified})

        def _plain(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in {"Content-Type": "text/plain", **(headers or {})}.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if status >= 400:
                time.sleep(0.05)      # an error page after its headers, as a busy backend sends one
            if status != 304:
                self.wfile.write(body)

        def _endless(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            chunk = b"\xff" * 65536
            try:
                for _ in range(server.huge_bytes // len(chunk) + 1):
                    self.wfile.write(chunk)
            except OSError:   # the client stopped reading at its cap
                pass

    return Handler
