"""Suspicious items: captions that do not describe their picture, and items far from every other.

`caption_outliers`: per item, how far its text vector is from its image vector in a space both share
(the text model's, where `conse` puts images, or CLIP's with an `open-clip` text and image encoder).
Raw cosines across modalities differ by item (some captions sit close to many pictures, some pictures
to many captions), so an item's own pair is held against its best matches among other items, as CSLS
does for translation (Conneau et al., ICLR 2018): score = (mean cosine of its text to the k pictures
that fit it best + of its picture to the k best texts) / 2 - cosine of its text to its own picture.
The best matches are looked for in a random reference sample of items (all items of a small table).
On the planted cases of tests/test_health.py raw cosines put 2 of 4 swapped captions first, this 4 of 4.

`isolated_items`: per item, 1 - the mean cosine to its nearest neighbours in one column.

Both hold one number per row and read the columns in batches; the highest scores come first.
"""

from __future__ import annotations

import numpy as np

from pipelines.errors import QueryError
from pipelines.search.neighbours import neighbour_blocks
from pipelines.search.query import Table
from transforms.lance_sink import vector_matrix
from transforms.vector_columns import COMBINED

REFERENCE_ITEMS = 2048
DEFAULT_NEIGHBOURS = 5      # also the best matches a caption and a picture are held against


def caption_pair(table: Table, between: str | None = None) -> tuple[str, str]:
    """The (text, image) encoders to compare: as given, or the table's text encoder and the first image
    encoder in its space."""
    encoders = {e.name: e for e in table.encoders()}
    if between:
        names = [name.strip() for name in between.split(",")]
        unknown = [name for name in names if name not in encoders]
        if len(names) != 2 or unknown:
            raise QueryError(f"--between takes two of the table's encoders, as A,B; it has {', '.join(encoders)}")
        first, second = (encoders[name] for name in names)
        if first.space is None or first.space != second.space:
            raise QueryError(f"--between {between}: {names[0]} and {names[1]} do not embed into one space, so their "
                             "cosines mean nothing (pair a text encoder with conse over its model, or CLIP's towers)")
        return first.name, second.name
    for text in (e for e in encoders.values() if e.modality == "text" and e.space):
        image = next((e for e in encoders.values() if e.modality == "image" and e.space == text.space), None)
        if image:
            return text.name, image.name
    raise QueryError("the table has no text encoder and image encoder in one space (a sentence-transformers text "
                     "encoder with conse over the same model, or open-clip with input: text and image); "
                     "--isolated needs neither")


def caption_outliers(table: Table, between: str | None = None) -> dict:
    """{"between": [text, image], "scores": per position, "positions": highest first}."""
    names = caption_pair(table, between)
    texts, images = (table.vector_column(name) for name in names)
    reference = texts.sample_positions(REFERENCE_ITEMS, seed=1)
    reference_texts, reference_images = texts.take(reference), images.take(reference)
    scores = np.empty(texts.rows, np.float32)
    for start, text, batch in texts.batches(extra=[images.name]):
        image = vector_matrix(batch[images.name])
        own = np.einsum("ij,ij->i", text, image)
        best = (_best_mean(text @ reference_images.T) + _best_mean(image @ reference_texts.T)) / 2
        scores[start:start + len(own)] = best - own
    return {"between": list(names), "scores": scores, "positions": np.argsort(-scores, kind="stable")}


def _best_mean(similarity: np.ndarray, count: int = DEFAULT_NEIGHBOURS) -> np.ndarray:
    count = min(count, similarity.shape[1])
    return np.partition(similarity, -count, axis=1)[:, -count:].mean(axis=1)


def isolated_items(table: Table, column: str = COMBINED, neighbours: int = DEFAULT_NEIGHBOURS) -> dict:
    """{"column", "scores": 1 - mean cosine to the `neighbours` nearest, per position, "positions": highest first}."""
    vectors = table.vector_column(column)
    if vectors.rows <= neighbours:
        raise QueryError(f"the table has {vectors.rows} items: too few to have {neighbours} neighbours each")
    nearest = np.full((vectors.rows, neighbours), -np.inf, np.float32)
    for block in neighbour_blocks(vectors):
        similarity = np.where(block.self_mask(), -np.inf, block.similarity)
        keep = min(neighbours, similarity.shape[1])
        top = -np.partition(-similarity, keep - 1, axis=1)[:, :keep]
        merged = np.concatenate([nearest[block.queries], top], axis=1)
        nearest[block.queries] = -np.partition(-merged, neighbours - 1, axis=1)[:, :neighbours]
    found = np.isfinite(nearest)
    # An item that met no other in its partitions is as far as can be: cosine -1.
    mean = np.where(found, nearest, 0.0).sum(axis=1) / np.maximum(found.sum(axis=1), 1)
    scores = (1.0 - np.where(found.any(axis=1), mean, -1.0)).astype(np.float32)
    ranked = np.argsort(-scores, kind="stable")
    # An item without a vector in this column is not isolated in it: it is not there.
    return {"column": column, "scores": scores, "positions": ranked[~vectors.missing()[ranked]]}

