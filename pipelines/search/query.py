"""Similarity search over a table the job wrote.

The table's metadata names its encoders, so a query encodes its text or image with exactly the
models that embedded the items, in every encoder's space it can reach. The score is the weighted
sum of per-encoder cosines, with the table's weights or the user's (`--weights`).

Each search is planned (`plan_search`): an IVF index answers by probing the partitions near the query,
and a filter keeps only its rows there, so a selective filter's best rows, which lie elsewhere, would be
missed (recall@10 0.1 at 0.1% of 1M rows). A filter is counted first, through the fields' scalar
indexes: few enough rows are searched exactly; more, through the index with as many partitions probed as
it takes for them to hold FILTERED_CANDIDATES of the filter's rows. The numbers are measured at 1M rows
(benchmarks/query.py, docs/search.md).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import lancedb
import numpy as np
import pyarrow as pa
from lancedb.query import LanceVectorQueryBuilder
from PIL import Image

from pipelines.errors import QueryError
from transforms.combine import normalise_weights, reweighted_query, weighted_cosines
from transforms.config import EncoderConfig, RunConfig
from transforms.encoders import build_encoder
from transforms.encoders.base import Encoder, l2_normalise
from transforms.images import check_image, decode_image
from transforms.interaction_log import items_of_user
from transforms.lance_sink import TEXT_COLUMN, id_in, rows_by_id, table_metadata, vector_matrix
from transforms.run_log import read_runs
from transforms.storage import ImageReader
from transforms.vector_columns import COMBINED, VectorColumn

# The combined column ranks items missing a modality a little off their exact score (transforms/combine.py):
# this many candidates per result are scored exactly and the best kept.
RESCORED_CANDIDATES = 4
# At 1M rows (docs/search.md): 50 partitions of 1,000 and a refine over 5x the candidates hold recall@10 at
# 0.98 unfiltered (Lance's default 20: 0.80); an exact search costs about 20 us a filtered row; the index holds
# recall@10 at 1.0 where the probed partitions hold 4,000 of the filter's rows (a 1% filter: 400 partitions),
# also after 30 nights with 7 delta segments, where 2,500 gave 0.85, 3,000 0.97 and 3,500 0.996 (docs/search.md).
ANN_NPROBES = 50
# Lance's index statistics (`Table.index_partitions`) carry every centroid unless told not to (megabytes at 4M rows),
# and warn on stderr. Set once, here: setting the environment while Lance's threads read it is not safe.
os.environ.setdefault("LANCE_INCLUDE_VECTOR_CENTROIDS", "false")
PROBED_SHARE = 0.05     # ... and as many as 50 of 1,000 are of a larger index's partitions
REFINE_FACTOR = 5
EXACT_MAX_ROWS = 2_000
FILTERED_CANDIDATES = 4_000
VECTOR_INDEX = "vector_idx"
TEXT_INDEX = f"{TEXT_COLUMN}_idx"
HIDDEN_COLUMNS = ("vector", "_distance", "run_id", "embedded_at", "image_stat", "image_digest")


@dataclass
class Table:
    """An opened table with the encoders described in its metadata."""

    handle: lancedb.table.Table
    meta: dict
    db_uri: str = ""
    name: str = ""

    @property
    def stored_weights(self) -> dict[str, float]:
        return {e["name"]: e["weight"] for e in self.meta["encoders"]}

    @property
    def dims(self) -> dict[str, int]:
        return {e["name"]: e["dim"] for e in self.meta["encoders"]}

    @cached_property
    def indexes(self) -> dict:
        return {index.name: index for index in self.handle.to_lance().describe_indices()}

    @cached_property
    def index_partitions(self) -> int:
        """The vector index's IVF partitions as Lance trained them (it may train fewer than asked), the most of
        any of its segments; 0 without an index."""
        if VECTOR_INDEX not in self.indexes:
            return 0
        stats = self.handle.to_lance().stats.index_stats(VECTOR_INDEX)
        found = [segment.get("num_partitions", 0) for segment in stats["segments"]]
        return max(found, default=0) or max(1, int(math.sqrt(self.indexed_rows)))     # as maintain.py asks

    @property
    def indexed_rows(self) -> int:
        """The rows the vector index covers (0 without one: every search is then a flat, exact one)."""
        return self.indexes[VECTOR_INDEX].num_rows_indexed if VECTOR_INDEX in self.indexes else 0

    @cached_property
    def interactions(self) -> str | None:
        """The interaction log the table's item2vec encoder was last trained on, if it has one: the newest run
        that read one says where (tables of earlier builds held it in their metadata). Read once per opened
        table: the service asks it on every `user` search."""
        if not any(e["config"]["kind"] == "item2vec" for e in self.meta["encoders"]):
            return None
        logs = [run["interactions"].get("path") for run in read_runs(self.db_uri, self.name)]
        return next((path for path in reversed(logs) if path), None) or next(
            (e["config"]["options"].get("interactions") for e in self.meta["encoders"]
             if e["config"]["kind"] == "item2vec"), None)

    def encoders(self) -> list[Encoder]:
        return [_rebuild(described) for described in self.meta["encoders"]]

    def vector_column(self, name: str) -> VectorColumn:
        """An encoder's column by the encoder's name, or the combined `vector`; a clear error for others."""
        names = list(self.stored_weights)
        if name != COMBINED and name not in names:
            raise QueryError(f"the table has no encoder '{name}'; its columns are {', '.join(names)} and {COMBINED}")
        return VectorColumn(self.handle.to_lance(), COMBINED if name == COMBINED else f"{name}_vec")


def open_table(uri: str, name: str, version: int | str | None = None) -> Table:
    """Open a table, at its latest version or at a version number or tag (time travel)."""
    db = lancedb.connect(uri)
    if name not in db.table_names():
        raise QueryError(f"no table '{name}' under {uri}")
    handle = db.open_table(name)
    if version is not None:
        try:
            handle.checkout(version)
        except (ValueError, TypeError, RuntimeError, OSError) as err:
            raise QueryError(f"table '{name}' has no version or tag {version!r}") from err
    meta = table_metadata(handle.schema)
    if not meta:
        raise QueryError(f"table '{name}' was not written by catalog-embed (no encoder metadata)")
    return Table(handle, meta, uri, name)


def text_queries(table: Table, text: str) -> dict[str, np.ndarray]:
    """The text in the space of every encoder that can take a text query (text and multimodal)."""
    queries = {e.name: e.text_queries([text])[0] for e in table.encoders() if e.queries_by_text}
    if not queries:
        raise QueryError("the table has no encoder that can search by text")
    return queries


def load_query_image(path: str, min_side: int | None = None) -> Image.Image:
    """A picture given on the command line, checked and decoded as the job does catalog images (for an
    encoder, at its `decode_side`)."""
    return query_image(query_bytes(path), min_side, path)


def query_image(data: bytes, min_side: int | None = None, name: str = "the upload") -> Image.Image:
    """A query picture's bytes, checked (run.max_pixels, a readable image) and decoded."""
    try:
        check_image(data, RunConfig().max_pixels)
        return decode_image(data, min_side)
    except (OSError, ValueError) as err:
        raise QueryError(f"cannot use image {name}: {err}") from err


def query_bytes(path: str) -> bytes:
    """A query picture's bytes, from a path or URL."""
    try:
        return ImageReader().read(path)
    except OSError as err:
        raise QueryError(f"cannot use image {path}: {err}") from err


def image_queries_of(table: Table, data: bytes, name: str = "the upload") -> dict[str, np.ndarray]:
    """A picture's bytes in the space of every image encoder of the table."""
    queries = {e.name: e.image_queries([query_image(data, e.decode_side, name)])[0]
               for e in table.encoders() if e.modality == "image"}
    if not queries:
        raise QueryError("the table has no image encoder")
    return queries


def item_queries(table: Table, item_id: str) -> dict[str, np.ndarray]:
    """A stored item's own vectors, to find items like it: those it has (an item with no image, or no
    interaction history, has none from those encoders)."""
    queries = mean_queries(table, [item_id])
    if queries is None:
        raise QueryError(f"no item with id '{item_id}'")
    return queries


def user_queries(table: Table, user: str, interactions: str | None = None,
                 items_of: Callable[[str, str], list[str]] = items_of_user) -> tuple[dict[str, np.ndarray], list[str]]:
    """A user's vectors, the mean of their items' (`mean_queries`), and those items: the items of the
    user's rows in the interaction log, the table's item2vec log unless another is named. `items_of(log, user)`
    finds them (a scan of the log by default; the service keeps an index, `UserIndex`)."""
    path = interactions or table.interactions
    if not path:
        raise QueryError("the table has no item2vec encoder, so no interaction log to find users in; "
                         "name one with --interactions")
    try:
        items = items_of(path, user)
    except (OSError, ValueError, pa.ArrowException) as err:
        raise QueryError(f"cannot read the interaction log {path}: {err}") from err
    if not items:
        raise QueryError(f"user '{user}' has no rows in {path}")
    queries = mean_queries(table, items)
    if queries is None:
        raise QueryError(f"none of the {len(items)} items of user '{user}' in {path} is in the table")
    return queries, items


def mean_queries(table: Table, ids: Sequence[str]) -> dict[str, np.ndarray] | None:
    """Per encoder, the normalised mean of these stored items' unit vectors, over those items that have
    one (of one item: its own vectors); None when none of the ids is in the table."""
    columns = [f"{name}_vec" for name in table.stored_weights]
    found = rows_by_id(table.handle.to_lance(), list(ids), columns)
    if not found.num_rows:
        return None
    queries = {}
    for name in table.stored_weights:
        vectors = found[f"{name}_vec"].drop_null()
        if len(vectors):
            queries[name] = l2_normalise(l2_normalise(vector_matrix(vectors)).mean(axis=0))
    return queries


@dataclass(frozen=True)
class Asked:
    """One search as the command line and the service take it: exactly one of `text`, `like` (an item id),
    `user` or `image` (a picture's bytes, `image_name` for messages), and how to rank and filter."""

    k: int = 10
    text: str | None = None
    like: str | None = None
    user: str | None = None
    image: bytes | None = None
    image_name: str = "the upload"
    weights: dict[str, float] | None = None
    where: str | None = None
    hybrid: bool = False
    interactions: str | None = None


@dataclass(frozen=True)
class Answer:
    results: list[dict]
    owned: list[str]        # a user's own items, left out of the results


def answer(table: Table, asked: Asked, items_of: Callable[[str, str], list[str]] = items_of_user) -> Answer:
    """The one search dispatch of `query` and `serve`: the query's vectors, then the (hybrid) search."""
    given = [name for name in ("text", "like", "user", "image") if getattr(asked, name) not in (None, "")]
    if len(given) != 1:
        raise QueryError("give one of text, image, like or user")
    if asked.k < 1:
        raise QueryError("k must be at least 1")
    if asked.hybrid and given != ["text"]:
        raise QueryError("hybrid is for text")
    if asked.interactions and given != ["user"]:
        raise QueryError("an interaction log is for a user's search")
    owned: list[str] = []
    if asked.text:
        queries = text_queries(table, asked.text)
    elif asked.like:
        queries = item_queries(table, asked.like)
    elif asked.user:
        queries, owned = user_queries(table, asked.user, asked.interactions, items_of)
    else:
        assert asked.image is not None, "one of the four is given"
        queries = image_queries_of(table, asked.image, asked.image_name)
    if asked.hybrid and asked.text:
        return Answer(hybrid_search(table, asked.text, queries, asked.k, asked.weights, asked.where), owned)
    return Answer(search(table, queries, asked.k, asked.weights, asked.where, owned), owned)


def parse_weights(text: str | None, table: Table) -> dict[str, float] | None:
    """`text=0.5,image=0.5` to a dict; names must be the table's encoders."""
    if not text:
        return None
    weights = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in table.stored_weights:
            raise QueryError(f"--weights names '{name.strip()}'; the table's encoders are "
                             f"{', '.join(table.stored_weights)}")
        try:
            weights[name.strip()] = float(value)
        except ValueError as err:
            raise QueryError(f"--weights: '{part}' is not name=number") from err
    return weights


def search(table: Table, queries: dict[str, np.ndarray], k: int, weights: dict[str, float] | None = None,
           where: str | None = None, exclude: Sequence[str] = ()) -> list[dict]:
    """Rank items by sum_i w_i * cos_i over the encoders with a query vector; for an item missing some
    of them, by the weighted mean over those it has, and not at all when it has none. Items `where`
    holds, but not those in `exclude` (a user's own items).

    Without weights, the table's own weights of those encoders are used. Every search goes through
    the one combined `vector` column (and its index), re-weighted by the design's math.
    """
    wanted = weights if weights is not None else {n: w for n, w in table.stored_weights.items() if n in queries}
    try:
        wanted = normalise_weights(wanted)
        vector = reweighted_query(queries, table.stored_weights, wanted, list(table.stored_weights), table.dims)
    except ValueError as err:
        raise QueryError(str(err)) from err
    filters = _filters(where, exclude)
    rows, scores = _scored(table, vector, queries, wanted, filters, k, where)
    ranked = [i for i in np.argsort(-scores, kind="stable") if not np.isnan(scores[i])]
    if len(ranked) < k and len(rows) == k * RESCORED_CANDIDATES:
        # The candidates ran out on items that share no encoder with the query (a column still filling, items
        # without an image): they tie at cosine 0, ahead of items the query scores below 0. Ask for scorable ones.
        having = " OR ".join(f"{name}_vec IS NOT NULL" for name, weight in wanted.items() if weight)
        rows, scores = _scored(table, vector, queries, wanted, " AND ".join(f"({f})" for f in (filters, having) if f),
                               k, where)
        ranked = [i for i in np.argsort(-scores, kind="stable") if not np.isnan(scores[i])]
    return [_result(rows[i], float(scores[i])) for i in ranked[:k]]


def _scored(table: Table, vector: np.ndarray, queries: dict[str, np.ndarray], wanted: dict[str, float],
            filters: str, k: int, where: str | None) -> tuple[list[dict], np.ndarray]:
    """The candidates of one search through the combined column, and their exact weighted scores (NaN: none)."""
    try:
        plan = plan_search(table, filters or None)
        request = table.handle.search(vector, vector_column_name="vector")
        assert isinstance(request, LanceVectorQueryBuilder), "a vector searched for is a vector search"
        request = request.distance_type("cosine")
        request = request.limit(k * RESCORED_CANDIDATES)
        if filters:
            request = request.where(filters, prefilter=True)
        if plan.method == "exact":
            request = request.bypass_vector_index()
        elif plan.method == "ann" and plan.nprobes:
            request = request.nprobes(plan.nprobes).refine_factor(REFINE_FACTOR)
        found = request.to_arrow()
    except ValueError as err:         # LanceDB checks a filter only when it runs
        if not where:
            raise
        raise QueryError(f"--where {where!r} is not a valid filter: {str(err).splitlines()[0]}") from err
    scores = weighted_cosines(vector_matrix(found["vector"]), queries, wanted, list(table.stored_weights),
                              table.dims)
    return found.drop_columns(["vector"]).to_pylist(), scores     # the stored vectors are scored, not shown


def hybrid_search(table: Table, text: str, queries: dict[str, np.ndarray], k: int,
                  weights: dict[str, float] | None = None, where: str | None = None) -> list[dict]:
    """The vector search's candidates and the full-text index's (BM25 over `embedded_text`), fused by their
    scores (`_fused`): a word embeddings do not know (a SKU, a brand) lifts the items that have it, and a
    paraphrase, which matches no word in particular, still ranks by meaning."""
    if TEXT_INDEX not in table.indexes:
        raise QueryError("the table has no full-text index yet (the job's upkeep makes it): run the job once more")
    depth = k * RESCORED_CANDIDATES
    by_vector = search(table, queries, depth, weights, where)
    request = table.handle.search(text, query_type="fts", fts_columns=TEXT_COLUMN).limit(depth)
    if where:
        request = request.where(where, prefilter=True)
    by_words = request.select(["id", "_score"]).to_arrow()
    fused = _fused({r["id"]: r["score"] for r in by_vector},
                   dict(zip(by_words["id"].to_pylist(), by_words["_score"].to_pylist(), strict=True)))
    best = sorted(fused, key=lambda item: -fused[item])[:k]
    shown = {r["id"]: r for r in by_vector}
    shown.update((item, _result(row, 0.0)) for item, row in
                 items_by_id(table, [item for item in best if item not in shown]).items())
    return [dict(shown[item], score=round(fused[item], 6)) for item in best]


def _fused(*rankings: dict[str, float]) -> dict[str, float]:
    """Distribution-based score fusion: each list's scores mapped so that its mean +- 3 sd spans 0..1, then
    summed (0 from a list an item is not in). Cosines and BM25 get one scale, and a term match far above the
    other matches keeps its lead, which reciprocal rank fusion flattens (docs/search.md measures both)."""
    fused: dict[str, float] = {}
    for scores in rankings:
        values = np.fromiter(scores.values(), float, len(scores))
        spread = 6 * values.std() if len(values) else 0.0
        low = values.mean() - spread / 2 if spread else 0.0
        for item, score in scores.items():
            fused[item] = fused.get(item, 0.0) + ((score - low) / spread if spread else 1.0)
    return fused


def _filters(where: str | None, exclude: Sequence[str]) -> str:
    return " AND ".join(([f"({where})"] if where else []) + ([f"NOT ({id_in(exclude)})"] if exclude else []))


@dataclass(frozen=True)
class SearchPlan:
    method: str                 # "flat" (no vector index), "exact" (over the filter's rows) or "ann"
    nprobes: int | None = None
    matching: int | None = None     # the rows the filter leaves, where there is one


def plan_search(table: Table, filters: str | None) -> SearchPlan:
    """How to search so that the ten best are found: see the module's docstring."""
    if not table.indexed_rows:
        return SearchPlan("flat")
    partitions = table.index_partitions
    if not filters:
        return SearchPlan("ann", min(partitions, max(ANN_NPROBES, math.ceil(PROBED_SHARE * partitions))))
    matching = table.handle.count_rows(filters)
    if matching <= EXACT_MAX_ROWS:
        return SearchPlan("exact", matching=matching)
    nprobes = max(ANN_NPROBES, math.ceil(FILTERED_CANDIDATES * partitions / matching))
    return SearchPlan("ann", min(partitions, nprobes), matching)


def items_by_id(table: Table, ids: list[str]) -> dict[str, dict]:
    """Stored items as results show them (id, fields, label, image_uri; no vectors), by id."""
    columns = [name for name in table.handle.schema.names if is_shown(name)]
    return {row["id"]: row for row in rows_by_id(table.handle.to_lance(), ids, columns).to_pylist()}


def is_shown(column: str) -> bool:
    """Whether results show this column (not vectors, fingerprints or bookkeeping)."""
    return column not in HIDDEN_COLUMNS and not column.endswith(("_vec", "_fp"))


def _rebuild(described: dict) -> Encoder:
    cfg = described["config"]
    return build_encoder(EncoderConfig(
        name=described["name"], kind=cfg["kind"], model=cfg["model"], weights_file=cfg["weights_file"],
        pretrained=cfg["pretrained"], device="auto", precision=cfg.get("precision", "auto"), options=cfg["options"]))


def _result(row: dict, score: float) -> dict:
    out = {"id": row["id"], "score": round(score, 6)}
    out.update({k: v for k, v in row.items() if is_shown(k) and k != "id"})
    return out
