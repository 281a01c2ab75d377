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
Text-to-image, per multimodal encoder, with a file of (query, expected id) pairs: each query's words
search all the table's image vectors (exact), and recall@k is the share of queries whose expected
item is among the k nearest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from pipelines.errors import QueryError
from pipelines.search.query import Table
from pipelines.search.zero_shot import DEFAULT_TEMPLATES, label_vectors
from transforms.lance_sink import vector_matrix

RECALL_AT = (1, 5, 10)
TEXT_TO_IMAGE_AT = (1, 5)
MAP_DEPTH = 10
COMBINED = "vector"

log = logging.getLogger(__name__)


def evaluate(table: Table, templates: Sequence[str] = DEFAULT_TEMPLATES,
             queries: Sequence[tuple[str, str]] = (), where: str | None = None) -> dict:
    """The table's quality report; `queries` are (query text, expected id) pairs for text-to-image, and
    `where` (SQL over the table's columns, e.g. "split = 'test'") picks the items evaluated."""
    columns = {name: f"{name}_vec" for name in table.stored_weights} | {"combined": COMBINED}
    labelled = f"label IS NOT NULL AND ({where})" if where else "label IS NOT NULL"
    data = table.handle.to_lance().to_table(columns=["label", *columns.values()], filter=labelled)
    if data.num_rows < 2:
        raise QueryError("the table has fewer than two labelled items; evaluate needs catalog.label_field "
                         "(or a format with labels: food101, digikala, fashion)")
    labels = np.asarray(data["label"].to_pylist(), dtype=object)
    vectors = {name: vector_matrix(data[column]) for name, column in columns.items()}
    retrieval, shared = {}, bool(np.any(_others_with_label(labels) > 0))
    if not shared:
        log.info("no label is shared by two items: no retrieval quality, only zero-shot and text-to-image")
    for name, found in vectors.items() if shared else ():
        started = time.perf_counter()
        retrieval[name] = retrieval_quality(found, labels)
        log.info("retrieval by %s: %d items searched in %.1fs", name, len(found), time.perf_counter() - started)
    zero_shot = {e.name: {"top1_accuracy": zero_shot_accuracy(e, vectors[e.name], labels, templates)}
                 for e in table.encoders() if e.text_to_image}
    report = {"table": table.handle.name, "version": table.handle.version, "items": data.num_rows,
              "labels": len(set(labels)), "queries": int(np.sum(_others_with_label(labels) > 0)),
              "retrieval": retrieval, "zero_shot": zero_shot}
    if queries:
        report["text_to_image"] = {e.name: text_to_image_recall(table, e, queries, where)
                                   for e in table.encoders() if e.text_to_image}
    return report


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
    return top1_accuracy(image_vectors, label_vectors(encoder, names, templates), names, labels)


def top1_accuracy(image_vectors: np.ndarray, label_matrix: np.ndarray, names: Sequence[str],
                  labels: np.ndarray) -> float:
    """The share of images whose most probable label (the nearest label vector) is theirs."""
    predicted = np.asarray(names, dtype=object)[(image_vectors @ label_matrix.T).argmax(axis=1)]
    return float(np.mean(predicted == labels))


def text_to_image_recall(table: Table, encoder, queries: Sequence[tuple[str, str]],
                         where: str | None = None) -> dict[str, float]:
    """recall@1/5 of the queries' words against every image vector of the encoder's column (of the
    items `where` picks)."""
    data = table.handle.to_lance().to_table(columns=["id", f"{encoder.name}_vec"], filter=where)
    ids, images = np.asarray(data["id"].to_pylist(), dtype=object), vector_matrix(data[f"{encoder.name}_vec"])
    position = {item: k for k, item in enumerate(ids)}
    unknown = sorted({item for _, item in queries if item not in position})
    if unknown:
        raise QueryError(f"{len(unknown)} expected ids of the queries are not in the table, "
                         f"e.g. {', '.join(unknown[:5])}")
    texts, expected = [text for text, _ in queries], np.array([position[item] for _, item in queries])
    ranks = image_ranks(encoder.text_queries(texts), images, expected)
    return {"queries": len(queries)} | {f"recall@{k}": float(np.mean(ranks < k)) for k in TEXT_TO_IMAGE_AT}


def image_ranks(query_vectors: np.ndarray, images: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Per query, how many images score above its expected one (0: found first). Ties count against it."""
    similarity = query_vectors @ images.T
    return np.sum(similarity >= similarity[np.arange(len(expected)), expected][:, None], axis=1) - 1


def read_queries(path: str) -> list[tuple[str, str]]:
    """(query, expected id) pairs from a CSV or JSON Lines file with the columns `query` and `id`."""
    import pyarrow.csv
    import pyarrow.json
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as handle:
        read = pyarrow.json.read_json if path.endswith((".jsonl", ".json")) else pyarrow.csv.read_csv
        try:
            data = read(handle)
        except pyarrow.ArrowInvalid as err:
            raise QueryError(f"cannot read the queries file {path}: {err}") from err
    if not {"query", "id"} <= set(data.column_names):
        raise QueryError(f"the queries file {path} needs the columns query and id; "
                         f"it has {', '.join(data.column_names)}")
    pairs = [(str(q), str(i)) for q, i in zip(data["query"].to_pylist(), data["id"].to_pylist(), strict=True)
             if q and i is not None]
    if len(pairs) < data.num_rows:
        raise QueryError(f"the queries file {path} has {data.num_rows - len(pairs)} rows without a query or an id")
    return pairs


def _others_with_label(labels: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return counts[inverse] - 1

