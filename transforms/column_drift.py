"""How far a table's vector columns moved between two versions, as one number per column.

The `score` is the energy distance 2E|a-b| - E|a-a'| - E|b-b'| between random samples of the two versions'
vectors (all rows of a small table), as V-statistics, so two equal sets score exactly 0. It is 0 when the
distributions agree and grows as they part; for unit vectors it is at most 2. `centroid_shift` is how far
the mean vector moved (Euclidean). The commit stage records both for each run; the drift report
(pipelines/health/drift.py) adds the ids and items that moved.
"""

from __future__ import annotations

import lance
import numpy as np
import pyarrow as pa

from transforms.vector_columns import COMBINED, VectorColumn

SAMPLE_ROWS = 2000


def column_scores(before: lance.LanceDataset, after: lance.LanceDataset, sample_rows: int = SAMPLE_ROWS) -> dict:
    """{column name: {"score", "centroid_shift"}} for the vector columns both versions have alike."""
    scores = {}
    for name, column in shared_columns(before, after).items():
        old = VectorColumn(before, column).sample_positions(sample_rows, seed=1)
        new = VectorColumn(after, column).sample_positions(sample_rows, seed=2)
        a, b = VectorColumn(before, column).take(old), VectorColumn(after, column).take(new)
        scores[name] = {"score": round(energy_distance(a, b), 6),
                        "centroid_shift": round(float(np.linalg.norm(a.mean(axis=0) - b.mean(axis=0))), 6)}
    return scores


def energy_distance(a: np.ndarray, b: np.ndarray) -> float:
    """2 mean|a_i - b_j| - mean|a_i - a_j| - mean|b_i - b_j|, over unit vectors."""
    def mean_distance(x: np.ndarray, y: np.ndarray) -> float:
        return float(np.sqrt(np.maximum(2.0 - 2.0 * (x @ y.T), 0.0)).mean())

    if len(a) == 0 or len(b) == 0:
        return 0.0
    return max(0.0, 2 * mean_distance(a, b) - mean_distance(a, a) - mean_distance(b, b))


def shared_columns(before: lance.LanceDataset, after: lance.LanceDataset) -> dict[str, str]:
    """Report name -> column, for the vector columns of the same name and size in both versions."""
    shared = {}
    for field in after.schema:
        if pa.types.is_fixed_size_list(field.type) and field.name in before.schema.names \
                and before.schema.field(field.name).type == field.type:
            shared[COMBINED if field.name == COMBINED else field.name[: -len("_vec")]] = field.name
    return shared
