"""What the behaviour encoder (item2vec) costs at 10k and 100k items, against the plain script a user
would write with the same library (pandas + gensim + LanceDB), side by side.

The catalog is a manifest whose items fall into planted clusters of 100; the log has three sessions per
item, each of 3 to 5 items of one cluster, in time order (10k items: 30k sessions, about 120k rows).
Every item is in some session: with no other encoder, an item that none pairs would have no vector at
all, be a reject, and be tried again every night, so every run would read the log and train for it.
The config has the item2vec encoder alone, at its defaults, so the numbers are the behaviour path's
own: read the log, group and order the sessions, train, look the vectors up by id, write. Per catalog:
- `first`: the first run; `plain script`: the same training and a table of (id, vector), no pipeline;
- `unchanged`: a re-run with the same log (nothing is trained);
- `query --user`: one user's items from the log (a log without `user_id`: a session's), their mean
  vector and a search without them; `plain user query`: the same with pandas and LanceDB. Per side
  the query's own seconds (`command_s`: the whole command, imports included), and recall@10: the
  share of the true 10 nearest (exact search) among its 10 results;
- `log grown by 1%`: 1% more sessions among the same items: no item needs a vector, nothing is written;
- `new generation`: the same log with `retrain_days: 0`, every run a generation: trained again from the whole
  log, every row written (what every grown log cost before generations).
Each is a fresh process (seconds, peak RSS, rchar). Quality: the share of an item's 5 nearest behaviour
neighbours from its own cluster, over 1,000 items.

    python -m benchmarks.behaviour --sizes 10000 100000 --out out/bench.json
    python -m benchmarks.behaviour --sizes 1000000 --first-only     # 12M events: the first run and the script
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks.results import measure_in_fresh_process, peak_rss_mib, rchar_mib, run_benchmark
from benchmarks.scale import measure

CLUSTER_SIZE = 100
SESSIONS_PER_ITEM = 3
QUALITY_ITEMS = 1000


def write_catalog(folder: Path, items: int, night: int) -> tuple[Path, Path]:
    """catalog.csv (id,title) and sessions.csv (session_id,item_id,ts) for `night`."""
    folder.mkdir(parents=True, exist_ok=True)
    catalog, sessions = folder / "catalog.csv", folder / "sessions.csv"
    if not catalog.exists():
        with catalog.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "title"])
            writer.writerows([f"i{k}", f"item {k}"] for k in range(items))
    rng = random.Random(night)
    with sessions.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["session_id", "item_id", "ts"])
        clock = 1_700_000_000
        for session in range(items * SESSIONS_PER_ITEM):
            anchor = session % items                # each item starts SESSIONS_PER_ITEM sessions
            cluster = anchor // CLUSTER_SIZE * CLUSTER_SIZE
            others = [min(cluster + rng.randrange(CLUSTER_SIZE), items - 1) for _ in range(rng.randint(2, 4))]
            for item in [anchor, *others]:
                clock += 1
                writer.writerow([f"n{night}-{session}", f"i{item}", clock])
    return catalog, sessions


def grow_log(sessions: Path, items: int, share: float = 0.01) -> None:
    """Append `share` more sessions, each of one anchor item and 2 to 4 of its cluster."""
    rng = random.Random(99)
    with sessions.open("a", newline="") as handle:
        writer = csv.writer(handle)
        for session in range(int(items * SESSIONS_PER_ITEM * share)):
            anchor = rng.randrange(items)
            cluster = anchor // CLUSTER_SIZE * CLUSTER_SIZE
            for item in [anchor, *(min(cluster + rng.randrange(CLUSTER_SIZE), items - 1)
                                   for _ in range(rng.randint(2, 4)))]:
                writer.writerow([f"grown-{session}", f"i{item}", 1_800_000_000 + session])


def write_config(folder: Path, catalog: Path, sessions: Path, name: str = "config", **settings) -> Path:
    raw = {"catalog": {"format": "manifest", "path": str(catalog), "interactions": str(sessions), "fields": []},
           "encoders": {"behaviour": {"kind": "item2vec", **settings}},
           "output": {"uri": str(folder / "db"), "table": "shop"}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def plain_script(sessions: str, db: str) -> None:
    """What a user would write without the job: read, group, train, write a table."""
    import lancedb
    import pandas as pd
    import pyarrow as pa
    from gensim.models import Word2Vec

    from transforms.encoders.item2vec import ITEM2VEC_DEFAULTS as S

    started = time.perf_counter()
    log = pd.read_csv(sessions, dtype={"session_id": str, "item_id": str}).sort_values(["session_id", "ts"])
    corpus = log.groupby("session_id", sort=True)["item_id"].apply(list).tolist()
    model = Word2Vec(corpus, vector_size=S["dim"], window=S["window"], epochs=S["epochs"], min_count=S["min_count"],
                     negative=S["negative"], sample=S["sample"], seed=S["seed"], sg=1, workers=os.cpu_count() or 1)
    vectors = model.wv.get_normed_vectors()
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])
    lancedb.connect(db).create_table("plain", pa.table({"id": model.wv.index_to_key, "vector": column}))
    _report(started)


def user_query(sessions: str, db: str, user: str) -> None:
    """`query --user`'s work, through the library: the user's items from the log, their mean, a search."""
    from pipelines.search.query import open_table, search, user_queries

    started = time.perf_counter()
    table = open_table(db, "shop")
    queries, items = user_queries(table, user, sessions)
    found = search(table, queries, 10, {"behaviour": 1.0}, exclude=items)
    _report(started, results=[row["id"] for row in found])


def plain_user_query(sessions: str, db: str, user: str) -> None:
    """The same with the tools a user would pick: the log in pandas, the vectors and the search in LanceDB."""
    import lancedb

    from transforms.lance_sink import id_in

    started = time.perf_counter()
    items = pandas_user_items(sessions, user)
    table = lancedb.connect(db).open_table("shop")
    vectors = np.stack(table.to_lance().to_table(columns=["behaviour_vec"], filter=id_in(items))["behaviour_vec"]
                       .to_numpy(zero_copy_only=False))
    mean = vectors.mean(axis=0)
    found = (table.search(mean / np.linalg.norm(mean), vector_column_name="vector").distance_type("cosine")
             .where(f"NOT ({id_in(items)})", prefilter=True).limit(10).to_list())
    _report(started, results=[row["id"] for row in found])


def pandas_user_items(sessions: str, user: str) -> list[str]:
    """A user's items as pandas finds them: the log in a data frame, filtered (a session is a user here)."""
    import pandas as pd

    log = pd.read_csv(sessions, usecols=["session_id", "item_id"], dtype=str)
    return log.loc[log["session_id"] == user, "item_id"].drop_duplicates().tolist()


def _report(started: float, **extra) -> None:
    """This process's measurement, its last stdout line: seconds since `started`, peak RSS, bytes read."""
    print(json.dumps({"seconds": time.perf_counter() - started, "peak_mib": peak_rss_mib(), "rchar_mib": rchar_mib(),
                      **extra}))


def exact_user_results(sessions: Path, db: Path, user: str) -> set[str]:
    """The true 10 nearest items to the user's mean behaviour vector, by exact search over every vector,
    that both user queries are scored against (the table's ANN index only approximates them)."""
    import lancedb

    from transforms.lance_sink import vector_matrix

    items = set(pandas_user_items(str(sessions), user))
    table = lancedb.connect(str(db)).open_table("shop").to_arrow()
    ids, vectors = np.array(table["id"].to_pylist()), vector_matrix(table["behaviour_vec"])
    mean = vectors[np.isin(ids, list(items))].mean(axis=0)
    ranked = [item for item in ids[np.argsort(-(vectors @ mean), kind="stable")] if item not in items]
    return {str(item) for item in ranked[:10]}


def own_cluster_share(db: Path) -> float:
    import lancedb

    table = lancedb.connect(str(db)).open_table("shop").to_arrow()
    ids = np.array(table["id"].to_pylist())
    has = np.array([v is not None for v in table["behaviour_vec"].to_pylist()])
    from transforms.lance_sink import vector_matrix

    vectors, ids = vector_matrix(table["behaviour_vec"])[has], ids[has]
    clusters = np.array([int(i[1:]) // CLUSTER_SIZE for i in ids])
    picked = np.random.default_rng(0).choice(len(ids), size=min(QUALITY_ITEMS, len(ids)), replace=False)
    same = []
    for part in np.array_split(picked, max(1, len(picked) // 50)):    # 50 rows of similarities at a time
        similar = vectors[part] @ vectors.T
        similar[np.arange(len(part)), part] = -np.inf
        nearest = np.argpartition(-similar, 5, axis=1)[:, :5]
        same.append(clusters[nearest] == clusters[part][:, None])
    return float(np.concatenate(same).mean())


def scenarios(root: Path, items: int, first_only: bool = False) -> list[dict]:
    folder = root / f"{items}"
    catalog, sessions = write_catalog(folder, items, night=1)
    config = write_config(folder, catalog, sessions)
    rows = []

    def row(scenario: str, result: dict, **extra) -> None:
        rows.append({"items": items, "scenario": scenario, "seconds": round(result["seconds"], 2),
                     "peak_mib": round(result["peak_mib"]), "rchar_mib": round(result["rchar_mib"], 1),
                     **{k: result[k] for k in ("written", "encoded") if k in result},
                     **({"command_s": round(result["command_s"], 1)} if "command_s" in result else {}), **extra})

    row("first", measure(config, "first"), own_cluster_share=round(own_cluster_share(folder / "db"), 3))
    row("plain script", measure_in_fresh_process("benchmarks.behaviour", "plain-train", str(sessions),
                                                 str(folder / "plain")))
    if first_only:
        return rows
    row("unchanged", measure(config, "unchanged"))
    user = f"n1-{items // 2}"       # a session of the log: a log without user_id has a user per session
    ours, plain = (measure_in_fresh_process("benchmarks.behaviour", side, str(sessions), str(folder / "db"), user)
                   for side in ("user-query", "plain-user-query"))
    exact = exact_user_results(sessions, folder / "db", user)
    row("query --user", ours, recall_at_10=len(set(ours["results"]) & exact) / 10)
    row("plain user query", plain, recall_at_10=len(set(plain["results"]) & exact) / 10)
    grow_log(sessions, items)
    row("log grown by 1%", measure(config, "grown"))
    retrained = write_config(folder, catalog, sessions, "retrained", retrain_days=0)
    row("new generation", measure(retrained, "generation"),
        own_cluster_share=round(own_cluster_share(folder / "db"), 3))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="item2vec's cost at 10k and 100k items against a plain script")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="catalog sizes")
    parser.add_argument("--out", default="out/bench.json", help="the JSON results file (section 'behaviour')")
    parser.add_argument("--first-only", action="store_true", help="only the first run and the plain script")
    parser.add_argument("--one", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    run_benchmark(parser, one, measure_all)


def one(side: str, *args: str) -> None:
    {"plain-train": plain_script, "user-query": user_query, "plain-user-query": plain_user_query}[side](*args)


def measure_all(args: argparse.Namespace, root: Path) -> tuple[str, dict, list[dict]]:
    rows = [row for items in args.sizes for row in scenarios(root, items, args.first_only)]
    by = {(r["items"], r["scenario"]): r for r in rows}
    summary = {}
    compared = (("first", "plain script", "first"), ("query --user", "plain user query", "user_query"))
    for ours, plain, name in compared[:1] if args.first_only else compared:
        for measure_name in ("seconds", "peak_mib"):
            summary.update({f"{name}_over_plain_{measure_name}_{n}": round(by[n, ours][measure_name]
                                                                           / by[n, plain][measure_name], 2)
                            for n in args.sizes})
    printed = [{k: v for k, v in r.items() if k != "encoded"} for r in rows]
    section = "behaviour, first runs of large logs" if args.first_only else "behaviour"
    return section, {"runs": rows, "summary": summary}, printed


if __name__ == "__main__":
    main()
