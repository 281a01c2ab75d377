"""Local stand-ins for the object stores, started by the tests on 127.0.0.1 and stopped after them:
moto's S3 server and gcp-storage-emulator's GCS (both from PyPI). Clients find them the way their
users point them anywhere: the standard environment variables (`AWS_ENDPOINT_URL` and the AWS keys,
which boto3 and Lance both read; `STORAGE_EMULATOR_HOST` for Google's storage client)."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

BIN = Path(sys.executable).parent
REQUEST_LINE = re.compile(r'"(?:\x1b\[[0-9;]*m)*([A-Z]+) (/[^ ?"]*)[^"]* HTTP/1\.[01](?:\x1b\[[0-9;]*m)*" (\d{3})')


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def local_server(command: list[str], port: int, log: Path, seconds: float = 30.0,
                 cwd: Path | None = None) -> Iterator[str]:
    """Run a server on 127.0.0.1:`port` (from `cwd`), its output in `log`, until the block ends; yields its URL."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    try:
        deadline = time.monotonic() + seconds
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[0]} did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@dataclass
class S3Server:
    """moto's S3 server and its request log, read as (method, bucket/key, status) per request."""

    endpoint: str
    log: Path

    def mark(self) -> int:
        """A point in the log: `requests(since=mark)` is what came after it."""
        return self.log.stat().st_size

    def requests(self, since: int = 0) -> list[tuple[str, str, int]]:
        with self.log.open("rb") as handle:
            handle.seek(since)
            text = handle.read().decode("utf-8", "replace")
        return [(method, unquote(path.lstrip("/")), int(status)) for method, path, status in REQUEST_LINE.findall(text)]


AWS_ENVIRONMENT = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}


@contextlib.contextmanager
def environment(**variables: str) -> Iterator[None]:
    """These environment variables set for the block (and for the processes it starts), then as they were."""
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def s3_server(folder: Path) -> Iterator[S3Server]:
    """moto's S3 server, with the AWS environment pointing at it."""
    port = free_port()
    log = folder / "moto.log"
    with local_server([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], port, log) as url, \
            environment(AWS_ENDPOINT_URL=url, **AWS_ENVIRONMENT):
        yield S3Server(url, log)


@contextlib.contextmanager
def gcs_server(folder: Path, bucket: str) -> Iterator[str]:
    """gcp-storage-emulator's GCS (Google's JSON API, as Beam's GCS client speaks it), with `bucket`."""
    port = free_port()
    command = [str(BIN / "gcp-storage-emulator"), "start", "--host=127.0.0.1", f"--port={port}", "--in-memory",
               f"--default-bucket={bucket}"]
    with local_server(command, port, folder / "gcs.log") as url, environment(STORAGE_EMULATOR_HOST=url):
        yield url
