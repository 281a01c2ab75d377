"""Near-duplicate items: groups of items whose vectors in one column are all linked by cosines over a threshold.

Pairs over the threshold come from `neighbours` (exact on small tables, partitioned on large ones);
a group is a connected component of those pairs, and its score is the lowest cosine between any two
of its members, so a group is only as certain as its least similar pair. Groups come best first.
"""

from __future__ import annotations

import numpy as np

from pipelines.errors import QueryError
from pipelines.search.neighbours import neighbour_blocks
from pipelines.search.query import Table
from transforms.vector_columns import COMBINED, VectorColumn, ids_at

# Measured on real photos against their re-uploads (resized, recompressed, cropped, all three) and
# against different photos (`python -m benchmarks.health`, docs/health.md): EfficientNet-Lite0
# re-uploads keep 0.80 or more, different photos of other subjects stay under 0.49. The other kinds'
# defaults are where their vectors of one photo's copies agree; docs/health.md gives what separates and what not.
DEFAULT_THRESHOLDS = {"cnn": 0.75, "open-clip": 0.90, "color": 0.99, "conse": 0.95, "sentence-transformers": 0.95,
                      COMBINED: 0.85}
MAX_PAIRS = 5_000_000   # past this many linked pairs the threshold is too low to mean "duplicate"


def default_column(table: Table) -> str:
    """The first image encoder's column, else the combined vector."""
    return next((e.name for e in table.encoders() if e.modality == "image"), COMBINED)


def default_threshold(table: Table, column: str) -> float:
    kinds = {e["name"]: e["kind"] for e in table.meta["encoders"]}
    return DEFAULT_THRESHOLDS.get(kinds.get(column, COMBINED), DEFAULT_THRESHOLDS[COMBINED])


def find_duplicates(table: Table, column: str | None = None, threshold: float | None = None) -> dict:
    """{"column", "threshold", "groups": [{"ids", "score", "positions"}]}, groups best first."""
    name = column or default_column(table)
    vectors = table.vector_column(name)
    limit = threshold if threshold is not None else default_threshold(table, name)
    if not -1.0 <= limit <= 1.0:
        raise QueryError(f"--threshold is a cosine, between -1 and 1; got {limit}")
    first, second = _linked_pairs(vectors, limit)
    groups = [_group(vectors, members) for members in connected_components(first, second)]
    groups.sort(key=lambda g: (-g["score"], -len(g["ids"]), g["ids"][0]))
    return {"column": name, "threshold": limit, "rows": vectors.rows, "groups": groups}


def _linked_pairs(vectors: VectorColumn, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    firsts, seconds, count = [], [], 0
    for block in neighbour_blocks(vectors):
        linked = (block.similarity >= threshold) & (block.queries[:, None] < block.candidates[None, :])
        rows, columns = np.nonzero(linked)
        count += len(rows)
        if count > MAX_PAIRS:
            raise QueryError(f"over {MAX_PAIRS:,} pairs of items have a cosine of {threshold} or more in "
                             f"{vectors.name}: that is similarity, not duplication; raise --threshold")
        firsts.append(block.queries[rows])
        seconds.append(block.candidates[columns])
    return np.concatenate(firsts or [np.zeros(0, np.int64)]), np.concatenate(seconds or [np.zeros(0, np.int64)])


def connected_components(first: np.ndarray, second: np.ndarray) -> list[np.ndarray]:
    """The groups of positions that the pairs (first[i], second[i]) link, each sorted; pairs may repeat."""
    nodes, links = np.unique(np.concatenate([first, second]), return_inverse=True)
    a, b = links[: len(first)], links[len(first):]
    labels = np.arange(len(nodes))
    while True:     # every node takes the lowest label it is linked to, until none changes
        lowest = np.minimum(labels[a], labels[b])
        before = labels.copy()
        np.minimum.at(labels, a, lowest)
        np.minimum.at(labels, b, lowest)
        labels = labels[labels]
        if np.array_equal(labels, before):
            break
    order = np.argsort(labels, kind="stable")
    splits = np.flatnonzero(np.diff(labels[order])) + 1
    return [nodes[members] for members in np.split(order, splits)] if len(nodes) else []


def _group(vectors: VectorColumn, positions: np.ndarray) -> dict:
    members = vectors.take(positions)
    similarity = members @ members.T
    ids = ids_at(vectors.dataset, positions)
    order = np.argsort(ids)
    return {"ids": [ids[i] for i in order], "score": round(float(similarity.min()), 6),
            "positions": positions[order]}

