"""How good a table's vectors are, measured with its catalog's labels.

Retrieval, per vector column: every labelled item queries all the others (leave one out, exact
search, no index) and an item with the same label is relevant.
- recall@k: the share of queries with a relevant item among their k nearest;
- mAP@10: the mean over queries of AP@10 = sum_{i<=10} precision@i * rel_i / min(R, 10), with R the
  number of other items that have the query's label.
Queries whose label no other item has are left out (`queries` says how many count).
Zero-shot, per multimodal encoder: each item's stored image vector is classified over the table's
set of labels (their words through prompt templates), and top-1 accuracy is the share labelled right.
For Food-101 these are the protocol's 101 class names.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from pipelines.errors import QueryError
from pipelines.query import Table
from pipelines.zero_shot import DEFAULT_TEMPLATES, label_probabilities, label_vectors
from transforms.lance_sink import vector_matrix

RECALL_AT = (1, 5, 10)
MAP_DEPTH = 10
COMBINED = "vector"

log = logging.getLogger(__name__)


def evaluate(table: Table, templates: Sequence[str] = DEFAULT_TEMPLATES) -> dict:
    columns = {name: f"{name}_vec" for name in table.stored_weights} | {"combined": COMBINED}
    data = table.handle.to_lance().to_table(columns=["label", *columns.values()], filter="label IS NOT NULL")
    if data.num_rows < 2:
        raise QueryError("the table has fewer than two labelled items; evaluate needs catalog.label_field "
                         "(or a format with labels: food101, digikala, fashion)")
    labels = np.asarray(data["label"].to_pylist(), dtype=object)
    vectors = {name: vector_matrix(data[column]) for name, column in columns.items()}
    retrieval = {}
    for name, found in vectors.items():
        started = time.perf_counter()
        retrieval[name] = retrieval_quality(found, labels)
        log.info("retrieval by %s: %d items searched in %.1fs", name, len(found), time.perf_counter() - started)
    zero_shot = {e.name: {"top1_accuracy": zero_shot_accuracy(e, vectors[e.name], labels, templates)}
                 for e in table.encoders() if e.text_to_image}
    return {"table": table.handle.name, "version": table.handle.version, "items": data.num_rows,
            "labels": len(set(labels)), "queries": int(np.sum(_others_with_label(labels) > 0)),
            "retrieval": retrieval, "zero_shot": zero_shot}


def retrieval_quality(vectors: np.ndarray, labels: np.ndarray, chunk: int = 1024) -> dict[str, float]:
    """recall@k and mAP@10 of leave-one-out search by cosine (the vectors are unit length)."""
    relevant_count = _others_with_label(labels)
    queries = np.flatnonzero(relevant_count > 0)
    if len(queries) == 0:
        raise QueryError("no label is shared by two items: there is nothing to retrieve")
    depth = min(MAP_DEPTH, len(labels) - 1)
    hits, precision_sum = np.zeros(len(RECALL_AT)), 0.0
    for start in range(0, len(queries), chunk):
        rows = queries[start:start + chunk]
        similarity = vectors[rows] @ vectors.T
        similarity[np.arange(len(rows)), rows] = -np.inf
        nearest = np.argpartition(-similarity, depth - 1, axis=1)[:, :depth]
        order = np.argsort(-np.take_along_axis(similarity, nearest, axis=1), axis=1, kind="stable")
        nearest = np.take_along_axis(nearest, order, axis=1)
        relevant = labels[nearest] == labels[rows, None]
        hits += [relevant[:, :k].any(axis=1).sum() for k in RECALL_AT]
        precision = relevant.cumsum(axis=1) / np.arange(1, depth + 1)
        precision_sum += ((precision * relevant).sum(axis=1) / np.minimum(relevant_count[rows], MAP_DEPTH)).sum()
    quality = {f"recall@{k}": float(h / len(queries)) for k, h in zip(RECALL_AT, hits, strict=True)}
    return quality | {f"map@{MAP_DEPTH}": float(precision_sum / len(queries))}


def zero_shot_accuracy(encoder, image_vectors: np.ndarray, labels: np.ndarray, templates: Sequence[str]) -> float:
    names = sorted(set(labels))
    model = encoder.load_text_model()
    probabilities = label_probabilities(image_vectors, label_vectors(encoder, model, names, templates),
                                        encoder.logit_scale(model))
    predicted = np.asarray(names, dtype=object)[probabilities.argmax(axis=1)]
    return float(np.mean(predicted == labels))


def _others_with_label(labels: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return counts[inverse] - 1

