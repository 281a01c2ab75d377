"""Behaviour vectors (item2vec over sessions): planted clusters, items without history, determinism, the
weighting with a missing modality, an interaction log that changes, and malformed log rows."""

from __future__ import annotations

import csv
import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pytest

from pipelines.cli import main
from pipelines.search.query import item_queries, open_table, search, user_queries
from tests.conftest import make_config, read_table, run
from transforms.combine import combine
from transforms.config import ConfigError
from transforms.interaction_log import UserIndex
from transforms.run_log import read_runs

CLUSTERS, CLUSTER_SIZE, SESSIONS = 6, 20, 600
NEVER_BOUGHT = [f"quiet-{n}" for n in range(5)]
WEIGHTS = {"text": 0.6, "behaviour": 0.4}
ENCODERS = {"text": {"kind": "sentence-transformers", "weight": WEIGHTS["text"], "precision": "fp32"},
            "behaviour": {"kind": "item2vec", "dim": 16, "epochs": 20, "seed": 3, "weight": WEIGHTS["behaviour"]}}
# A malformed row of each kind, and the reject it must become.
BROKEN_ROWS = {
    ",c0-1,1700000000": "interactions/MalformedRow",          # no session
    "s-broken,,1700000000": "interactions/MalformedRow",      # no item
    "s-broken,c0-2,yesterday": "interactions/BadTimestamp",
    "s-broken,c0-3,1700000000,extra": "interactions/MalformedRow",   # a cell too many
}


def cluster_of(item_id: str) -> str:
    return item_id.split("-")[0]


def write_sessions(path: Path, sessions: int = SESSIONS, seed: int = 11) -> int:
    """Sessions of 3 to 5 items of one planted cluster, in time order, and the broken rows; the count
    of good rows."""
    rng = random.Random(seed)
    lines, clock = [], 1_700_000_000
    for n in range(sessions):
        cluster = rng.randrange(CLUSTERS)
        for _ in range(rng.randint(3, 5)):
            clock += rng.randint(1, 60)
            lines.append(f"s{n},c{cluster}-{rng.randrange(CLUSTER_SIZE)},{clock}")
    path.write_text("session_id,item_id,ts\n" + "\n".join(lines + list(BROKEN_ROWS)) + "\n")
    return len(lines)


def make_shop(root: Path):
    """A manifest of clustered items and a few never bought, its interaction log, and its first run."""
    ids = [f"c{c}-{i}" for c in range(CLUSTERS) for i in range(CLUSTER_SIZE)] + NEVER_BOUGHT
    with (root / "catalog.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "title"])
        writer.writerows([item, f"catalog item number {n}"] for n, item in enumerate(ids))
    good_rows = write_sessions(root / "sessions.csv")
    config = shop_config(root)
    return config, root, good_rows, run(config, "r1")


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    return make_shop(tmp_path_factory.mktemp("shop"))


def shop_config(root: Path, db: str = "db"):
    return make_config(root / db, {"format": "manifest", "path": str(root / "catalog.csv"), "text_fields": ["title"],
                                   "interactions": str(root / "sessions.csv")}, ENCODERS)


def test_behaviour_neighbours_come_from_the_items_own_cluster(shop):
    config, _, _, summary = shop
    table = open_table(config.output.uri, config.output.table)
    trained = [item for item in read_table(config)["id"].to_pylist() if item not in NEVER_BOUGHT]
    same = total = 0
    for item in trained:
        found = search(table, item_queries(table, item), k=6, weights={"behaviour": 1.0})
        neighbours = [row["id"] for row in found if row["id"] != item][:5]
        same += sum(cluster_of(n) == cluster_of(item) for n in neighbours)
        total += len(neighbours)
    assert total == 5 * len(trained)
    assert same / total >= 0.9
    assert summary["encoded"]["behaviour"] == CLUSTERS * CLUSTER_SIZE


def test_items_without_history_are_written_with_the_rest_renormalised(shop):
    config, _, _, summary = shop
    rows = {row["id"]: row for row in read_table(config).to_pylist()}
    assert summary["read"] == summary["written"] == len(rows) == CLUSTERS * CLUSTER_SIZE + len(NEVER_BOUGHT)
    dim_text = len(rows[NEVER_BOUGHT[0]]["text_vec"])
    for item in NEVER_BOUGHT:
        row = rows[item]
        assert row["behaviour_vec"] is None
        # By hand: only text is present, so its part is sqrt(0.6 / 0.6) * v_text and behaviour's is zeros.
        expected = np.concatenate([np.asarray(row["text_vec"]), np.zeros(16)])
        np.testing.assert_allclose(row["vector"], expected, atol=1e-7)
    complete = rows["c0-0"]
    expected = np.concatenate([np.sqrt(0.6) * np.asarray(complete["text_vec"]),
                               np.sqrt(0.4) * np.asarray(complete["behaviour_vec"])])
    np.testing.assert_allclose(complete["vector"], expected, atol=1e-7)
    assert len(complete["vector"]) == dim_text + 16


def test_a_search_scores_an_item_missing_a_modality_over_the_encoders_it_has(shop):
    config, _, _, _ = shop
    rows = {row["id"]: row for row in read_table(config).to_pylist()}
    table = open_table(config.output.uri, config.output.table)
    found = {row["id"]: row["score"] for row in search(table, item_queries(table, "c0-0"), k=len(rows))}
    query = rows["c0-0"]

    def cosine(a, b, column):
        return float(np.dot(a[column], b[column]))

    # The weighted mean of the cosines over the encoders both have: text alone for an item never bought.
    assert found[NEVER_BOUGHT[0]] == pytest.approx(cosine(query, rows[NEVER_BOUGHT[0]], "text_vec"), abs=1e-5)
    both = 0.6 * cosine(query, rows["c0-1"], "text_vec") + 0.4 * cosine(query, rows["c0-1"], "behaviour_vec")
    assert found["c0-1"] == pytest.approx(both, abs=1e-5)
    assert found[NEVER_BOUGHT[0]] <= 1.0 and found["c0-0"] == pytest.approx(1.0, abs=1e-5)
    # An item with no history has no behaviour vector to search by.
    with pytest.raises(Exception, match="needs a query vector"):
        search(table, item_queries(table, NEVER_BOUGHT[0]), k=3, weights={"behaviour": 1.0})


def test_combine_renormalises_over_the_vectors_an_item_has():
    rng = np.random.default_rng(0)
    unit = {name: v / np.linalg.norm(v) for name, v in (("a", rng.normal(size=3)), ("c", rng.normal(size=2)))}
    weights, dims = {"a": 0.5, "b": 0.3, "c": 0.2}, {"a": 3, "b": 4, "c": 2}
    stored = combine(unit, weights, ["a", "b", "c"], dims)
    present = 0.5 + 0.2
    expected = np.concatenate([np.sqrt(0.5 / present) * unit["a"], np.zeros(4), np.sqrt(0.2 / present) * unit["c"]])
    np.testing.assert_allclose(stored, expected, rtol=1e-6)
    assert np.linalg.norm(stored) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="no vector"):
        combine({}, weights, ["a", "b", "c"], dims)


def test_the_same_log_trains_the_same_vectors_in_one_process_or_two(shop):
    """With one training thread (by default word2vec trains on every core, whose threads race)."""
    _, root, _, _ = shop
    one, two = (replace(shop_config(root, db=db), encoders=tuple(
        replace(e, options={**e.options, "threads": 1}) if e.kind == "item2vec" else e
        for e in shop_config(root).encoders)) for db in ("db-one-thread", "db-two-workers"))
    run(one, "r1")
    run(two, "r1", ("--direct_num_workers=2", "--direct_running_mode=multi_processing"))
    first, second = (read_table(c).column("behaviour_vec").to_pylist() for c in (one, two))
    assert first == second and any(v is not None for v in first)


def planted_share(table, items: list[str]) -> float:
    """The share of these items' 5 nearest behaviour neighbours that are in their planted cluster."""
    same = 0
    for item in items:
        found = search(table, item_queries(table, item), k=6, weights={"behaviour": 1.0})
        same += sum(cluster_of(row["id"]) == cluster_of(item) for row in found if row["id"] != item)
    return same / (5 * len(items))


def test_a_grown_log_writes_only_the_items_that_had_no_behaviour_vector(tmp_path):
    config, root, _, first = make_shop(tmp_path)
    before = read_table(config)
    unchanged = run(config, "r2")
    assert unchanged["encoded"] == {"text": 0, "behaviour": 0} and unchanged["status"] == "unchanged"
    # No item needed a behaviour vector: the log was not read at all.
    generation = first["interactions"]["generations"]["behaviour"]
    assert unchanged["interactions"] == {"path": str(root / "sessions.csv"), "generations": {"behaviour": generation},
                                         "read": 0, "rejected": 0, "sessions": 0, "needed": 0,
                                         "trained": {"behaviour": 0}}
    # Another night: 1% more sessions, and three new items that shoppers put in baskets of their clusters.
    log = (root / "sessions.csv").read_text().splitlines()
    rng = random.Random(5)
    extra = [f"g{n},c{n % CLUSTERS}-{rng.randrange(CLUSTER_SIZE)},{1_800_000_000 + n}" for n in range(SESSIONS // 100)]
    new_items = [f"c{c}-new" for c in range(3)]
    for n in range(60):
        cluster = n % 3
        extra += [f"h{n},{item},{1_800_000_000 + n}" for item in
                  [f"c{cluster}-new", *(f"c{cluster}-{rng.randrange(CLUSTER_SIZE)}" for _ in range(3))]]
    (root / "sessions.csv").write_text("\n".join(log + extra) + "\n")
    with (root / "catalog.csv").open("a", newline="") as handle:
        csv.writer(handle).writerows([item, f"new catalog item {item}"] for item in new_items)
    grown = run(config, "r3")
    after = read_table(config)
    assert grown["status"] == "committed" and (grown["written"], grown["added"]) == (3, 3)
    assert grown["encoded"] == {"text": 3, "behaviour": 3}
    assert grown["interactions"]["generations"] == {"behaviour": generation}
    old = after.filter(pc.is_in(after["id"], before["id"]))
    assert old["behaviour_vec"].to_pylist() == before["behaviour_vec"].to_pylist()
    # Trained again from scratch, the new items' vectors were rotated onto the stored ones: their neighbours
    # among the stored items are their own clusters' items.
    assert planted_share(open_table(config.output.uri, config.output.table), new_items) >= 0.8


def test_a_new_generation_reembeds_only_the_behaviour_column(tmp_path):
    config, root, _, first = make_shop(tmp_path)
    before = read_table(config)
    write_sessions(root / "sessions.csv", seed=12)       # another night's sessions
    config = replace(config, encoders=tuple(replace(e, options={**e.options, "retrain_days": 0})
                                            if e.kind == "item2vec" else e for e in config.encoders))
    changed = run(config, "r3")
    after = read_table(config)
    assert changed["interactions"]["generations"] != first["interactions"]["generations"]
    assert changed["encoded"] == {"text": 0, "behaviour": CLUSTERS * CLUSTER_SIZE}
    assert changed["status"] == "committed" and changed["encoder_ids"]["behaviour"] != first["encoder_ids"][
        "behaviour"]
    assert after["text_vec"].to_pylist() == before["text_vec"].to_pylist()
    assert after["behaviour_vec"].to_pylist() != before["behaviour_vec"].to_pylist()
    assert after["id"].to_pylist() == before["id"].to_pylist()


def test_malformed_log_rows_are_rejects_and_the_counts_add_up(shop):
    config, _, good_rows, summary = shop
    rejects = read_table(config, f"{config.output.table}_rejects").to_pylist()
    by_reason = {}
    for reject in rejects:
        by_reason[f"{reject['stage']}/{reject['error']}"] = by_reason.get(f"{reject['stage']}/{reject['error']}", 0) + 1
    expected = {}
    for reason in BROKEN_ROWS.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert by_reason == expected == summary["rejects_by"]
    log = summary["interactions"]
    assert log["read"] == good_rows + len(BROKEN_ROWS) and log["rejected"] == len(BROKEN_ROWS)
    # The log's rejects are not catalog rows: the catalog's own count still adds up.
    assert summary["read"] == summary["written"] + summary["unchanged"] + summary["rejected"]
    assert summary["rejected"] == 0
    [recorded] = [r for r in read_runs(config.output.uri, config.output.table) if r["run_id"] == "r1"]
    assert recorded["interactions"] == log


def test_a_log_without_the_needed_columns_or_an_encoder_without_a_log_is_refused(tmp_path, capsys):
    (tmp_path / "catalog.csv").write_text("id,title\na,an item\n")
    (tmp_path / "log.csv").write_text("user,product\nu1,a\n")
    catalog = {"format": "manifest", "path": str(tmp_path / "catalog.csv"), "text_fields": ["title"]}
    with pytest.raises(ConfigError, match="needs catalog.interactions"):
        make_config(tmp_path, catalog, ENCODERS)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(f"catalog: {{format: manifest, path: {tmp_path}/catalog.csv, text_fields: [title], "
                           f"interactions: {tmp_path}/log.csv}}\n"
                           "encoders: {behaviour: {kind: item2vec}}\n"
                           f"output: {{uri: {tmp_path}/db, table: t}}\n")
    assert main(["run", "--config", str(config_path)]) == 2
    assert "has no column session_id, item_id" in capsys.readouterr().err


def session_items(log: Path, session: str) -> list[str]:
    with log.open(newline="") as handle:
        return list(dict.fromkeys(row["item_id"] for row in csv.DictReader(handle) if row["session_id"] == session))


def test_a_users_vectors_are_the_mean_of_their_items_and_find_their_cluster(shop):
    config, root, _, _ = shop
    table = open_table(config.output.uri, config.output.table)
    rows = {row["id"]: row for row in read_table(config).to_pylist()}
    same = total = 0
    for session in ("s1", "s2", "s3", "s4", "s5"):      # a log without user_id: each session is a user
        queries, items = user_queries(table, session)
        assert items == session_items(root / "sessions.csv", session)
        for column in ("text", "behaviour"):              # by hand: the normalised mean of the unit vectors
            mean = np.mean([np.asarray(rows[item][f"{column}_vec"]) for item in items], axis=0)
            np.testing.assert_allclose(queries[column], mean / np.linalg.norm(mean), atol=1e-6)
        found = search(table, queries, k=5, weights={"behaviour": 1.0}, exclude=items)
        assert len(found) == 5 and not {row["id"] for row in found} & set(items)
        same += sum(cluster_of(row["id"]) == cluster_of(items[0]) for row in found)
        total += len(found)
    assert same / total >= 0.9


@pytest.mark.parametrize("suffix", ["csv", "parquet", "jsonl"])
def test_query_user_finds_a_user_by_user_id_in_a_log_of_each_format(shop, tmp_path, capsys, suffix):
    config, _, _, _ = shop
    bought = ["c2-1", "c2-5", "c2-9"]
    log = pd.DataFrame({"user_id": ["ada", "ada", "bob", "ada", "ada"], "session_id": ["s1", "s1", "s2", "s3", "s3"],
                        "item_id": [bought[0], bought[1], "c4-0", bought[1], bought[2]]})
    path = tmp_path / f"log.{suffix}"
    if suffix == "csv":
        path.write_text(log.to_csv(index=False) + "ada,s9,c5-1,a cell too many\n")   # passed over: a job reject
    elif suffix == "parquet":
        log.to_parquet(path)
    else:
        path.write_text(log.to_json(orient="records", lines=True) + "\n{not json\n")
    table = open_table(config.output.uri, config.output.table)
    assert user_queries(table, "ada", str(path))[1] == bought

    args = ["query", "--uri", config.output.uri, "--table", config.output.table, "--user", "ada",
            "--interactions", str(path), "--weights", "behaviour=1", "-k", "4", "--json"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    found = [row["id"] for row in json.loads(out.splitlines()[-1])]
    assert len(found) == 4 and not set(found) & set(bought) and {cluster_of(item) for item in found} == {"c2"}
    assert "user ada: 3 items in the log (c2-1, c2-5, c2-9)" in err


def test_the_service_answers_a_user_as_query_does_from_its_index_of_the_log(shop, capsys, monkeypatch):
    """The service's user search equals `query --user --json`, and reads the log once, not once a request."""
    from fastapi.testclient import TestClient

    from pipelines.serve import create_app, search_api

    config, _, _, _ = shop
    built = []
    monkeypatch.setattr(search_api, "UserIndex", lambda log: built.append(log) or UserIndex(log))
    with TestClient(create_app(config.output.uri, config.output.table), base_url="http://127.0.0.1") as client:
        for session in ("s1", "s2", "s3"):
            served = client.post("/api/search", json={"user": session, "weights": {"behaviour": 1}, "k": 4})
            assert main(["query", "--uri", config.output.uri, "--table", config.output.table, "--user", session,
                         "--weights", "behaviour=1", "-k", "4", "--json"]) == 0
            assert served.status_code == 200 and served.json() == json.loads(capsys.readouterr().out.splitlines()[-1])
    assert len(built) == 1


def test_query_user_says_what_is_missing(shop, tmp_path, capsys):
    config, root, _, _ = shop
    table = ["--uri", config.output.uri, "--table", config.output.table]
    assert main(["query", *table, "--user", "nobody"]) == 2
    assert f"user 'nobody' has no rows in {root / 'sessions.csv'}" in capsys.readouterr().err
    (tmp_path / "gone.csv").write_text("session_id,item_id\nu1,no-such-item\n")
    assert main(["query", *table, "--user", "u1", "--interactions", str(tmp_path / "gone.csv")]) == 2
    assert "none of the 1 items of user 'u1'" in capsys.readouterr().err
    assert main(["query", *table, "--like", "c0-0", "--interactions", str(tmp_path / "gone.csv")]) == 2
    assert "--interactions is for --user" in capsys.readouterr().err
