"""Budgeted runs: a new encoder's column fills over several runs at `--max-encode`, each run a queryable version,
the other encoders' vectors kept as they were; a first run over budget defers what it cannot embed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines.cli import main
from tests.conftest import ALL_ENCODERS, PHOTOS, captioned_catalog, make_config, photo, read_table, run
from transforms.budget import order_key
from transforms.combine import combine
from transforms.config import ConfigError, load_config

ITEMS, BUDGET, CROP = 2000, 500, 48


def _catalog(folder: Path) -> Path:
    """2,000 items: each a distinct crop of a real photo, a title, and an `added` number (the backfill order)."""
    photos = [Image.open(photo(name)).convert("RGB") for name in PHOTOS]
    lines = ["id,title,image,added"]
    (folder / "images").mkdir(parents=True)
    for i in range(ITEMS):
        source = photos[i % len(photos)]
        step = i // len(photos)
        left, top = (step * 7) % (source.width - CROP), (step * 13) % (source.height - CROP)
        crop = source.crop((left, top, left + CROP, top + CROP))
        crop.putpixel((0, 0), (i % 256, i // 256, 0))     # no two alike, even in a flat patch of sky
        crop.save(folder / "images" / f"{i}.png")
        title = f"{PHOTOS[i % len(PHOTOS)].split('.')[0]} detail {step}"
        lines.append(f"p{i:04d},{title},images/{i}.png,{(i * 37) % ITEMS}")
    (folder / "catalog.csv").write_text("\n".join(lines) + "\n")
    return folder / "catalog.csv"


def _write_config(path: Path, catalog: Path, encoders: dict) -> Path:
    raw = {"catalog": {"format": "manifest", "path": str(catalog), "text_fields": ["title"], "fields": ["added"]},
           "encoders": encoders, "output": {"uri": str(path.parent / "db"), "table": "shop", "write_batch_rows": 256},
           "run": {"backfill_order": "-added"}}
    path.write_text(yaml.safe_dump(raw))
    return path


def _cli_json(capsys, *args: str) -> dict | list:
    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _filled(table) -> set[str]:
    return {row["id"] for row in table.select(["id", "clip_fp"]).to_pylist() if row["clip_fp"]}


def test_a_new_encoder_fills_its_column_over_budgeted_runs(tmp_path, tiny_clip, capsys):
    catalog = _catalog(tmp_path / "catalog")
    config = _write_config(tmp_path / "job.yaml", catalog, ALL_ENCODERS)
    assert main(["run", "--config", str(config)]) == 0
    before = read_table(_load(config))
    clip = {"kind": "open-clip", "model": tiny_clip[0], "batch_size": 64, "weight": 0.5}
    _write_config(config, catalog, {**ALL_ENCODERS, "clip": clip})

    plan = _cli_json(capsys, "run", "--config", str(config), "--max-encode", str(BUDGET), "--dry-run")
    assert plan["encode"] == {"clip": BUDGET}
    assert plan["backfill"] == {"encoders": {"clip": {"done": BUDGET, "of": ITEMS}}, "runs_left": 3}

    by_added = sorted(before.to_pylist(), key=lambda row: -int(row["added"]))
    for night in range(1, 5):
        summary = _cli_json(capsys, "run", "--config", str(config), "--max-encode", str(BUDGET))
        assert summary["status"] == "committed"
        assert summary["encoded"] == {"text": 0, "image": 0, "color": 0, "clip": BUDGET}
        assert summary["backfill"] == {"encoders": {"clip": {"done": night * BUDGET, "of": ITEMS}},
                                       "runs_left": 4 - night}
        assert summary["read"] == (summary["written"] + summary["unchanged"] + summary["rejected"]
                                   + summary["deferred"]) == ITEMS
        table = read_table(_load(config))
        filled = _filled(table)
        # Largest `added` first: each night fills the next 500 of that order.
        assert filled == {row["id"] for row in by_added[:night * BUDGET]}
        results = _cli_json(capsys, "query", "--uri", str(tmp_path / "db"), "--table", "shop", "--text", "a cat",
                            "--weights", "clip=1", "-k", "5")
        assert len(results) == 5 and {r["id"] for r in results} <= filled
    assert "clip 100%" in _versions(capsys, tmp_path)
    fifth = _cli_json(capsys, "run", "--config", str(config), "--max-encode", str(BUDGET))
    assert fifth["encoded"] == {"text": 0, "image": 0, "color": 0, "clip": 0}
    assert fifth["unchanged"] == ITEMS and fifth["backfill"] == {}

    filled_table = read_table(_load(config))
    for name in ("text", "image", "color"):     # never recomputed: the stored bits, unchanged
        assert filled_table[f"{name}_vec"].equals(before[f"{name}_vec"])
    one_run = _write_config(tmp_path / "one-run.yaml", catalog, {"clip": clip})
    one_run_config = _load(one_run)
    one_run_config = type(one_run_config)(one_run_config.catalog, one_run_config.encoders,
                                          type(one_run_config.output)(**{**one_run_config.output.__dict__,
                                                                         "table": "one_run"}))
    run(one_run_config, "once")
    expected = np.stack(read_table(one_run_config, "one_run")["clip_vec"].to_numpy(zero_copy_only=False))
    stored = np.stack(filled_table["clip_vec"].to_numpy(zero_copy_only=False))
    assert np.min(np.sum(expected * stored, axis=1)) >= 0.9999
    weights = _load(config).normalised_weights()
    dims = {"text": 384, "image": 1280, "color": before["color_vec"].type.list_size, "clip": 32}
    for row in filled_table.to_pylist()[:50]:
        vectors = {name: np.asarray(row[f"{name}_vec"], np.float32) for name in weights}
        np.testing.assert_allclose(row["vector"], combine(vectors, weights, list(weights), dims), atol=1e-6)


def _load(path: Path):
    return load_config(str(path))


def _versions(capsys, root: Path) -> str:
    capsys.readouterr()
    assert main(["versions", "--uri", str(root / "db"), "--table", "shop"]) == 0
    return capsys.readouterr().out


def test_a_first_run_over_budget_defers_what_it_cannot_embed(tmp_path):
    folder, rows = captioned_catalog(tmp_path)
    config = make_config(tmp_path, {"format": "manifest", "path": str(folder / "catalog.csv")}, run={"max_encode": 4})
    first = run(config, "r1")
    assert (first["read"], first["written"], first["deferred"], first["encoded"]) == (6, 4, 2, {"color": 4})
    assert first["backfill"] == {"encoders": {"color": {"done": 4, "of": 6}}, "runs_left": 1}
    assert len(read_table(config)) == 4
    second = run(config, "r2")
    assert (second["written"], second["unchanged"], second["deferred"], second["encoded"]) == (2, 4, 0, {"color": 2})
    assert sorted(read_table(config)["id"].to_pylist()) == sorted(row["id"] for row in rows)


@pytest.mark.parametrize(("settings", "message"), [
    ({"max_encode": {"nope": 5}}, "there is no encoder 'nope'"),
    ({"max_encode": -5}, "whole number"),
    ({"max_encode": 5, "backfill_order": "missing"}, "'missing' is not id or a field"),
])
def test_budget_settings_are_checked(tmp_path, settings, message):
    folder, _ = captioned_catalog(tmp_path)
    with pytest.raises(ConfigError, match=message):
        make_config(tmp_path, {"format": "manifest", "path": str(folder / "catalog.csv")}, run=settings)


@pytest.mark.parametrize("descending", [False, True])
def test_the_backfill_order_compares_numbers_as_numbers_and_puts_missing_values_last(descending):
    values = ["9", "10", "2.5", "apple", "apples", "banana", None, "-3", "app"]
    items = [{"id": f"item-{n}", "fields": {"added": value}} for n, value in enumerate(values)]
    ordered = [item["fields"]["added"] for item in sorted(items, key=lambda it: order_key(it, "added", descending))]
    numbers = sorted((v for v in values if v and v[-1].isdigit()), key=float, reverse=descending)
    texts = sorted((v for v in values if v and not v[-1].isdigit()), reverse=descending)
    assert ordered == numbers + texts + [None]
