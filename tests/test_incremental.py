"""Nightly runs: only changes are embedded, each run is one atomic version, old versions stay readable."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import replace
from pathlib import Path

import apache_beam as beam
import lance
import numpy as np
import pyarrow as pa
import pytest
from lance.fragment import write_fragments

from pipelines.cli import main
from pipelines.nightly import build_pipeline, plan_job
from pipelines.search.query import item_queries, open_table, search
from tests.conftest import PHOTOS, captioned_catalog, copy_photo, make_config, read_table, run, write_catalog
from transforms import commit, table_commit
from transforms.lance_sink import dataset_uri
from transforms.run_log import read_runs
from transforms.table_commit import ConcurrentRunError, RunIdentity, TableChange, commit_change

ENCODERS = {"text": {"kind": "sentence-transformers", "weight": 0.6}, "color": {"kind": "color", "weight": 0.4}}


@pytest.fixture
def catalog(tmp_path):
    folder, rows = captioned_catalog(tmp_path)
    # Six items: one deleted is a sixth of the table, over the default output.max_delete_ratio.
    config = make_config(tmp_path, {"format": "manifest", "path": str(folder / "catalog.csv"),
                                    "text_fields": ["caption"]}, ENCODERS, output={"max_delete_ratio": 0.5})
    return config, folder, rows


def _latest(config) -> int:
    return lance.dataset(dataset_uri(config.output.uri, config.output.table)).version


def _vectors(table, column) -> dict:
    return {r["id"]: np.asarray(r[column]) for r in table.to_pylist()}


def test_unchanged_catalog_encodes_nothing_and_adds_no_version(catalog, caplog):
    config, _, rows = catalog
    with caplog.at_level(logging.INFO, logger="catalog_embed.progress"):
        first = run(config, "r1")
    assert f"to encode: color {len(rows):,} items, text {len(rows):,} items" in caplog.text      # up front
    version = _latest(config)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="catalog_embed.progress"):
        second = run(config, "r2")
    assert "to encode: nothing" in caplog.text
    assert first["encoded"] == {"text": len(rows), "color": len(rows)}
    assert second["encoded"] == {"text": 0, "color": 0}
    assert (second["written"], second["unchanged"], second["status"]) == (0, len(rows), "unchanged")
    assert _latest(config) == version


def test_changes_are_encoded_exactly_and_old_versions_stay_readable(catalog):
    config, folder, rows = catalog
    run(config, "r1")
    before = read_table(config)
    rows[0]["caption"] = "a sleepy ginger cat on a chair"        # edited caption
    copy_photo(PHOTOS[7], folder / "images" / "1.png")           # replaced image
    copy_photo(PHOTOS[6], folder / "images" / "new.png")
    rows.append({"id": "item-new", "caption": "a motorcycle", "image": "images/new.png"})  # added
    removed = rows.pop(2)                                        # removed
    write_catalog(folder, rows)

    summary = run(config, "r2")
    assert summary["encoded"] == {"text": 2, "color": 2}
    assert (summary["written"], summary["deleted"], summary["unchanged"]) == (3, 1, 3)
    assert summary["read"] == summary["written"] + summary["unchanged"] + summary["rejected"]
    after = read_table(config)
    assert sorted(after["id"].to_pylist()) == sorted(r["id"] for r in rows)
    old_text, new_text = _vectors(before, "text_vec"), _vectors(after, "text_vec")
    old_color, new_color = _vectors(before, "color_vec"), _vectors(after, "color_vec")
    assert not np.allclose(old_text["item-0"], new_text["item-0"])
    np.testing.assert_array_equal(old_color["item-0"], new_color["item-0"])   # image unchanged: reused
    np.testing.assert_array_equal(old_text["item-1"], new_text["item-1"])
    assert not np.allclose(old_color["item-1"], new_color["item-1"])

    old = open_table(config.output.uri, config.output.table, "run-r1").handle.to_arrow()
    assert removed["id"] in old["id"].to_pylist()
    np.testing.assert_array_equal(_vectors(old.sort_by("id"), "text_vec")["item-0"], old_text["item-0"])


def _broken(*args, **kwargs):
    raise OSError("injected failure")


@pytest.mark.parametrize("where", [
    (lance.LanceDataset, "commit"),                      # just before the commit
    ("transforms.lance_sink.write_fragments", None),     # in a worker writing its fragment
])
def test_a_failure_leaves_the_table_and_a_rerun_completes(catalog, monkeypatch, where):
    config, folder, rows = catalog
    run(config, "r1")
    version, before = _latest(config), read_table(config)
    rows[1]["caption"] = "changed"
    write_catalog(folder, rows)
    with monkeypatch.context() as patch:
        patch.setattr(*[w for w in where if w is not None], _broken)
        with pytest.raises(Exception, match="injected failure"):
            run(config, "r2")
    assert _latest(config) == version
    assert read_table(config).equals(before)
    assert run(config, "r2")["written"] == 1


def test_two_worker_incremental_run_is_one_version_with_unique_ids(catalog):
    config, folder, rows = catalog
    run(config, "r1")
    start = _latest(config)
    rows[3]["caption"] = "a rocket on its pad"
    write_catalog(folder, rows)
    run(config, "r2", ("--direct_num_workers=2", "--direct_running_mode=multi_processing"))
    dataset = lance.dataset(dataset_uri(config.output.uri, config.output.table))
    assert dataset.tags.list()["run-r2"]["version"] == start + 1
    ids = read_table(config)["id"].to_pylist()
    assert sorted(ids) == sorted(r["id"] for r in rows) and len(ids) == len(set(ids))


@pytest.mark.parametrize("moved", ["before its check", "between its check and Lance's commit"])
def test_a_run_that_lost_the_race_commits_nothing(catalog, monkeypatch, moved):
    config, folder, rows = catalog
    run(config, "r1")
    rows.append({"id": "item-race", "caption": "a horse", "image": "images/0.png"})
    rows[3]["caption"] = "a rocket on its pad"      # both runs delete its old row: Lance cannot rebase either
    write_catalog(folder, rows)
    slow = plan_job(config, "slow", str(folder / "scratch"))   # reads the table, then another run commits first
    run(config, "fast")
    if moved != "before its check":     # Lance, not our check, finds the newer version: its conflict error
        uri, read_version = slow.context.dataset_uri, slow.context.read_version
        opened_by_check = table_commit.open_dataset
        monkeypatch.setattr(table_commit, "open_dataset", lambda at, storage=None: lance.dataset(
            at, version=read_version) if at == uri else opened_by_check(at, storage))
    with beam.Pipeline() as pipeline:
        build_pipeline(pipeline, slow)
    [record] = [r for r in read_runs(config.output.uri, config.output.table) if r["run_id"] == "slow"]
    assert record["status"] == "failed" and record["message"].startswith("table moved:")
    ids = read_table(config)["id"].to_pylist()
    assert ids.count("item-race") == 1
    assert run(config, "slow-again")["unchanged"] == len(rows)


def test_new_weights_rewrite_the_vector_column_alone(catalog):
    """No model runs and no row is written: each fragment gains a data file of the `vector` column, made from the
    stored vectors, in one commit with the new weights; the version before keeps its vectors."""
    config, folder, rows = catalog
    first = run(config, "r1")
    before = read_table(config)
    edited = [dict(rows[0], caption="a sleepy ginger cat"), *rows[1:]]      # and one caption edited that night
    write_catalog(folder, edited)
    reweighted = replace(config, encoders=tuple(replace(e, weight={"text": 0.2, "color": 0.8}[e.name])
                                                for e in config.encoders))
    summary = run(reweighted, "r2")
    assert summary["encoded"] == {"text": 1, "color": 0} and summary["rewrote"] == "vector"
    assert (summary["written"], summary["unchanged"], summary["rows_after"]) == (1, len(rows) - 1, len(rows))
    after = read_table(config)
    for row in after.to_pylist():
        expected = np.concatenate([np.sqrt(0.2) * np.asarray(row["text_vec"]),
                                   np.sqrt(0.8) * np.asarray(row["color_vec"])])
        np.testing.assert_allclose(row["vector"], expected, atol=1e-6)
    for name in ("id", "caption", "text_vec", "color_vec", "text_fp", "color_fp", "run_id"):
        changed = [a != b for a, b in zip(after[name].to_pylist(), before[name].to_pylist(), strict=True)]
        assert changed == [name in ("caption", "text_vec", "text_fp", "run_id") and n == 0
                           for n in range(len(rows))], name
    dataset = lance.dataset(dataset_uri(config.output.uri, config.output.table), version=summary["table_version"])
    vector_field = dataset.lance_schema.field("vector").id()       # the run's version, before upkeep compacts it
    carried = [f.metadata.files for f in dataset.get_fragments() if len(f.metadata.files) > 1]
    assert carried and all(files[-1].fields == [vector_field] and -2 in files[0].fields for files in carried)
    old = lance.dataset(dataset_uri(config.output.uri, config.output.table), version=first["table_version"])
    assert old.to_table().sort_by("id")["vector"].equals(before["vector"])


def test_new_weights_on_a_night_every_stored_row_leaves(catalog):
    """Lance refuses a Merge that leaves out a fragment it read: a fragment whose rows are all replaced or deleted
    comes with every row deleted, and Lance drops it. (The 30-night soak found such a night failing, and every
    night after it while the new weights stood.)"""
    config, folder, rows = catalog
    first = run(config, "r1")
    write_catalog(folder, [dict(row, caption=f"{row['caption']}, photographed again") for row in rows[1:]])
    reweighted = replace(config, encoders=tuple(replace(e, weight={"text": 0.2, "color": 0.8}[e.name])
                                                for e in config.encoders))
    summary = run(reweighted, "r2")
    assert summary["status"] == "committed" and summary["rewrote"] == "vector"
    assert (summary["written"], summary["deleted"], summary["rows_after"]) == (len(rows) - 1, 1, len(rows) - 1)
    uri = dataset_uri(config.output.uri, config.output.table)
    read = {f.fragment_id for f in lance.dataset(uri, version=first["table_version"]).get_fragments()}
    committed = lance.dataset(uri, version=summary["table_version"])
    assert not read & {f.fragment_id for f in committed.get_fragments()}
    after = committed.to_table().sort_by("id")
    assert after["id"].to_pylist() == sorted(row["id"] for row in rows[1:])
    assert all(caption.endswith(", photographed again") for caption in after["caption"].to_pylist())
    for row in after.to_pylist():
        expected = np.concatenate([np.sqrt(0.2) * np.asarray(row["text_vec"]),
                                   np.sqrt(0.8) * np.asarray(row["color_vec"])])
        np.testing.assert_allclose(row["vector"], expected, atol=1e-6)
    assert run(reweighted, "r3")["status"] == "unchanged"


def test_changed_encoder_reembeds_that_encoder_only(catalog, tmp_path):
    config, _, rows = catalog
    run(config, "r1")
    finer = make_config(tmp_path, {"format": "manifest", "path": config.catalog.path, "text_fields": ["caption"]},
                        {"text": ENCODERS["text"], "color": {"kind": "color", "weight": 0.4, "bins": [8, 8, 8]}})
    summary = run(finer, "r2")          # no --reembed: the text vectors are kept, the color column filled again
    assert summary["encoded"] == {"text": 0, "color": len(rows)}
    assert read_table(finer).schema.field("color_vec").type.list_size == 512
    old = open_table(config.output.uri, config.output.table, "run-r1").handle.to_arrow()
    assert old.schema.field("color_vec").type.list_size == 144
    assert read_table(finer)["text_vec"].equals(old.sort_by("id")["text_vec"])
    assert run(finer, "r3", reembed=True)["encoded"] == {"text": len(rows), "color": len(rows)}


def test_a_removed_encoder_drops_its_column_and_encodes_nothing(catalog, tmp_path):
    config, _, rows = catalog
    run(config, "r1")
    text_only = make_config(tmp_path, {"format": "manifest", "path": config.catalog.path, "text_fields": ["caption"]},
                            {"text": ENCODERS["text"]})
    summary = run(text_only, "r2")
    assert summary["encoded"] == {"text": 0} and summary["written"] == len(rows)
    table = read_table(text_only)
    assert "color_vec" not in table.schema.names
    np.testing.assert_allclose(np.stack(table["vector"].to_numpy(zero_copy_only=False)),
                               np.stack(table["text_vec"].to_numpy(zero_copy_only=False)), atol=1e-6)


def test_rollback_restores_earlier_content_as_a_new_version(catalog, capsys):
    config, folder, rows = catalog
    run(config, "r1")
    original = read_table(config).drop_columns(["embedded_at"])
    rows.pop(0)
    write_catalog(folder, rows)
    run(config, "r2")
    latest = _latest(config)
    assert main(["rollback", "--uri", config.output.uri, "--table", config.output.table, "--to", "run-r1"]) == 0
    assert _latest(config) == latest + 1
    assert read_table(config).drop_columns(["embedded_at"]).equals(original)
    assert main(["versions", "--uri", config.output.uri, "--table", config.output.table]) == 0
    assert "run-r1" in capsys.readouterr().out


def test_maintenance_indexes_a_large_enough_table(catalog, tmp_path):
    config, folder, rows = catalog
    indexed = make_config(tmp_path, {"format": "manifest", "path": config.catalog.path, "text_fields": ["caption"]},
                          ENCODERS, output={"index_min_rows": 4, "max_delete_ratio": 0.5})
    run(indexed, "r1")
    edited = [dict(rows[1], caption="an edited caption"), *rows[2:]]
    write_catalog(folder, edited)
    assert run(indexed, "r2")["deleted"] == 1            # a second run refreshes the existing indexes
    dataset = lance.dataset(dataset_uri(indexed.output.uri, indexed.output.table))
    assert {i.name for i in dataset.describe_indices()} >= {"vector_idx", "id_idx"}
    # r2 found the rows to replace or delete through the id index: one row per id, the edit in place.
    stored = {r["id"]: r["caption"] for r in read_table(indexed).to_pylist()}
    assert read_table(indexed).num_rows == len(stored) and stored == {r["id"]: r["caption"] for r in edited}
    table = open_table(indexed.output.uri, indexed.output.table)
    assert search(table, item_queries(table, "item-1"), 3)[0]["id"] == "item-1"


def test_an_unreadable_table_fails_the_run_instead_of_being_overwritten(catalog):
    config, _, _ = catalog
    manifest = Path(dataset_uri(config.output.uri, config.output.table)) / "_versions" / "1.manifest"
    manifest.parent.mkdir(parents=True)
    manifest.write_bytes(b"not a manifest" * 4)     # stands for a store that answers with an error
    with pytest.raises(ValueError, match="too small"):
        run(config, "r1")
    assert manifest.read_bytes() == b"not a manifest" * 4


def test_a_failed_upkeep_step_leaves_the_run_committed(catalog, tmp_path, monkeypatch):
    # Lance refuses an index whose k-means cannot fill its partitions (seen on 100k rows over 101 distinct
    # vectors); the rows are committed by then, so the run must say so.
    def refuse(*_args, **_kwargs):
        raise RuntimeError("LanceError(Arrow): Cannot create 316 IVF partitions: k-means could only form 101")

    monkeypatch.setattr(lance.LanceDataset, "create_index", refuse)
    config, _, rows = catalog
    config = type(config)(config.catalog, config.encoders,
                          type(config.output)(**{**config.output.__dict__, "index_min_rows": 4}))
    summary = run(config, "r1")
    assert summary["status"] == "committed" and summary["message"].startswith("index skipped: LanceError")
    assert read_table(config).num_rows == len(rows) and _latest(config) >= summary["table_version"]
    indexes = {index.name for index in lance.dataset(dataset_uri(config.output.uri, config.output.table))
               .describe_indices()}
    assert "vector_idx" not in indexes and "id_idx" in indexes       # the other indexes were still made


def test_two_runs_started_at_once_commit_once_and_the_other_exits_1(tmp_path, monkeypatch, capsys):
    folder, rows = captioned_catalog(tmp_path)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(f"catalog: {{format: manifest, path: {folder / 'catalog.csv'}, text_fields: [caption]}}\n"
                           f"encoders: {{color: {{kind: color}}}}\noutput: {{uri: {tmp_path / 'db'}, table: items}}\n"
                           "run: {warn_drift: 2}\n")                # a sixth of the items changes: no drift warning
    assert main(["run", "--config", str(config_file)]) == 0
    copy_photo(PHOTOS[7], folder / "images" / "1.png")              # one photo changed
    uri = dataset_uri(str(tmp_path / "db"), "items")
    before = lance.dataset(uri)
    both_planned = threading.Barrier(2, timeout=120)                 # both read the table before either commits
    real_commit = commit.commit_change

    def commit_when_both_are_there(*args):
        both_planned.wait()
        return real_commit(*args)

    monkeypatch.setattr(commit, "commit_change", commit_when_both_are_there)
    codes: list[int] = []
    runs = [threading.Thread(target=lambda: codes.append(main(["run", "--config", str(config_file)])))
            for _ in range(2)]
    for thread in runs:
        thread.start()
    for thread in runs:
        thread.join()

    assert sorted(codes) == [0, 1]
    assert "table moved" in capsys.readouterr().err
    first, *raced = read_runs(str(tmp_path / "db"), "items")
    assert sorted(r["status"] for r in raced) == ["committed", "failed"]
    assert len({r["run_id"] for r in [first, *raced]}) == 3                # started in the same second, still unique
    [winner] = [r for r in raced if r["status"] == "committed"]
    tags = lance.dataset(uri).tags.list()
    assert {t for t in tags if t.startswith("run-")} == {f"run-{first['run_id']}", f"run-{winner['run_id']}"}
    after = lance.dataset(uri, version=tags[f"run-{winner['run_id']}"]["version"])
    assert after.version == before.version + 1 and after.count_rows() == before.count_rows()


def test_a_retried_commit_is_known_by_its_run_and_a_reused_run_id_is_refused(tmp_path):
    uri, schema = str(tmp_path / "t.lance"), pa.schema([pa.field("id", pa.string())])

    def change(ids: list[str]) -> TableChange:
        written = write_fragments(pa.table({"id": ids}, schema=schema), uri, schema=schema, mode="append")
        return TableChange(schema, [json.dumps(fragment.to_json()) for fragment in written])

    ours, run = change(["a"]), RunIdentity("r1", "first")
    version = commit_change(uri, ours, run, None)
    assert commit_change(uri, ours, run, None) == version                        # Beam retried the commit
    lance.dataset(uri).tags.delete("run-r1")                                     # ... after it, before its tag
    assert commit_change(uri, ours, run, None) == version
    assert lance.dataset(uri).tags.list()["run-r1"]["version"] == version
    with pytest.raises(ConcurrentRunError, match="run id r1 already tags version 1"):
        commit_change(uri, change(["b"]), RunIdentity("r1", "second"), version)  # another run, same id
    assert lance.dataset(uri).to_table()["id"].to_pylist() == ["a"]
    unchanged = RunIdentity("r2", "third")                                       # a run that changes nothing
    assert commit_change(uri, TableChange(schema), unchanged, version) == version
    assert commit_change(uri, TableChange(schema), unchanged, version) == version       # ... retried


def test_how_encoders_run_does_not_rewrite_the_table(catalog):
    config, _, rows = catalog
    run(config, "r1")
    retuned = replace(config, encoders=tuple(replace(e, batch_size=2, device="cpu") for e in config.encoders),
                      run=replace(config.run, max_reject_ratio=0.5, warn_reject_ratio=0.2))
    summary = run(retuned, "r2")
    assert (summary["written"], summary["unchanged"]) == (0, len(rows))
