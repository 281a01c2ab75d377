"""A table version's vector columns, read in bounded pieces: a stream of batches, rows by position, samples.

Positions are a version's row offsets in scan order (what `lance.LanceDataset.take` takes), so reports
hold an int per row and fetch vectors only for the rows they are looking at.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import lance
import numpy as np
import pyarrow as pa

from transforms.lance_sink import vector_matrix

COMBINED = "vector"
READ_BATCH_ROWS = 8192


@dataclass(frozen=True)
class VectorColumn:
    """One vector column (`<encoder>_vec`, or `vector` for the combined one) of a table version."""

    dataset: lance.LanceDataset
    name: str

    @property
    def rows(self) -> int:
        return self.dataset.count_rows()

    @property
    def dim(self) -> int:
        return self.dataset.schema.field(self.name).type.list_size

    def batches(self, extra: Sequence[str] = ()) -> Iterator[tuple[int, np.ndarray, pa.RecordBatch]]:
        """(first position, vectors, the batch with `extra` columns) over the whole column, in order."""
        start = 0
        for batch in self.dataset.to_batches(columns=[self.name, *extra], batch_size=READ_BATCH_ROWS):
            yield start, vector_matrix(batch[self.name]), batch
            start += batch.num_rows

    def missing(self) -> np.ndarray:
        """Per position, whether the item has no vector in this column (no input for its encoder)."""
        if self.name == COMBINED:           # every written item has one
            return np.zeros(self.rows, bool)
        return np.concatenate([batch[self.name].is_null().to_numpy(zero_copy_only=False)
                               for batch in self.dataset.to_batches(columns=[self.name], batch_size=READ_BATCH_ROWS)]
                              or [np.zeros(0, bool)])

    def take(self, positions: np.ndarray) -> np.ndarray:
        if len(positions) == 0:
            return np.zeros((0, self.dim), np.float32)
        return vector_matrix(self.dataset.take(np.asarray(positions, np.int64), columns=[self.name])[self.name])

    def sample_positions(self, count: int, seed: int = 0) -> np.ndarray:
        """Up to `count` distinct positions, drawn at random but the same for the same seed and size."""
        rows = self.rows
        if rows <= count:
            return np.arange(rows)
        return np.sort(np.random.default_rng(seed).choice(rows, size=count, replace=False))


def ids_at(dataset: lance.LanceDataset, positions: np.ndarray) -> list[str]:
    if len(positions) == 0:
        return []
    return dataset.take(np.asarray(positions, np.int64), columns=["id"])["id"].to_pylist()
