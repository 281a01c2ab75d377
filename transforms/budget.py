"""Budgeted runs: at most `run.max_encode` forward passes, the rest left for later runs (a backfill).

Every (item, encoder) pair the run would encode gets a place in one stable order: the `run.backfill_order`
field first when the config names one (numbers compare as numbers, other values as text, missing values
last; "-field" puts the largest first), then a hash of the item's id, so that a column that fills over
several runs fills evenly across the catalog, then the encoder's place in the config. A budget is one
number for all encoders together, or one per encoder name.

The pairs within the budget are the smallest in that order. Their boundary is found in three passes over the
pairs' small sort keys, with memory that does not grow with the budget (`BudgetBoundaries`): approximate
quantiles cut each scope's keys into BANDS bands, the pairs of each band are counted, and the keys of the one
band where the budget runs out are sorted to find the exact boundary. No item crosses these steps, and each
item is then told, beside the boundaries as a side input, which of its encoders wait (`deferred`). An item
keeps a null vector and a null fingerprint for those, so the next run takes them up; its combined vector is
renormalised over the vectors it has. An item that would be written only to hold those nulls stays as the
table has it, and one that would have no vector at all (a new item, or every encoder changed) is not written:
both are counted as `deferred`, so read = written + unchanged + rejected + deferred.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.transforms.stats import ApproximateQuantiles

from transforms.encoders.base import Encoder
from transforms.fingerprint import has_input
from transforms.inference import ENCODE_ORDER, needs
from transforms.items import ITEMS

DEFERRED = "deferred"
ALL = "*"           # the scope of a budget for all encoders together
# Quantile bands per scope: the boundary's last pass sorts one band, about 1/BANDS of the pairs (plus the
# quantiles' error, as much again), whatever the budget.
BANDS = 1_000


def budget_scopes(max_encode: int | dict[str, int] | None) -> dict[str, int]:
    """The config's budget as {scope: passes}: one scope for all encoders (ALL), or one per encoder name."""
    if max_encode is None:
        return {}
    return dict(max_encode) if isinstance(max_encode, dict) else {ALL: max_encode}


def order_key(item: dict, field: str | None, descending: bool) -> tuple:
    """The item's place in the backfill order (smaller first)."""
    id_hash = int.from_bytes(hashlib.sha256(item["id"].encode()).digest()[:8], "big")
    if field is None:
        return (id_hash,)
    value = item["id"] if field == "id" else item["fields"].get(field)
    if value is None:
        return (1, (), id_hash)
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isnan(number):
        return (0, (0, -number if descending else number), id_hash)
    # Text in reverse: each code point negated, and a shorter text after the longer ones it starts.
    text = tuple(-ord(c) for c in value) + (1,) if descending else tuple(ord(c) for c in value)
    return (0, (1, text), id_hash)


class BudgetBoundaries(beam.PTransform):
    """Over (scope, key) pairs: per scope whose pairs exceed its limit (above 0), the largest key within its
    `limit` smallest, as (scope, boundary). Its memory: a quantile sketch per scope, a count per band, and the
    keys of one band."""

    def __init__(self, limits: dict[str, int], bands: int = BANDS):
        super().__init__()
        self._limits = limits
        self._bands = bands

    def expand(self, pairs):
        limits = self._limits
        edges = beam.pvalue.AsDict(pairs | "Key quantiles" >> ApproximateQuantiles.PerKey(self._bands + 1))
        banded = pairs | "Band of key" >> beam.Map(
            lambda pair, cuts: (pair[0], bisect.bisect_left(cuts[pair[0]], pair[1]), pair[1]), edges)
        cut = beam.pvalue.AsDict(
            banded
            | "Band" >> beam.Map(lambda found: ((found[0], found[1]), 1))
            | "Pairs per band" >> beam.CombinePerKey(sum)
            | "By scope" >> beam.Map(lambda counted: (counted[0][0], (counted[0][1], counted[1])))
            | "Bands of scope" >> beam.GroupByKey()
            | "Where the budget runs out" >> beam.FlatMap(lambda scoped: _cut(scoped, limits)))
        return (
            banded
            | "Keys of that band" >> beam.FlatMap(
                lambda found, cuts: [(found[0], found[2])] if cuts.get(found[0], (None,))[0] == found[1] else [], cut)
            | "The band's keys" >> beam.GroupByKey()
            | "Boundary" >> beam.Map(lambda scoped, cuts: (scoped[0], sorted(scoped[1])[cuts[scoped[0]][1] - 1]),
                                     cut)
        )


def _band(edges: list, key: Any) -> int:
    return bisect.bisect_left(edges, key)


def _cut(scoped: tuple[str, Iterable[tuple[int, int]]], limits: dict[str, int]) -> list[tuple[str, tuple]]:
    """(scope, (band, rank)): the band that holds the scope's `limit`-th smallest key, and its rank there; nothing
    where every pair fits, or where nothing may be encoded (a limit of 0: `Budget.waiting`)."""
    scope, counted = scoped
    counts, limit, before = sorted(counted), limits[scope], 0
    if limit == 0 or sum(count for _, count in counts) <= limit:
        return []
    for band, count in counts:
        if before + count >= limit:
            return [(scope, (band, limit - before))]
        before += count
    return []


class Budget:
    """Which encoders of an item this run encodes, under a budget per scope."""

    def __init__(self, encoders: Sequence[Encoder], max_encode: int | dict[str, int] | None,
                 backfill_order: str | None):
        self.limits = budget_scopes(max_encode)
        self._encoders = [e for e in encoders if e.modality in ENCODE_ORDER]   # item2vec trains whole, unbudgeted
        self._rank = {e.name: rank for rank, e in enumerate(self._encoders)}
        self._field = backfill_order.lstrip("-") if backfill_order else None
        self._descending = bool(backfill_order and backfill_order.startswith("-"))

    def scope(self, encoder: str) -> str | None:
        return ALL if ALL in self.limits else (encoder if encoder in self.limits else None)

    def pairs(self, item: dict) -> list[tuple[str, tuple]]:
        """(scope, sort key) for each budgeted encoder the item needs."""
        key = order_key(item, self._field, self._descending)
        return [(scope, (key, self._rank[e.name])) for e in self._encoders
                if (scope := self.scope(e.name)) is not None and needs(item, e)]

    def waiting(self, item: dict, boundaries: dict[str, Any]) -> list[str]:
        """The encoders the item needs that are past their scope's boundary (every one, at a budget of 0)."""
        key = order_key(item, self._field, self._descending)
        return [e.name for e in self._encoders
                if (scope := self.scope(e.name)) is not None and needs(item, e)
                and (self.limits[scope] == 0 or scope in boundaries
                     and (key, self._rank[e.name]) > boundaries[scope])]


class ApplyBudget(beam.DoFn):
    """Mark each item's encoders that wait for a later run (`deferred`); items with nothing to write this run
    leave, tagged `deferred`, as (encoder names it waits for)."""

    def __init__(self, budget: Budget, encoders: Sequence[Encoder]):
        self._budget = budget
        self._encoders = list(encoders)

    def process(self, item: dict, boundaries: dict[str, Any]):
        waiting = self._budget.waiting(item, boundaries)
        if waiting:
            item = dict(item, deferred=waiting)
            worth_writing = item["rewrite"] or any(needs(item, e) for e in self._encoders)
            if not worth_writing or not self._has_vector(item):
                yield beam.pvalue.TaggedOutput(DEFERRED, waiting)
                return
        yield item

    def _has_vector(self, item: dict) -> bool:
        """Whether the item gets some vector: one it keeps, or one an encoder it is not waiting for makes."""
        return any(has_input(item, e.modality) and e.name not in item["deferred"] for e in self._encoders)


def apply_budget(items, encoders: Sequence[Encoder], max_encode: int | dict[str, int] | None,
                 backfill_order: str | None) -> dict:
    """Split items into those this run writes (`items`, with `deferred` set) and those it leaves (`deferred`);
    `waiting` counts, per encoder, the items left waiting for it."""
    budget = Budget(encoders, max_encode, backfill_order)
    if not budget.limits:       # no budget: nothing waits, and no stage waits for all items to be decided
        return {ITEMS: items, DEFERRED: items.pipeline | "Nothing deferred" >> beam.Create([]),
                "waiting": beam.pvalue.AsDict(items.pipeline | "Nothing waiting" >> beam.Create([]))}
    boundaries = beam.pvalue.AsDict(
        items | "Budgeted pairs" >> beam.FlatMap(budget.pairs) | "Budget boundaries" >> BudgetBoundaries(budget.limits))
    split = items | "Apply budget" >> beam.ParDo(ApplyBudget(budget, encoders), boundaries).with_outputs(
        DEFERRED, main=ITEMS)
    waiting = beam.pvalue.AsDict(
        (split[ITEMS] | "Waiting encoders" >> beam.FlatMap(lambda item: item["deferred"]),
         split[DEFERRED] | "Waiting encoders of deferred" >> beam.FlatMap(lambda names: names))
        | "All waiting" >> beam.Flatten()
        | "Waiting per encoder" >> beam.combiners.Count.PerElement())
    return {ITEMS: split[ITEMS], DEFERRED: split[DEFERRED], "waiting": waiting}


def backfill_progress(with_input: dict[str, int], waiting: dict[str, int], encoded: dict[str, int],
                      limits: dict[str, int]) -> dict:
    """Under a budget, for each encoder that encodes this run or has items waiting: how many of the items with
    its input hold its vector, and the runs left at this budget. {"encoders": {name: {"done": n, "of": m}},
    "runs_left": r (None: never, at a budget of 0)}; {} when no encoder has a backfill."""
    names = [name for name in sorted(with_input) if (ALL in limits or name in limits)
             and (waiting.get(name) or encoded.get(name))]
    if not names:
        return {}
    if ALL in limits:
        runs = _runs(sum(waiting.values()), limits[ALL])
    else:
        runs_each = [_runs(waiting.get(name, 0), limits[name]) for name in names]
        runs = None if None in runs_each else max(r for r in runs_each if r is not None)
    return {"encoders": {name: {"done": with_input[name] - waiting.get(name, 0), "of": with_input[name]}
                         for name in names}, "runs_left": runs}


def _runs(left: int, budget: int) -> int | None:
    if not left:
        return 0
    return math.ceil(left / budget) if budget else None
