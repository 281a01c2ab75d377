"""The budget's boundary is exact, though no step holds a budget's worth of keys: quantile bands, a count per band,
and the sort of the one band where the budget runs out (transforms/budget.py)."""

from __future__ import annotations

import random

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from transforms.budget import ALL, BudgetBoundaries, order_key

PAIRS = 5_000


def keys(seed: int) -> list[tuple]:
    """Sort keys as the budget makes them: an item's place (a hash of its id, or a field first), then the encoder's."""
    rng = random.Random(seed)
    items = [{"id": f"item-{n}", "fields": {"price": str(rng.choice([None, rng.randint(1, 50)]) or "")}}
             for n in range(PAIRS // 2)]
    return [(order_key(item, field, descending=True), rank) for item in items for rank in (0, 1)
            for field in [("price" if rng.random() < 0.5 else None)]]


@pytest.mark.parametrize("bands", [3, 40, 1_000])
def test_the_boundary_is_the_limits_smallest_key_whatever_the_bands(bands):
    text, clip = keys(1), keys(2)
    limits = {"text": 1_234, "clip": len(clip) - 1, "image": 10, "color": 0}
    expected = [("text", sorted(text)[limits["text"] - 1]), ("clip", sorted(clip)[limits["clip"] - 1])]
    with beam.Pipeline() as pipeline:
        pairs = pipeline | beam.Create([("text", k) for k in text] + [("clip", k) for k in clip]
                                       + [("image", k) for k in text[:10]] + [("color", k) for k in text[:5]])
        # image: all 10 fit its limit; color: a limit of 0 has no boundary (everything waits: Budget.waiting)
        assert_that(pairs | BudgetBoundaries(limits, bands), equal_to(expected))


def test_one_budget_for_all_encoders_counts_every_pair():
    found = keys(3)
    with beam.Pipeline() as pipeline:
        pairs = pipeline | beam.Create([(ALL, k) for k in found])
        assert_that(pairs | BudgetBoundaries({ALL: 2_500}, 10), equal_to([(ALL, sorted(found)[2_499])]))
