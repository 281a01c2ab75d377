"""Progress of long runs: a Beam counter per stage (remote runners show these) and, on each worker,
a log line every few seconds with the count and rate, so a local run is never silent. The encode stages
know their work up front (`LogWork`: items per encoder, logged once before encoding starts) and log how
much of it is done and, at the worker's rate, how long the rest takes.

The work reaches the encode stages' progress lines through the head of those stages (`KnowWork`), as a side
input that is complete before they start, and from there through this process's `_WORK`. A side input of
the progress counter itself, after the encoders, would make runners hold the encoded items there until all
are encoded: the writes, and the staging that bounds what a kill loses, would wait for the last item."""

from __future__ import annotations

import logging
import time

import apache_beam as beam
from apache_beam.metrics import Metrics

log = logging.getLogger("catalog_embed.progress")


_WORK: dict[tuple[str, str], int] = {}     # the run's encode work, as this process's KnowWork last saw it


class KnowWork(beam.DoFn):
    """Pass items through, making the run's encode work (a side input) known to this process's progress lines."""

    def setup(self):
        self._told = False

    def process(self, item, work: dict[tuple[str, str], int]):
        if not self._told:          # once per instance: the same side input for every item of the run
            _WORK.clear()
            _WORK.update(work)
            self._told = True
        yield item


class LogProgress(beam.DoFn):
    """Pass elements through, counting them as `items_<stage>`."""

    def __init__(self, stage: str, every_seconds: float = 5.0, work_key: tuple[str, str] | None = None):
        self._stage = stage
        self._every = every_seconds
        self._work_key = work_key      # the key of this stage's total in the `work` side input, if it has one
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
            rate = self._count / max(now - self._started, 1e-9)
            total = _WORK.get(self._work_key) if self._work_key else None
            if total:
                log.info("%s: %d of %d items on this worker, %.1f items/s, about %.0f s left at this rate",
                         self._stage, self._count, total, rate, max(total - self._count, 0) / rate)
            else:
                log.info("%s: %d items on this worker, %.1f items/s", self._stage, self._count, rate)
        yield element


class LogWork(beam.DoFn):
    """Log the run's encode work once, before the encode stages start: per encoder, the items it must encode
    (shared inputs are encoded once, so its forward passes are at most these)."""

    def process(self, _trigger, work: dict[tuple[str, str], int]):
        per_encoder = sorted((name, count) for (kind, name), count in work.items() if kind == "encoder")
        log.info("to encode: %s", ", ".join(f"{name} {count:,} items" for name, count in per_encoder) or "nothing")
        yield work
