"""Only what defines a vector decides a rewrite: a moved catalog file, another working directory and another
scheduler CPU (`precision: auto`) write no row; the table's metadata holds none of them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lance
import pyarrow as pa
import pytest

import transforms.encoders.base as encoder_base
from tests.conftest import captioned_catalog, make_config, run, write_catalog
from transforms.fingerprint import content_digest, fingerprint
from transforms.lance_sink import METADATA_KEY, dataset_uri, table_metadata

ENCODERS = {"text": {"kind": "sentence-transformers", "weight": 0.7}, "color": {"kind": "color", "weight": 0.3}}


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """A catalog whose images are named by absolute path (as exports on a shared disk are), and its first run."""
    root = tmp_path_factory.mktemp("moves")
    folder, rows = captioned_catalog(root)
    manifest = write_catalog(folder, [dict(row, image=str(folder / row["image"])) for row in rows])
    config = make_config(root, {"format": "manifest", "path": str(manifest), "text_fields": ["caption"]}, ENCODERS)
    return root, config, run(config, "first")


def version(config) -> int:
    return lance.dataset(dataset_uri(config.output.uri, config.output.table)).version


def assert_nothing_written(summary: dict, config, before: int) -> None:
    assert (summary["status"], summary["written"], summary["unchanged"]) == ("unchanged", 0, 6)
    assert version(config) == before


def test_the_metadata_names_no_path_and_no_resolved_precision(shop):
    root, config, first = shop
    assert first["written"] == 6
    metadata = json.dumps(table_metadata(lance.dataset(dataset_uri(config.output.uri, config.output.table)).schema))
    assert str(root) not in metadata and "config_hash" not in metadata
    assert {e["config"]["precision"] for e in json.loads(metadata)["encoders"]} == {"auto"}


def test_a_moved_catalog_file_writes_no_row(shop):
    root, config, _ = shop
    before = version(config)
    dated = root / "exports" / "2026-12-08"
    dated.mkdir(parents=True)
    moved = Path(shutil.move(config.catalog.path, dated / "renamed.csv"))
    try:
        summary = run(make_config(root, {"format": "manifest", "path": str(moved), "text_fields": ["caption"]},
                                  ENCODERS), "moved")
    finally:
        shutil.move(moved, config.catalog.path)
    assert_nothing_written(summary, config, before)


def test_another_working_directory_writes_no_row(shop, tmp_path, monkeypatch):
    root, config, _ = shop
    before = version(config)
    (tmp_path / "catalog").mkdir()
    shutil.copy2(config.catalog.path, tmp_path / "catalog" / "catalog.csv")
    monkeypatch.chdir(tmp_path)     # the scheduler starts the job elsewhere, with the config's relative path
    relative = make_config(root, {"format": "manifest", "path": "catalog/catalog.csv", "text_fields": ["caption"]},
                           ENCODERS)
    assert_nothing_written(run(relative, "elsewhere"), config, before)


@pytest.mark.parametrize("bf16", [True, False])
def test_a_scheduler_on_another_cpu_writes_no_row(shop, monkeypatch, bf16):
    """`precision: auto` is bf16 on a CPU with bf16 arithmetic and fp32 elsewhere: both keep the vectors."""
    _, config, _ = shop
    before = version(config)
    monkeypatch.setattr(encoder_base, "cpu_runs_bf16", lambda: bf16)
    assert_nothing_written(run(config, f"cpu-bf16-{bf16}"), config, before)


def test_a_table_an_earlier_build_wrote_keeps_its_vectors(tmp_path):
    """Earlier builds stored what `precision: auto` resolved to in each encoder id (and so in every fingerprint)
    and a config hash in the metadata: their tables are written once from the stored vectors, not encoded again."""
    folder, rows = captioned_catalog(tmp_path)
    config = make_config(tmp_path, {"format": "manifest", "path": str(folder / "catalog.csv"),
                                    "text_fields": ["caption"]}, ENCODERS)
    run(config, "first")
    uri = dataset_uri(config.output.uri, config.output.table)
    table = lance.dataset(uri).to_table()
    meta = table_metadata(table.schema)
    for encoder in meta["encoders"]:
        encoder["id"] = encoder["id"].replace('"precision": "auto"', '"precision": "fp32"')
        encoder["config"]["precision"] = "fp32"
    meta["config_hash"] = "0123456789abcdef"
    earlier = {e["name"]: e["id"] for e in meta["encoders"]}
    digests = {"text": [content_digest(text.encode()) for text in table["embedded_text"].to_pylist()],
               "color": table["image_digest"].to_pylist()}
    for name, made in digests.items():
        index = table.schema.get_field_index(f"{name}_fp")
        table = table.set_column(index, f"{name}_fp", pa.array([fingerprint(earlier[name], d) for d in made]))
    old = table.schema.with_metadata({**table.schema.metadata, METADATA_KEY: json.dumps(meta).encode()})
    lance.write_dataset(table.cast(old), uri, mode="overwrite")
    upgraded = run(config, "upgraded")
    assert upgraded["encoded"] == {"text": 0, "color": 0} and upgraded["written"] == len(rows)
    assert upgraded["rewrote"] == "table"
    assert run(config, "after")["status"] == "unchanged"
