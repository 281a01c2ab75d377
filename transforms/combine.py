"""The weighting math of the design.

Each per-encoder vector v_i is unit length and the weights w_i sum to 1. The stored combined vector
is concat(sqrt(w_i) * v_i): unit length, and dot(a, b) = sum_i w_i * cos_i(a, b). A query with other
weights w'_i uses concat(w'_i / sqrt(w_i) * q_i) against the same column and scores
sum_i w'_i * cos_i, with no re-embedding.

An item missing a modality (no image, no interaction history) has no vector from those encoders: their
part of its combined vector is zeros and the rest is scaled by 1/sqrt(W), W the sum of the weights of
the encoders it has, so that it stays unit length. Against an item that has them all, it then scores
sum_{i present} w_i cos_i / sqrt(W) in the combined column, so a search ranks candidates by it and then
scores them exactly (`weighted_cosines`): the weighted mean of the cosines over the encoders that both the
query and the item have (docs/table.md, "The weighting math").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def normalise_weights(weights: Mapping[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    if total <= 0 or any(w < 0 for w in weights.values()):
        raise ValueError("weights must be >= 0 and not all zero")
    return {name: w / total for name, w in weights.items()}


def combine(vectors: Mapping[str, np.ndarray], weights: Mapping[str, float], order: Sequence[str],
            dims: Mapping[str, int]) -> np.ndarray:
    """The stored combined vector of one item (`combine_rows` for one row); ValueError where it has no vector
    from any encoder with a weight."""
    combined, valid = combine_rows({name: vector[None] for name, vector in vectors.items()},
                                   {name: np.ones(1, bool) for name in vectors}, weights, order, dims, 1)
    if not valid.any():               # no row at all where the item has no vector from any encoder
        raise ValueError("the item has no vector from any encoder with a weight")
    return combined[0]


def combine_rows(vectors: Mapping[str, np.ndarray], present: Mapping[str, np.ndarray], weights: Mapping[str, float],
                 order: Sequence[str], dims: Mapping[str, int], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Items' stored combined vectors, concat(sqrt(w_i / W) * v_i) in `order`, with zeros for the encoders an
    item has no vector from and W the sum of the weights of those it has. `vectors[name]`: an (n, dim) matrix,
    `present[name]`: which of its rows hold a vector (an encoder in neither is absent from every item). Returns
    the (rows, sum of dims) matrix and which rows have a vector from some encoder with a weight (the others are
    zeros)."""
    # A share of the total, so that an item with every vector is scaled by exactly 1.
    total = sum(weights[name] for name in order)
    share = sum(weights[name] * present[name] for name in order if name in present) / total
    valid = np.asarray(share > 0) & np.ones(rows, bool)
    scale = np.where(valid, share, 1.0)
    parts = [np.sqrt(weights[name] / scale).astype(np.float32)[:, None] * np.where(present[name][:, None],
                                                                                   vectors[name], np.float32(0))
             if name in present else np.zeros((rows, dims[name]), np.float32) for name in order]
    combined = np.concatenate(parts, axis=1).astype(np.float32) if parts else np.zeros((rows, 0), np.float32)
    return np.where(valid[:, None], combined, np.float32(0)), valid


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
            raise ValueError(f"a weight for '{name}' needs a query vector for it, and the query has none "
                             "(an item without that input, or a query that encoder cannot take)")
        parts.append(weight / np.sqrt(stored[name]) * queries[name] if weight else np.zeros(dims[name], np.float32))
    return np.concatenate(parts).astype(np.float32)


def weighted_cosines(stored: np.ndarray, queries: Mapping[str, np.ndarray], wanted: Mapping[str, float],
                     order: Sequence[str], dims: Mapping[str, int]) -> np.ndarray:
    """Per stored combined vector (a row of `stored`), sum_i w'_i cos_i / sum_i w'_i over the encoders that
    both the query and the item have; NaN where they share none. An item's part of its combined vector is
    its unit vector scaled, or zeros where it has none, so each cosine is read off the part itself."""
    scores, shared = np.zeros(len(stored)), np.zeros(len(stored))
    start = 0
    for name in order:
        part, start = stored[:, start:start + dims[name]], start + dims[name]
        weight = wanted.get(name, 0.0)
        if weight and name in queries:
            norms = np.linalg.norm(part, axis=1)
            present = norms > 0
            scores += weight * np.where(present, part @ queries[name] / np.where(present, norms, 1.0), 0.0)
            shared += weight * present
    return np.where(shared > 0, scores / np.where(shared > 0, shared, 1.0), np.nan)
