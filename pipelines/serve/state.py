"""What the service keeps between requests: the table at its latest version, checked on a timer, and what is
costly to compute and fixed for a version (health reports, the version list, a log's user index,
thumbnails by picture), each computed once, however many requests ask at the same time."""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from pipelines.search import query as q
from transforms.config import HttpSettings, RunConfig
from transforms.storage import ImageReader

log = logging.getLogger("catalog_embed.serve")
REFRESH_SECONDS = 5.0           # how often the latest version is looked for (a LIST on object stores)
THUMBNAIL_SIDE = 256
THUMBNAIL_CACHE_BYTES = 64 * 1024 * 1024
THUMBNAILS_AT_ONCE = 4          # decodes in flight: each holds a picture's pixels
FAILED_THUMBNAIL_SECONDS = 60.0
# A thumbnail is a page's picture, not a run's input: a slow or failing store gets a placeholder, not a wait.
THUMBNAIL_READER = ImageReader(HttpSettings(connect_timeout_s=2.0, read_timeout_s=5.0, retries=0,
                                            max_retry_after_s=0.0))


class Computed:
    """Values by key, each computed once on `runner` (requests asking for a key being computed wait for that
    computation, without a thread of their own while they wait: `future`), the `size` most recently used kept.
    A computation in flight is never dropped; a failure is not kept: the next request tries again."""

    def __init__(self, size: int, runner: ThreadPoolExecutor):
        self.size, self._runner = size, runner
        self._lock = threading.RLock()      # a future done at once runs its callback in the submitting thread
        self._values: OrderedDict[Hashable, Future] = OrderedDict()

    def future(self, key: Hashable, compute: Callable[[], Any]) -> Future:
        with self._lock:
            found = self._values.get(key)
            if found is None:
                found = self._values[key] = self._runner.submit(compute)
                found.add_done_callback(lambda done: self._forget_failed(key, done))
                done = [k for k, f in self._values.items() if f.done()]
                for old in done[:max(0, len(self._values) - self.size)]:
                    del self._values[old]
            self._values.move_to_end(key)
            return found

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        return self.future(key, compute).result()

    def _forget_failed(self, key: Hashable, done: Future) -> None:
        if done.exception() is not None:
            with self._lock:
                if self._values.get(key) is done:
                    del self._values[key]


class Thumbnails:
    """Thumbnails by the picture's content digest, up to THUMBNAIL_CACHE_BYTES in all; a picture that could not
    be read is not tried again for FAILED_THUMBNAIL_SECONDS."""

    def __init__(self):
        self._lock = threading.Lock()
        self._decoding = threading.BoundedSemaphore(THUMBNAILS_AT_ONCE)
        self._bytes: OrderedDict[str, bytes] = OrderedDict()
        self._failed: dict[str, tuple[float, Exception]] = {}
        self._held = 0

    def get(self, key: str, image_uri: str) -> bytes:
        with self._lock:
            if key in self._bytes:
                self._bytes.move_to_end(key)
                return self._bytes[key]
            failed = self._failed.get(key)
            if failed and time.monotonic() - failed[0] < FAILED_THUMBNAIL_SECONDS:
                raise failed[1]
        try:
            with self._decoding:
                made = _thumbnail(image_uri)
        except (OSError, ValueError) as err:
            with self._lock:
                self._failed[key] = (time.monotonic(), err)
            raise
        with self._lock:
            self._failed.pop(key, None)
            if key not in self._bytes:
                self._bytes[key] = made
                self._held += len(made)
            while self._held > THUMBNAIL_CACHE_BYTES:
                self._held -= len(self._bytes.popitem(last=False)[1])
        return made


def _thumbnail(image_uri: str) -> bytes:
    from PIL import Image

    from transforms.images import check_image, decode_image

    data = THUMBNAIL_READER.read(image_uri)
    check_image(data, RunConfig().max_pixels)
    image = decode_image(data, THUMBNAIL_SIDE)
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


class ServedTable:
    """The table at its latest version, looked for every `refresh_s` seconds on a thread of its own (a request
    never waits for the look), other versions on request, and what is computed once for them."""

    def __init__(self, uri: str, name: str, refresh_s: float = REFRESH_SECONDS):
        self.uri, self.name, self.refresh_s = uri, name, refresh_s
        self._latest = q.open_table(uri, name)
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        # One thread for health reports (two at once would hold two tables' vectors: requests queue for it),
        # and two for what takes seconds at most, so that they never wait behind a report.
        quick = ThreadPoolExecutor(2, thread_name_prefix="opening")
        self.reports = Computed(32, ThreadPoolExecutor(1, thread_name_prefix="reports"))  # (report, version, ..)
        self.versions = Computed(8, quick)      # version number -> the table opened at it
        self.history = Computed(1, quick)       # (latest version, period) -> the version list
        self.users = Computed(1, quick)         # (log, its size and time) -> UserIndex
        self.thumbnails = Thumbnails()

    def start(self) -> None:
        if self._watcher is None or not self._watcher.is_alive():
            self._stop.clear()
            self._watcher = threading.Thread(target=self._watch, name="latest-version", daemon=True)
            self._watcher.start()

    def stop(self) -> None:
        self._stop.set()

    def at(self, version: int | str | None = None) -> q.Table:
        """The latest version, or a number's (kept open) or a tag's (looked up each time: a tag can move)."""
        if version is None:
            return self._latest
        if isinstance(version, int):
            return self.versions.get(version, lambda: q.open_table(self.uri, self.name, version))
        return q.open_table(self.uri, self.name, version)

    def _watch(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                latest = self._latest.handle.to_lance().latest_version
                if latest != self._latest.handle.version:
                    self._latest = q.open_table(self.uri, self.name)
                    log.info("serving version %d", self._latest.handle.version)
            except Exception:   # noqa: BLE001 - a store's hiccup: keep serving the version held, look again later
                log.warning("could not look for a new version of the table", exc_info=True)
