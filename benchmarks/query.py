"""Queries at scale: recall@10 against exact search, and the latency of `search()`, on a table written as the
job writes it; how the index holds up over 30 nights; and each query kind's cold start on the demo table.

The table: `--rows` items (1,000,000 by default) with text 384-d and image 512-d vectors from 1,000
clustered kinds and the combined vector, and filter fields independent of the clusters: `group10`,
`group100` and `group1000` (each value holds 10%, 1% and 0.1% of the rows). The job's own upkeep
(transforms/maintain.py) indexes it. Each case runs QUERIES queries through pipelines.search.query.search and
scores them against the exact 10 best by the same weighted score, computed over every row:
- default weights, the text encoder alone, and a 0.9 / 0.1 re-weighting, unfiltered;
- filters selecting 10%, 1% and 0.1% of the rows (default weights);
- the same after 30 simulated nights: each night 1% of the rows changes (half re-embedded items, half
  items of 100 kinds the index was not trained on), written as the job writes (deletions and new
  fragments), then the job's upkeep (compaction, `optimize_indices`).
Cold start: `catalog-embed query --like/--text/--image` on the demo table, each a fresh process, three times
(the first on a machine exports the networks for queries). Then `--hybrid` against the vector search
(benchmarks/hybrid.py).

    python -m benchmarks.query --rows 1000000 --out out/bench.json
    python -m benchmarks.query --rows 4000000 --nights 0 --cases "default weights" "filter 1%" --table-only
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa

from benchmarks import hybrid
from benchmarks.results import save_section
from transforms.config import OutputConfig
from transforms.lance_sink import dataset_uri, table_schema

REPO = Path(__file__).resolve().parent.parent
DIMS = {"text": 384, "image": 512}
WEIGHTS = {"text": 0.5, "image": 0.5}
UPKEEP = OutputConfig(uri="", table="synthetic")     # the job's upkeep as it runs by default
KINDS, NEW_KINDS, SPREAD, WRITE_ROWS, QUERIES = 1000, 100, 0.8, 50_000, 50
GROUPS = {"group10": 10, "group100": 100, "group1000": 1000}
CASES = {   # name -> (weights, filter)
    "default weights": (None, None),
    "text alone": ({"text": 1.0}, None),
    "text 0.9, image 0.1": ({"text": 0.9, "image": 0.1}, None),
    "filter 10%": (None, "group10 = '3'"),
    "filter 1%": (None, "group100 = '7'"),
    "filter 0.1%": (None, "group1000 = '42'"),
}


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


class Catalog:
    """Clustered items of the job's table layout, and queries near the same clusters."""

    def __init__(self, dims: dict[str, int], seed: int = 0, described: list[dict] | None = None):
        """`described`: the encoders as the table's metadata names them (default: synthetic ones, which no query
        can encode words or pictures for); their weights must be equal."""
        self.dims = dims
        self.rng = np.random.default_rng(seed)
        self.centres = {name: self.rng.standard_normal((KINDS + NEW_KINDS, dim)).astype(np.float32)
                        for name, dim in dims.items()}
        described = described or [
            {"name": name, "kind": "synthetic", "dim": dim, "weight": 1 / len(dims), "id": name,
             "config": {"kind": "synthetic", "model": None, "weights_file": None, "pretrained": None, "options": {}}}
            for name, dim in dims.items()]
        self.schema = table_schema(list(GROUPS), described,
                                   {"encoders": described, "order": list(dims), "config_hash": "synthetic"})

    def vectors(self, kinds: np.ndarray) -> dict[str, np.ndarray]:
        return {name: _unit(self.centres[name][kinds] + SPREAD * self.rng.standard_normal(
            (len(kinds), dim)).astype(np.float32)) for name, dim in self.dims.items()}

    def rows(self, ids: list[str], kinds: np.ndarray) -> pa.Table:
        vectors = self.vectors(kinds)
        combined = np.concatenate([np.sqrt(1 / len(self.dims)) * vectors[name] for name in self.dims], axis=1)
        columns = {}
        for field in self.schema:
            if field.name == "id":
                columns["id"] = pa.array(ids, pa.string())
            elif field.name in GROUPS:
                columns[field.name] = pa.array(self.rng.integers(0, GROUPS[field.name], len(ids)).astype(str))
            elif pa.types.is_fixed_size_list(field.type):
                data = combined if field.name == "vector" else vectors[field.name[:-4]]
                columns[field.name] = pa.FixedSizeListArray.from_arrays(pa.array(data.ravel()), field.type.list_size)
            else:
                columns[field.name] = pa.nulls(len(ids), field.type)
        return pa.table(columns, schema=self.schema)

    def queries(self, count: int, new_kinds: bool = False) -> dict[str, np.ndarray]:
        low, high = (KINDS, KINDS + NEW_KINDS) if new_kinds else (0, KINDS)
        return self.vectors(self.rng.integers(low, high, count))


def synthetic_table(db: Path, rows: int, catalog: Catalog, name: str = "synthetic") -> str:
    """The table, written in fragments as the job writes them, and indexed by the job's upkeep."""
    from transforms.maintain import maintain

    uri = dataset_uri(str(db), name)
    batches = (catalog.rows([f"item-{k:07d}" for k in range(start, min(rows, start + WRITE_ROWS))],
                            catalog.rng.integers(0, KINDS, min(WRITE_ROWS, rows - start))).to_batches()[0]
               for start in range(0, rows, WRITE_ROWS))
    lance.write_dataset(pa.RecordBatchReader.from_batches(catalog.schema, batches), uri, schema=catalog.schema,
                        max_rows_per_file=1_000_000)
    problems, _ = maintain(uri, UPKEEP)
    if problems:
        raise RuntimeError(f"upkeep failed: {problems}")
    return uri


def exact_best(uri: str, queries: dict[str, np.ndarray], weights: dict[str, float], where: str | None,
               k: int = 10) -> list[set[str]]:
    """The k best ids of each query by sum_i w_i cos_i, computed over every (filtered) row."""
    count = len(next(iter(queries.values())))
    best_scores, best_ids = np.zeros((0, count), np.float32), np.zeros((0, count), dtype=object)
    for batch in lance.dataset(uri).to_batches(columns=["id", *[f"{n}_vec" for n in weights]], filter=where,
                                               batch_size=100_000):
        scores = sum(w * (batch[f"{n}_vec"].values.to_numpy().reshape(len(batch), -1) @ queries[n].T)
                     for n, w in weights.items())
        ids = np.repeat(np.asarray(batch["id"].to_pylist(), dtype=object)[:, None], count, axis=1)
        scores, ids = np.vstack([best_scores, scores]), np.vstack([best_ids, ids])
        keep = np.argsort(-scores, axis=0)[:k]
        best_scores, best_ids = np.take_along_axis(scores, keep, axis=0), np.take_along_axis(ids, keep, axis=0)
    return [set(best_ids[:, q]) for q in range(count)]


def measure_case(uri: str, db: Path, queries: dict[str, np.ndarray], weights: dict[str, float] | None,
                 where: str | None) -> dict:
    from pipelines.search.query import open_table, plan_search, search

    table = open_table(str(db), "synthetic")
    used = weights or WEIGHTS
    truth = exact_best(uri, queries, {n: w / sum(used.values()) for n, w in used.items()}, where)
    recalls, seconds = [], []
    for q in range(len(truth)):
        one = {name: vectors[q] for name, vectors in queries.items()}
        started = time.perf_counter()
        found = search(table, one, 10, weights, where)
        seconds.append(time.perf_counter() - started)
        recalls.append(len({r["id"] for r in found} & truth[q]) / 10)
    plan = plan_search(table, f"({where})" if where else None)
    return {"recall@10": round(float(np.mean(recalls)), 3), "min_recall@10": min(recalls),
            "p50_ms": round(1000 * statistics.median(seconds), 1),
            "p99_ms": round(1000 * float(np.percentile(seconds, 99)), 1),
            "plan": plan.method, "nprobes": plan.nprobes, "matching": plan.matching}


def measure_cases(uri: str, db: Path, catalog: Catalog, label: str, cases: list[str]) -> dict:
    queries = catalog.queries(QUERIES)
    results = {}
    for name in cases:
        weights, where = CASES[name]
        results[name] = measure_case(uri, db, queries, weights, where)
        print(f"{label}: {name}: {results[name]}", flush=True)
    if len(cases) == len(CASES):
        fresh = catalog.queries(QUERIES, new_kinds=True)
        results["new kinds, default weights"] = measure_case(uri, db, fresh, None, None)
    return results


def simulate_nights(uri: str, catalog: Catalog, nights: int, share: float) -> list[dict]:
    """Each night, `share` of the rows changes as the job writes a change, then the job's upkeep runs."""
    from transforms.maintain import maintain

    states = []
    for night in range(1, nights + 1):
        started = time.perf_counter()
        dataset = lance.dataset(uri)
        ids = dataset.to_table(columns=["id"])["id"].to_numpy(zero_copy_only=False)
        changed = catalog.rng.choice(ids, int(len(ids) * share), replace=False)
        half = len(changed) // 2
        dataset.delete("id IN (" + ", ".join(f"'{item}'" for item in changed) + ")")
        dataset.insert(catalog.rows(list(changed[:half]), catalog.rng.integers(0, KINDS, half)))
        dataset.insert(catalog.rows([f"new-{night}-{k}" for k in range(len(changed) - half)],
                                    catalog.rng.integers(KINDS, KINDS + NEW_KINDS, len(changed) - half)))
        written = time.perf_counter()
        problems, state = maintain(uri, UPKEEP)
        states.append({"night": night, "write_s": round(written - started, 1),
                       "upkeep_s": round(time.perf_counter() - written, 1), "problems": problems,
                       "vector_index": state.get("vector_idx")})
        print(f"night {night}: {states[-1]}", flush=True)
    return states


def cold_start(root: Path) -> dict:
    """Each query kind's wall time as a fresh process on the demo table, first and second time."""
    config = root / "demo.yaml"
    subprocess.run([sys.executable, "-m", "demo.build_catalog", str(root / "demo")], check=True, cwd=REPO,
                   capture_output=True)
    raw = (REPO / "configs" / "demo.yaml").read_text().replace("data/demo", str(root / "demo"))
    config.write_text(raw.replace("uri: ./lancedb", f"uri: {root / 'db'}"))
    cli = [str(Path(sys.executable).parent / "catalog-embed")]
    subprocess.run([*cli, "run", "--config", str(config)], check=True, capture_output=True)
    table = ["--uri", str(root / "db"), "--table", "demo", "-k", "5"]
    kinds = {"like": ["--like", "chelsea"], "text": ["--text", "a cup of coffee"],
             "image": ["--image", str(root / "demo" / "images" / "rocket.jpg")]}
    times: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(3):
        for name, args in kinds.items():
            started = time.perf_counter()
            subprocess.run([*cli, "query", *table, *args], check=True, capture_output=True)
            times[name].append(round(time.perf_counter() - started, 2))
    warm = {name: statistics.median(found[1:]) for name, found in times.items()}
    ratios = {f"{name} / like": round(warm[name] / warm["like"], 2) for name in ("text", "image")}
    return {"seconds": times, "warm cache, median": warm, **ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--nights", type=int, default=30, help="nights of 1%% churn, then the cases again (0: none)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="the cases measured")
    parser.add_argument("--table-only", action="store_true", help="skip the cold starts and --hybrid")
    parser.add_argument("--out", default="out/bench.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="query-bench-") as scratch:
        root = Path(scratch)
        results = {"rows": args.rows, "queries": QUERIES}
        if not args.table_only:
            results["cold start"] = cold_start(root / "cold")
            print(json.dumps(results["cold start"]), flush=True)
            results["hybrid"] = hybrid.measure(root / "hybrid", root / "cold" / "db")
            print(json.dumps(results["hybrid"]), flush=True)
        catalog = Catalog(DIMS)
        started = time.perf_counter()
        uri = synthetic_table(root / "db", args.rows, catalog)
        results["table written and indexed s"] = round(time.perf_counter() - started)
        print(f"table written and indexed in {results['table written and indexed s']} s", flush=True)
        results["cases"] = measure_cases(uri, root / "db", catalog, "night 0", args.cases)
        if args.nights:
            results["nights"] = simulate_nights(uri, catalog, args.nights, 0.01)
            after = f"after {args.nights} nights"
            results[f"cases {after}"] = measure_cases(uri, root / "db", catalog, after, args.cases)
    section = "query" if args.rows == 1_000_000 else f"query at {args.rows:,} rows"
    save_section(args.out, section, results)


if __name__ == "__main__":
    main()
