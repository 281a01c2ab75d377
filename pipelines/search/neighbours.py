"""Every item's nearest neighbours in one vector column, in memory bounded whatever the table's size.

Small columns are compared with themselves exactly, a block of rows at a time. Larger ones are
partitioned as an IVF index partitions a column: spherical k-means on a sample gives about sqrt(rows)
centroids; each item is stored in its nearest partition and looks for neighbours in its `probes`
nearest, so a pair straddling a border is still compared. Each partition is then searched exactly,
with matrix products. The table's own ANN index answers one query at a time (about 2 ms each on 2
cores: over half an hour for a million items, docs/health.md); this costs a few passes over
the column instead.

Consumers see `Block`s: some items (queries), the items they are compared with (candidates) and the
cosines between them. Every pair of items that share a partition meets in some block, and an item
never meets itself as a candidate except where `self_mask` says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from transforms.vector_columns import VectorColumn

log = logging.getLogger(__name__)

EXACT_MAX_ROWS = 20_000        # up to here one exact block set: (rows x rows) cosines, a block at a time
QUERY_BLOCK = 2048             # query rows per matrix product
GROUP_BYTES = 256 * 2**20      # vectors held at once: a group's members and the items that probe them
TRAINING_PER_PARTITION = 40    # k-means sample per centroid (as the table's index trains)
KMEANS_ITERATIONS = 10
DEFAULT_PROBES = 3             # partitions an item looks in: docs/health.md measures the recall


@dataclass
class Block:
    """Cosines between `queries` (positions) and `candidates` (positions): `similarity[i, j]`."""

    queries: np.ndarray
    candidates: np.ndarray
    similarity: np.ndarray

    def self_mask(self) -> np.ndarray:
        return self.queries[:, None] == self.candidates[None, :]


def neighbour_blocks(column: VectorColumn, probes: int = DEFAULT_PROBES,
                     exact_max_rows: int = EXACT_MAX_ROWS) -> Iterator[Block]:
    """Blocks in which each item meets every item of its `probes` nearest partitions (all, if exact)."""
    rows = column.rows
    if rows <= exact_max_rows:
        yield from _exact_blocks(column)
        return
    partitions = Partitions.train(column, max(2, round(math.sqrt(rows))))
    stored, probed = partitions.assign(column, probes)
    group_rows = max(1, GROUP_BYTES // ((1 + probed.shape[1]) * column.dim * 4))
    yield from _partition_blocks(column, stored, probed, group_rows)


def _exact_blocks(column: VectorColumn) -> Iterator[Block]:
    everything = np.arange(column.rows)
    vectors = column.take(everything)
    for start in range(0, len(vectors), QUERY_BLOCK):
        queries = everything[start:start + QUERY_BLOCK]
        yield Block(queries, everything, vectors[queries] @ vectors.T)


@dataclass
class Partitions:
    centroids: np.ndarray

    @classmethod
    def train(cls, column: VectorColumn, count: int, seed: int = 0) -> Partitions:
        """Spherical k-means (cosine) on a sample of the column."""
        sample = column.take(column.sample_positions(count * TRAINING_PER_PARTITION, seed))
        rng = np.random.default_rng(seed)
        centroids = sample[rng.choice(len(sample), size=count, replace=False)]
        for _ in range(KMEANS_ITERATIONS):
            nearest = np.argmax(sample @ centroids.T, axis=1)
            sums = np.zeros_like(centroids)
            np.add.at(sums, nearest, sample)
            empty = ~sums.any(axis=1)
            sums[empty] = sample[rng.choice(len(sample), size=int(empty.sum()), replace=False)]
            centroids = sums / np.linalg.norm(sums, axis=1, keepdims=True)
        log.info("partitioned %s: %d partitions trained on %d vectors", column.name, count, len(sample))
        return cls(centroids)

    def assign(self, column: VectorColumn, probes: int) -> tuple[np.ndarray, np.ndarray]:
        """Per position, its nearest partition (where it is stored) and its `probes` nearest (where it looks)."""
        probes = min(probes, len(self.centroids))
        stored = np.empty(column.rows, np.int32)
        probed = np.empty((column.rows, probes), np.int32)
        for start, vectors, _ in column.batches():
            similarity = vectors @ self.centroids.T
            nearest = np.argpartition(-similarity, probes - 1, axis=1)[:, :probes]
            order = np.argsort(-np.take_along_axis(similarity, nearest, axis=1), axis=1)
            probed[start:start + len(vectors)] = np.take_along_axis(nearest, order, axis=1)
            stored[start:start + len(vectors)] = probed[start:start + len(vectors), 0]
        return stored, probed


def _partition_blocks(column: VectorColumn, stored: np.ndarray, probed: np.ndarray,
                      group_rows: int) -> Iterator[Block]:
    """One block per partition: the items that probe it against the items stored in it. Partitions are
    taken in groups of about `group_rows` stored items, whose vectors (and their queries') are read together."""
    order = np.argsort(stored, kind="stable")
    bounds = np.searchsorted(stored[order], np.arange(stored.max() + 2))
    probe_order = np.argsort(probed.ravel(), kind="stable")
    probe_bounds = np.searchsorted(probed.ravel()[probe_order], np.arange(stored.max() + 2))
    group_start = 0
    while group_start < len(bounds) - 1:
        group_end = int(np.searchsorted(bounds, bounds[group_start] + group_rows, side="right")) - 1
        group_end = max(group_end, group_start + 1)
        members = [order[bounds[p]:bounds[p + 1]] for p in range(group_start, group_end)]
        askers = [probe_order[probe_bounds[p]:probe_bounds[p + 1]] // probed.shape[1]
                  for p in range(group_start, group_end)]
        needed = np.unique(np.concatenate(members + askers))
        vectors = column.take(needed)
        for candidates, queries in zip(members, askers, strict=True):
            if len(candidates) and len(queries):
                found = vectors[np.searchsorted(needed, candidates)]
                for start in range(0, len(queries), QUERY_BLOCK):
                    chunk = queries[start:start + QUERY_BLOCK]
                    yield Block(chunk, candidates, vectors[np.searchsorted(needed, chunk)] @ found.T)
        group_start = group_end
