"""The weighting math of the design.

Each per-encoder vector v_i is unit length and the weights w_i sum to 1. The stored combined vector
is concat(sqrt(w_i) * v_i): unit length, and dot(a, b) = sum_i w_i * cos_i(a, b). A query with other
weights w'_i uses concat(w'_i / sqrt(w_i) * q_i) against the same column and scores
sum_i w'_i * cos_i, with no re-embedding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def normalise_weights(weights: Mapping[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    if total <= 0 or any(w < 0 for w in weights.values()):
        raise ValueError("weights must be >= 0 and not all zero")
    return {name: w / total for name, w in weights.items()}


def combine(vectors: Mapping[str, np.ndarray], weights: Mapping[str, float], order: Sequence[str]) -> np.ndarray:
    """The stored combined vector of one item: concat(sqrt(w_i) * v_i) in `order`."""
    return np.concatenate([np.sqrt(weights[name]) * vectors[name] for name in order]).astype(np.float32)


def reweighted_query(
    queries: Mapping[str, np.ndarray],
    stored: Mapping[str, float],
    wanted: Mapping[str, float],
    order: Sequence[str],
    dims: Mapping[str, int],
) -> np.ndarray:
    """A query vector for the combined column that scores sum_i wanted_i * cos_i.

    Encoders with no query vector, or a wanted weight of 0, contribute zeros. An encoder stored with
    weight 0 cannot be searched through the combined column (its part of it is zero).
    """
    parts = []
    for name in order:
        weight = wanted.get(name, 0.0)
        if weight and stored[name] == 0:
            raise ValueError(f"'{name}' was stored with weight 0 and cannot be weighted at query time")
        if weight and name not in queries:
            raise ValueError(f"a weight for '{name}' needs a query vector for it")
        parts.append(weight / np.sqrt(stored[name]) * queries[name] if weight else np.zeros(dims[name], np.float32))
    return np.concatenate(parts).astype(np.float32)
