"""Nothing the table holds is lost by accident (docs/safety.md): a row leaves only when a written row replaces
it or its id is gone from a catalog read cleanly; every kind of night keeps the rest, the counts add up, and
two commits from one version never both land, on local disk or S3."""

from __future__ import annotations

import json
import multiprocessing
import uuid
from pathlib import Path

import boto3
import lance
import numpy as np
import pyarrow as pa
import pytest
from lance.fragment import write_fragments

from demo.build_catalog import build as build_demo_catalog
from pipelines.cli import main
from tests.conftest import (
    BUCKET,
    DEMO_CATALOG,
    DEMO_PHOTOS,
    PHOTOS,
    demo_rows,
    make_config,
    photo,
    read_table,
    run,
    write_demo_rows,
)
from tests.fault_proxy import FaultProxy
from tests.servers import environment
from transforms.combine import combine
from transforms.lance_sink import dataset_uri
from transforms.run_log import commit_rejects, read_runs, record_run
from transforms.table_commit import ConcurrentRunError, RunIdentity, TableChange, commit_change

# The demo catalog (real photos, captions, a session log) with the light encoders: no network to load.
LIGHT = {"color": {"kind": "color", "weight": 0.5},
         "behaviour": {"kind": "item2vec", "dim": 4, "epochs": 5, "seed": 1, "weight": 0.5}}
# A behaviour generation every night: each run trains the grown log again and writes every row.
RETRAINED = dict(LIGHT, behaviour=dict(LIGHT["behaviour"], retrain_days=0))


def _demo(tmp_path: Path, encoders: dict = LIGHT, **output) -> tuple[dict, Path]:
    manifest = build_demo_catalog(tmp_path / "catalog")
    catalog = dict(DEMO_CATALOG, path=str(manifest))
    if any(e["kind"] == "item2vec" for e in encoders.values()):
        catalog["interactions"] = str(manifest.parent / "sessions.csv")
    return {"catalog": catalog, "encoders": encoders, "output": output}, manifest


def _config(tmp_path: Path, spec: dict):
    return make_config(tmp_path, spec["catalog"], spec["encoders"], table="demo", output=spec["output"])


def _rows(config) -> dict[str, dict]:
    return {row["id"]: row for row in read_table(config).to_pylist()}


def _grow_log(manifest: Path, session: str) -> None:
    with (manifest.parent / "sessions.csv").open("a", encoding="utf-8") as handle:
        handle.write(f"shopper-x,{session},moon,1800000000\nshopper-x,{session},hubble,1800000100\n")


def _counts_add_up(summary: dict) -> None:
    assert summary["read"] == (summary["written"] + summary["unchanged"] + summary["kept"] + summary["rejected"]
                               + summary["deferred"])
    assert summary["rows_after"] == summary["rows_before"] - summary["deleted"] + summary["added"]


def test_a_missing_image_keeps_the_items_stored_row(tmp_path):
    spec, manifest = _demo(tmp_path)
    config = _config(tmp_path, spec)
    run(config, "n1")
    before = _rows(config)
    (manifest.parent / "images" / "chelsea.png").unlink()
    summary = run(config, "n2")
    assert (summary["kept"], summary["rejected"], summary["deleted"]) == (1, 0, 0)
    _counts_add_up(summary)
    after = _rows(config)
    assert after.keys() == before.keys() and after["chelsea"] == before["chelsea"]
    [reject] = [r for r in read_table(config, "demo_rejects").to_pylist() if r["run_id"] == "n2"]
    assert (reject["id"], reject["stage"], reject["kept"]) == ("chelsea", "load", True)


@pytest.mark.parametrize("night", ["a new behaviour generation", "new weights"])
def test_a_night_that_rewrites_every_row_keeps_what_it_did_not_write(tmp_path, night):
    """A corrupt image, and with on_missing: keep an item gone from the catalog: on a night that writes every
    other row (a new behaviour generation over a grown log) or every row's `vector` (new weights) both rows stay."""
    spec, manifest = _demo(tmp_path, RETRAINED if night == "a new behaviour generation" else LIGHT, on_missing="keep")
    config = _config(tmp_path, spec)
    run(config, "n1")
    before = _rows(config)
    (manifest.parent / "images" / "coffee.png").write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    write_demo_rows(manifest, [row for row in demo_rows(manifest) if row["id"] != "grass"])
    if night == "a new behaviour generation":
        _grow_log(manifest, "late-night")
    else:
        spec["encoders"] = {"color": dict(LIGHT["color"], weight=0.8),
                            "behaviour": dict(LIGHT["behaviour"], weight=0.2)}
    config = _config(tmp_path, spec)
    summary = run(config, "n2")
    assert summary["status"] == "committed"
    assert summary["written"] == (DEMO_PHOTOS - 2 if night == "a new behaviour generation" else 0)
    assert (summary["kept"], summary["absent"], summary["deleted"]) == (1, 1, 0)
    _counts_add_up(summary)
    after = _rows(config)
    assert after.keys() == before.keys()
    for kept in ("coffee", "grass"):
        assert after[kept]["color_vec"] == before[kept]["color_vec"] and after[kept]["title"] == before[kept]["title"]
        vectors = {name: np.asarray(after[kept][f"{name}_vec"], np.float32) for name in LIGHT
                   if after[kept][f"{name}_vec"] is not None}
        np.testing.assert_allclose(after[kept]["vector"], combine(vectors, config.normalised_weights(), list(LIGHT),
                                                                  {"color": 144, "behaviour": 4}), atol=1e-6)
    # New behaviour vectors are turned onto the stored ones (behaviour.py): a kept row's vector stays in their space.
    assert after["coffee"]["behaviour_vec"] == before["coffee"]["behaviour_vec"] is not None


def _bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def test_six_nights_with_no_retention_keep_the_table_within_three_runs_of_storage(tmp_path):
    """Each night grows the log and trains it again (every row rewritten) and edits a caption; run tags expire
    with retain_days."""
    spec, manifest = _demo(tmp_path, RETRAINED, retain_days=0)
    config = _config(tmp_path, spec)
    rows = demo_rows(manifest)
    for night in range(1, 7):
        _grow_log(manifest, f"night-{night}")
        rows[night]["title"] += " (edited)"
        write_demo_rows(manifest, rows)
        assert run(config, f"n{night}")["status"] == "committed"
    fresh = make_config(tmp_path / "fresh", spec["catalog"], spec["encoders"], table="demo")
    run(fresh, "fresh")
    six_nights, one_run = (_bytes(Path(dataset_uri(c.output.uri, "demo"))) for c in (config, fresh))
    assert six_nights <= 3 * one_run, (six_nights, one_run)
    tags = lance.dataset(dataset_uri(config.output.uri, "demo")).tags.list()
    assert sorted(tags) == ["run-n5", "run-n6"]                     # output.keep_runs: 2


def test_items_the_budget_defers_on_a_new_schemas_night_stay(tmp_path):
    """The only encoder changed, under a budget of 0: no item gets a vector, none is written, and all stay,
    with a null in the changed column until a later night fills it."""
    spec, manifest = _demo(tmp_path, {"color": LIGHT["color"]})
    config = _config(tmp_path, spec)
    run(config, "n1")
    spec["encoders"] = {"color": dict(LIGHT["color"], bins=[4, 4, 4])}
    budgeted = make_config(tmp_path, spec["catalog"], spec["encoders"], table="demo", run={"max_encode": 0})
    summary = run(budgeted, "n2")
    assert (summary["deferred"], summary["written"], summary["rows_after"]) == (DEMO_PHOTOS, 0, DEMO_PHOTOS)
    _counts_add_up(summary)
    rows = _rows(budgeted)
    assert len(rows) == DEMO_PHOTOS and all(row["color_vec"] is None for row in rows.values())
    filled = run(_config(tmp_path, spec), "n3")
    assert filled["encoded"]["color"] == DEMO_PHOTOS
    assert all(len(row["color_vec"]) == 64 for row in _rows(budgeted).values())


def test_a_night_that_would_delete_a_tenth_of_the_table_refuses_until_allowed(tmp_path, capsys):
    spec, manifest = _demo(tmp_path)
    config_file = tmp_path / "demo.yaml"
    config_file.write_text(json.dumps(dict(spec, output={"uri": str(tmp_path / "db"), "table": "demo"})))
    assert main(["run", "--config", str(config_file), "--run-id", "n1"]) == 0
    gone = {"brick", "clock", "coins"}
    write_demo_rows(manifest, [row for row in demo_rows(manifest) if row["id"] not in gone])
    version = lance.dataset(dataset_uri(str(tmp_path / "db"), "demo")).version

    assert main(["run", "--config", str(config_file), "--run-id", "n2"]) == 1
    assert "--max-delete-ratio" in capsys.readouterr().err
    assert lance.dataset(dataset_uri(str(tmp_path / "db"), "demo")).version == version

    assert main(["run", "--config", str(config_file), "--run-id", "n3", "--max-delete-ratio", "0.15"]) == 0
    [n3] = [r for r in read_runs(str(tmp_path / "db"), "demo") if r["run_id"] == "n3"]
    assert n3["deleted"] == 3 and n3["rows_after"] == DEMO_PHOTOS - 3


def test_a_run_id_that_committed_before_is_refused_before_any_work(tmp_path, capsys):
    spec, _ = _demo(tmp_path, {"color": LIGHT["color"]})
    config_file = tmp_path / "demo.yaml"
    config_file.write_text(json.dumps(dict(spec, output={"uri": str(tmp_path / "db"), "table": "demo"})))
    assert main(["run", "--config", str(config_file), "--run-id", "nightly"]) == 0
    capsys.readouterr()
    assert main(["run", "--config", str(config_file), "--run-id", "nightly"]) == 2
    assert "run id nightly was already used" in capsys.readouterr().err


def test_a_read_that_rejects_a_row_it_cannot_name_deletes_nothing(tmp_path):
    spec, manifest = _demo(tmp_path)
    config = _config(tmp_path, spec)
    run(config, "n1")
    listed = [row for row in demo_rows(manifest) if row["id"] != "grass"]
    write_demo_rows(manifest, listed)
    with manifest.open("a", encoding="utf-8") as handle:
        handle.write("a line,with,too,many,cells,to,read\n")
    summary = run(config, "n2")
    assert (summary["deleted"], summary["absent"], summary["rejected"]) == (0, 1, 1)
    assert "grass" in _rows(config)
    write_demo_rows(manifest, listed)                                  # the export fixed: now it is deleted
    assert run(config, "n3")["deleted"] == 1 and "grass" not in _rows(config)


def test_a_failed_upkeep_is_committed_exit_3_and_the_next_run_does_it(tmp_path, monkeypatch, capsys):
    spec, _ = _demo(tmp_path)
    config_file = tmp_path / "demo.yaml"
    config_file.write_text(json.dumps(dict(spec, output={"uri": str(tmp_path / "db"), "table": "demo"})))

    def dies(*_args, **_kwargs):
        raise RuntimeError("the store went away")

    monkeypatch.setattr("transforms.commit.maintain", dies)
    assert main(["run", "--config", str(config_file), "--run-id", "n1"]) == 3
    assert "upkeep" in capsys.readouterr().err
    [n1] = read_runs(str(tmp_path / "db"), "demo")
    assert n1["status"] == "committed" and n1["upkeep"].startswith("failed: RuntimeError")
    assert lance.dataset(dataset_uri(str(tmp_path / "db"), "demo")).count_rows() == DEMO_PHOTOS
    monkeypatch.undo()
    assert main(["run", "--config", str(config_file), "--run-id", "n2"]) == 0          # nothing changed
    n2 = read_runs(str(tmp_path / "db"), "demo")[-1]
    assert n2["status"] == "unchanged" and n2["upkeep"] == "done" and n2["index"]


def test_a_retried_commit_step_appends_its_rejects_and_records_its_run_once(tmp_path):
    db = str(tmp_path / "db")
    schema = pa.schema([pa.field("id", pa.string()), pa.field("stage", pa.string()), pa.field("error", pa.string()),
                        pa.field("message", pa.string()), pa.field("input_ref", pa.string()),
                        pa.field("run_id", pa.string(), nullable=False), pa.field("kept", pa.bool_())])
    rejects = pa.table({"id": ["a"], "stage": ["load"], "error": ["E"], "message": ["m"], "input_ref": [None],
                        "run_id": ["r1"], "kept": [True]}, schema=schema)
    fragments = [json.dumps(f.to_json()) for f in write_fragments(
        rejects, dataset_uri(db, "items_rejects"), schema=schema, mode="append")]
    record = {"run_id": "r1", "status": "committed", "upkeep": "pending"}
    for _ in range(2):
        commit_rejects(db, "items", fragments)
        record_run(db, "items", record)
    record_run(db, "items", dict(record, upkeep="done"))
    assert lance.dataset(dataset_uri(db, "items_rejects")).to_table()["id"].to_pylist() == ["a"]
    [stored] = read_runs(db, "items")
    assert stored["upkeep"] == "done"


def test_a_store_that_answers_503_costs_no_reject(s3, tmp_path):
    """Catalog and photos on S3 behind a proxy answering 503 SlowDown to a fifth of the requests: the stats and
    reads are retried (by the object store's client), and every item is embedded."""
    client, prefix = boto3.client("s3"), f"slow-{uuid.uuid4().hex[:8]}"
    lines = ["id,caption,image"]
    for i, name in enumerate(PHOTOS[:6]):
        client.upload_file(str(photo(name)), BUCKET, f"{prefix}/images/{i}.png")
        lines.append(f"item-{i},photo {i},images/{i}.png")
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/catalog.csv", Body="\n".join(lines).encode() + b"\n")
    with FaultProxy(s3.endpoint, rate=0.2, seed=5, faults=("503 before",)) as proxy, \
            environment(AWS_ENDPOINT_URL=proxy.url):
        config = make_config(tmp_path, {"format": "manifest", "path": f"s3://{BUCKET}/{prefix}/catalog.csv",
                                        "text_fields": ["caption"]})
        summary = run(config, "r1", (f"--s3_endpoint_url={proxy.url}",))
    assert proxy.injected["503 before"] > 0
    assert (summary["written"], summary["rejected"], summary["kept"]) == (6, 0, 0), summary


def _racer(uri: str, name: str, trials, results, barrier, storage: dict | None) -> None:
    """One of two processes that commit from the same version at the same instant, trial after trial."""
    schema = pa.schema([pa.field("id", pa.string())])
    for read_version in iter(trials.get, None):
        written = write_fragments(pa.table({"id": [f"{name}-{read_version}"]}, schema=schema), uri, schema=schema,
                                  mode="append", storage_options=storage)
        change = TableChange(schema, [json.dumps(f.to_json()) for f in written])
        barrier.wait()
        try:
            results.put((name, commit_change(uri, change, RunIdentity(f"{name}-{read_version}", uuid.uuid4().hex),
                                             read_version, storage)))
        except ConcurrentRunError:
            results.put((name, None))


@pytest.mark.parametrize("store", ["local", "s3"])
def test_two_commits_from_one_version_at_the_same_instant_never_both_land(tmp_path, store, request):
    if store == "s3":
        request.getfixturevalue("s3")
        uri = f"s3://{BUCKET}/race-{uuid.uuid4().hex[:8]}/t.lance"
    else:
        uri = str(tmp_path / "t.lance")
    schema = pa.schema([pa.field("id", pa.string())])
    first = [json.dumps(f.to_json()) for f in write_fragments(pa.table({"id": ["seed"]}, schema=schema), uri,
                                                              schema=schema, mode="append")]
    version = commit_change(uri, TableChange(schema, first), RunIdentity("seed", "seed"), None)
    spawn = multiprocessing.get_context("spawn")
    trials, results, barrier = spawn.Queue(), spawn.Queue(), spawn.Barrier(2, timeout=120)
    racers = [spawn.Process(target=_racer, args=(uri, name, trials, results, barrier, None)) for name in "ab"]
    for racer in racers:
        racer.start()
    try:
        for _ in range(8):
            for _ in racers:
                trials.put(version)
            outcomes = dict(results.get(timeout=120) for _ in racers)
            winners = [name for name, committed in outcomes.items() if committed is not None]
            assert len(winners) == 1, outcomes
            assert outcomes[winners[0]] == version + 1
            ids = lance.dataset(uri).to_table()["id"].to_pylist()
            assert f"{winners[0]}-{version}" in ids and len(ids) == len(set(ids)) == version + 1
            version += 1
    finally:
        for _ in racers:
            trials.put(None)
        for racer in racers:
            racer.join(timeout=60)
