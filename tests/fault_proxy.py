"""A fault-injecting HTTP proxy between the job and a local object store (moto's S3), on 127.0.0.1.

Clients point at it as they point at any S3 endpoint (`AWS_ENDPOINT_URL`). On a share of the requests it
answers as a struggling store does: 503 SlowDown or 500 InternalError before the request reaches the store,
500 after the store did the work (the answer lost on the way back: a write landed that the client thinks
failed), a connection reset, or added latency. Every request otherwise goes through unchanged. The counts
of what it injected are kept for the soak's report.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

FAULTS = ("503 before", "500 before", "500 after", "reset", "latency")
ERROR_BODY = {503: b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>",
              500: b"<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>"}


class FaultProxy:
    """Forwards to `target`, injecting a fault of `faults` (all of FAULTS unless told) on `rate` of the requests."""

    def __init__(self, target: str, rate: float, seed: int = 0, faults: tuple[str, ...] = FAULTS):
        self.target = urlparse(target)
        self.rate = rate
        self.faults = faults
        self.injected: Counter[str] = Counter()
        self.requests = 0
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def draw(self) -> str | None:
        """The fault for the next request, if any."""
        with self._lock:
            self.requests += 1
            if self._random.random() >= self.rate:
                return None
            fault = self._random.choice(self.faults)
            self.injected[fault] += 1
            return fault


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """A connection a client gave up on (after a reset or latency it was dealt) is no error of the proxy's."""
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            super().handle_error(request, client_address)


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_args) -> None:     # quiet: the counts are the report
            pass

        def _any(self) -> None:
            body = self._body()
            fault = proxy.draw()
            if fault == "reset":
                self._reset()
                return
            if fault in ("503 before", "500 before"):
                self._error(int(fault[:3]))
                return
            if fault == "latency":
                time.sleep(0.2 + 0.8 * random.random())
            status, headers, answer = self._forward(body)
            if fault == "500 after":
                self._error(500)
                return
            self.send_response(status)
            for name, value in headers:
                # A HEAD's Content-Length is the object's size, not its (empty) answer's.
                if name.lower() not in ("transfer-encoding", "connection") and (
                        name.lower() != "content-length" or self.command == "HEAD"):
                    self.send_header(name, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(answer)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
            connection = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=60)
            headers = {name: value for name, value in self.headers.items() if name.lower() != "transfer-encoding"}
            headers["Content-Length"] = str(len(body))
            try:
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                return response.status, response.getheaders(), response.read()
            finally:
                connection.close()

        def _error(self, status: int) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(ERROR_BODY[status])))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(ERROR_BODY[status])

        def _reset(self) -> None:
            """Close with a TCP reset, no answer: as a load balancer dropping the connection."""
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

    return Handler
