"""Progress of long runs: a Beam counter per stage (remote runners show these) and, on each worker,
a log line every few seconds with the count and rate, so a local run is never silent."""

from __future__ import annotations

import logging
import time

import apache_beam as beam
from apache_beam.metrics import Metrics

log = logging.getLogger("catalog_embed.progress")


class LogProgress(beam.DoFn):
    """Pass elements through, counting them as `items_<stage>`."""

    def __init__(self, stage: str, every_seconds: float = 5.0):
        self._stage = stage
        self._every = every_seconds
        self._counter = Metrics.counter("catalog_embed", f"items_{stage}")

    def setup(self):
        self._count = 0
        self._started = self._last = time.monotonic()

    def process(self, element):
        self._count += 1
        self._counter.inc()
        now = time.monotonic()
        if now - self._last >= self._every:
            self._last = now
            log.info("%s: %d items on this worker, %.1f items/s", self._stage, self._count,
                     self._count / max(now - self._started, 1e-9))
        yield element
