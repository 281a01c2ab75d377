"""Filtered searches stay right: on a table large enough for the job's upkeep to index, a selective filter
returns exactly the exact-search top 10, and a broad one holds its recall through a planned number of probes.
The filter fields are independent of the vectors' clusters (benchmarks/query.py writes the same table at 1M)."""

from __future__ import annotations

import lance
import pytest

from benchmarks.query import Catalog, exact_best, simulate_nights, synthetic_table
from pipelines.search.query import EXACT_MAX_ROWS, open_table, plan_search, search
from transforms.maintain import MAX_DELTA_SEGMENTS

ROWS = 40_000
# Enough queries to judge an index by: its recall over 12 once came out at 0.942 on an index that held 0.98 over 50.
QUERIES, UNSEEN_QUERIES = 50, 200
DIMS = {"text": 24, "image": 32}


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    db = tmp_path_factory.mktemp("filtered")
    catalog = Catalog(DIMS, seed=3)
    uri = synthetic_table(db, ROWS, catalog)
    return db, uri, catalog


def test_upkeep_indexes_the_vector_and_every_filter_field(indexed):
    _, uri, _ = indexed
    kinds = {index.name: index.index_type for index in lance.dataset(uri).describe_indices()}
    assert kinds["vector_idx"] == "IVF_HNSW_SQ" and kinds["id_idx"] == "BTree"
    assert {kinds[f"group{n}_idx"] for n in (10, 100, 1000)} == {"Bitmap"}


@pytest.mark.parametrize("where, plan", [("group100 = '7'", "exact"), ("group1000 = '42'", "exact"),
                                         ("group10 = '3'", "ann"), (None, "ann")])
def test_searches_find_the_exact_top_10(indexed, where, plan):
    db, uri, catalog = indexed
    table = open_table(str(db), "synthetic")
    planned = plan_search(table, f"({where})" if where else None)
    assert planned.method == plan
    found, truth = _searched(table, uri, catalog.queries(QUERIES), where)
    if plan == "exact":
        assert planned.matching <= EXACT_MAX_ROWS and found == truth
    else:
        # Lance's k-means is seeded at random: ten builds of this index held 0.980 to 0.992 over 50 queries (12
        # queries once gave 0.942: too few to judge an index by).
        assert _recall(found, truth) >= 0.95, _recall(found, truth)


def test_the_vector_index_is_built_again_once_its_delta_segments_pile_up(tmp_path):
    catalog = Catalog(DIMS, seed=5)
    uri = synthetic_table(tmp_path, 12_000, catalog)
    nights = [night["vector_index"] for night in simulate_nights(uri, catalog, MAX_DELTA_SEGMENTS + 4, 0.002)]
    segments = [night["segments"] for night in nights]
    rebuilt = [night["rebuilt"] for night in nights]
    assert max(segments) == 1 + MAX_DELTA_SEGMENTS and rebuilt.count(True) == 1, nights
    after = rebuilt.index(True)
    assert segments[after - 1] == 1 + MAX_DELTA_SEGMENTS and segments[after] == 1
    assert all(night["rows_unindexed"] == 0 for night in nights)
    unseen = catalog.queries(UNSEEN_QUERIES, new_kinds=True)
    found, truth = _searched(open_table(str(tmp_path), "synthetic"), uri, unseen, None)
    # Lance's k-means is seeded at random: over 200 queries of unseen kinds at 12k rows, six runs held 0.942 to
    # 0.956 (over 50, ten runs 0.926 to 0.970); the 1M-row benchmark holds 1.00 (docs/search.md).
    assert _recall(found, truth) >= 0.9, _recall(found, truth)


def test_the_plan_probes_the_partitions_the_index_really_has(indexed, tmp_path):
    """Lance may train fewer partitions than asked (and maintain.py asks sqrt(rows)): the plan reads the index."""
    db, uri, _ = indexed
    table = open_table(str(db), "synthetic")
    trained = lance.dataset(uri).stats.index_stats("vector_idx")["segments"][0]["num_partitions"]
    assert table.index_partitions == trained and plan_search(table, None).nprobes == min(trained, 50)
    copy = lance.write_dataset(lance.dataset(uri).to_table(), str(tmp_path / "copy.lance"))
    copy.create_index("vector", "IVF_FLAT", num_partitions=12, metric="cosine")
    few = open_table(str(tmp_path), "copy")
    assert few.index_partitions == 12 and plan_search(few, None).nprobes == 12


def _searched(table, uri: str, queries: dict, where: str | None) -> tuple[list[set[str]], list[set[str]]]:
    """The ten ids the search finds for each query, and the exact ten."""
    truth = exact_best(uri, queries, {"text": 0.5, "image": 0.5}, where)
    found = [{r["id"] for r in search(table, {name: v[q] for name, v in queries.items()}, 10, where=where)}
             for q in range(len(truth))]
    return found, truth


def _recall(found: list[set[str]], truth: list[set[str]]) -> float:
    return sum(len(f & t) for f, t in zip(found, truth, strict=True)) / (10 * len(truth))
