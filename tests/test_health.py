"""Catalog health on real photos with planted cases: re-uploads, captions swapped onto the wrong pictures,
a catalog half replaced by another kind of item; and the reports' JSON, pages and scalable path."""

from __future__ import annotations

import json
import re
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from demo.build_catalog import build as build_demo_catalog
from demo.photos import PACKAGE_FOLDERS
from pipelines.cli import main
from pipelines.health.duplicates import connected_components
from pipelines.search.neighbours import neighbour_blocks
from tests.conftest import (
    DEMO_CATALOG,
    MULTIMODAL_ENCODERS,
    REUPLOADS,
    demo_rows,
    make_config,
    run,
    with_reuploads,
    write_demo_rows,
)
from tests.test_contact_sheet import render_in_chromium
from transforms.config import Config
from transforms.vector_columns import VectorColumn

SWAPPED = (("chelsea", "rocket"), ("coffee", "moon"))     # their captions trade places on the second night


def _swap_captions(rows: list[dict]) -> list[dict]:
    by_id = {row["id"]: row for row in rows}
    for first, second in SWAPPED:
        a, b = by_id[first], by_id[second]
        a["title"], b["title"] = b["title"], a["title"]
        a["description"], b["description"] = b["description"], a["description"]
    return rows


def _half_replaced_by_faces(manifest: Path, rows: list[dict]) -> list[dict]:
    """Every other item becomes a face photo (scikit-image's LFW subset) captioned as one."""
    faces = np.load(PACKAGE_FOLDERS["skimage"] / "lfw_subset.npy")
    for k, row in enumerate(rows[::2]):
        path = manifest.parent / "images" / f"face-{k}.png"
        Image.fromarray((faces[k] * 255).astype(np.uint8)).resize((200, 200), Image.BICUBIC).save(path)
        row.update(id=f"face-{k}", title="Portrait", description="A face photographed from the front",
                   category="people", image=f"images/face-{k}.png")
    return rows


@pytest.fixture(scope="module")
def nights(tmp_path_factory) -> tuple[Config, list[dict]]:
    """Three nights of one table: (1) the demo photos and re-uploads of four of them; (2) two pairs of
    captions swapped; (3) half the items replaced by face photos. The config and the three runs."""
    root = tmp_path_factory.mktemp("health")
    manifest = build_demo_catalog(root / "catalog")
    # Night 3 deletes half the catalog: more than the default output.max_delete_ratio allows.
    config = make_config(root, dict(DEMO_CATALOG, path=str(manifest)), MULTIMODAL_ENCODERS, table="demo",
                         output={"max_delete_ratio": 1.0})
    rows = with_reuploads(manifest)
    write_demo_rows(manifest, rows)
    runs = [run(config, "night-1")]
    write_demo_rows(manifest, _swap_captions(rows))
    runs.append(run(config, "night-2"))
    write_demo_rows(manifest, _half_replaced_by_faces(manifest, rows))
    runs.append(run(config, "night-3"))
    return config, runs


def _faces(config: Config) -> int:
    """How many items night 3 replaced by faces."""
    return sum(row["id"].startswith("face-") for row in demo_rows(Path(config.catalog.path)))


def _json(capsys, *argv: str):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def _table(config: Config) -> list[str]:
    return ["--uri", config.output.uri, "--table", config.output.table]


def test_reuploads_are_grouped_with_their_photo_and_different_photos_never_merged(nights, capsys):
    config, runs = nights
    groups = _json(capsys, "duplicates", *_table(config), "--version", str(runs[0]["table_version"]), "--json")
    assert sorted(tuple(g["ids"]) for g in groups) == sorted((item, f"{item}-2") for item in REUPLOADS)
    assert [g["score"] for g in groups] == sorted((g["score"] for g in groups), reverse=True)   # best first
    assert all(0.75 <= g["score"] <= 1 for g in groups) and set(groups[0]) == {"ids", "score"}


def test_pairs_linked_through_a_shared_item_form_one_group():
    first, second = np.array([0, 1, 7]), np.array([1, 2, 8])      # 0-1-2 linked through 1; 7-8 apart
    assert [list(c) for c in connected_components(first, second)] == [[0, 1, 2], [7, 8]]


def test_captions_swapped_onto_the_wrong_pictures_top_the_outliers(nights, capsys):
    config, runs = nights
    swapped = {item for pair in SWAPPED for item in pair}
    found = _json(capsys, "outliers", *_table(config), "--version", str(runs[1]["table_version"]), "-k", "4", "--json")
    assert {item["id"] for item in found} == swapped
    assert [item["score"] for item in found] == sorted((item["score"] for item in found), reverse=True)
    v1 = str(runs[0]["table_version"])
    before = _json(capsys, "outliers", *_table(config), "--version", v1, "-k", "30", "--json")
    right = {item["id"]: item["score"] for item in before}               # the same pictures with their own captions
    assert all(item["score"] > right[item["id"]] for item in found), (found, right)


def test_half_the_catalog_replaced_drifts_far_more_than_swapped_captions(nights, capsys):
    config, runs = nights
    v1, v2, v3 = (str(r["table_version"]) for r in runs)
    small = _json(capsys, "drift", *_table(config), "--from", v1, "--to", v2, "--json")
    large = _json(capsys, "drift", *_table(config), "--from", v2, "--to", v3, "--json")
    assert (small["from"], small["to"]) == (int(v1), int(v2))
    assert small["added"] == small["removed"] == 0 and large["added"] == large["removed"] == _faces(config)
    assert small["columns"]["image"]["score"] < 1e-5 and small["columns"]["text"]["moved"] == 4
    assert {m["id"] for m in small["columns"]["text"]["most_moved"]} == {i for pair in SWAPPED for i in pair}
    for column in ("text", "image", "conse", "vector"):
        assert large["columns"][column]["score"] > 10 * small["columns"][column]["score"], column
    assert large["columns"]["vector"]["score"] > 0.05 > small["columns"]["vector"]["score"]  # run.warn_drift
    recorded = [r["drift"] for r in runs]
    assert recorded[0] == {} and recorded[1]["vector"] == small["columns"]["vector"]["score"]
    assert recorded[2]["vector"] == large["columns"]["vector"]["score"]


def test_a_run_that_drifts_over_the_warning_level_commits_and_exits_3(nights, tmp_path, capsys):
    config, _ = nights
    manifest = Path(config.catalog.path).with_name("night-4.csv")     # beside the images it names
    write_demo_rows(manifest, demo_rows(Path(config.catalog.path)))
    job = tmp_path / "job.yaml"
    job.write_text(f"catalog: {{format: manifest, path: {manifest}}}\nencoders: {{color: {{kind: color}}}}\n"
                   f"output: {{uri: {tmp_path / 'db'}, table: t, max_delete_ratio: 1}}\n")
    assert main(["run", "--config", str(job)]) == 0
    faces = [row for row in demo_rows(manifest) if row["id"].startswith("face-")]
    write_demo_rows(manifest, faces)      # only the faces are left
    assert main(["run", "--config", str(job), "--json"]) == 3
    out, err = capsys.readouterr()
    record = json.loads(out.strip().splitlines()[-1])
    assert record["status"] == "committed" and record["drift"]["color"] > 0.05
    assert "over run.warn_drift 0.05" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("command", ["duplicates", "outliers", "drift"])
def test_report_pages_render_with_their_pictures(nights, command, tmp_path, capsys):
    config, runs = nights
    v1, v2 = (str(r["table_version"]) for r in runs[:2])
    options = {"duplicates": ["--version", v1], "outliers": ["--version", v2, "-k", "4"], "drift": ["--from", v2]}
    page = tmp_path / f"{command}.html"
    assert main([command, *_table(config), *options[command], "--html", str(page)]) == 0
    assert f"contact sheet: {page}" in capsys.readouterr().out
    html = page.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)=["'](?!data:)""", html), "the page must not fetch anything"
    dom = render_in_chromium(page)
    sizes = re.search(r"<title>loaded:([^<]*)</title>", dom).group(1).split(",")
    assert sizes and all(re.fullmatch(r"\d+x\d+", size) and size != "0x0" for size in sizes), sizes
    expected = {"duplicates": "group 1: 2 items", "outliers": "Rocket launch",
                "drift": f"added (10 of {_faces(config)})"}[command]
    assert expected in dom


def _planted_table(path: Path, clusters: int = 60, per_cluster: int = 50, dim: int = 32) -> tuple[str, set]:
    """Clustered unit vectors with near-duplicate pairs planted in some clusters; the uri and the pairs."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(clusters, dim))
    vectors = centres.repeat(per_cluster, axis=0) + 0.6 * rng.normal(size=(clusters * per_cluster, dim))
    planted = set()
    for k in range(0, len(vectors), 97):
        vectors[k + 1] = vectors[k] + 0.02 * rng.normal(size=dim)
        planted.add((k, k + 1))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    flat = pa.array(vectors.astype(np.float32).ravel())
    data = pa.table({"id": [f"{i:05d}" for i in range(len(vectors))],
                     "vector": pa.FixedSizeListArray.from_arrays(flat, dim)})
    lance.write_dataset(data, path, max_rows_per_file=700)
    return str(path), planted


def test_partitioned_search_finds_the_pairs_that_exact_search_finds(tmp_path):
    uri, planted = _planted_table(tmp_path / "planted.lance")
    column = VectorColumn(lance.dataset(uri), "vector")

    def pairs(**limits) -> set:
        found = set()
        for block in neighbour_blocks(column, **limits):
            rows, columns = np.nonzero((block.similarity >= 0.98) & (block.queries[:, None] < block.candidates))
            found |= set(zip(block.queries[rows].tolist(), block.candidates[columns].tolist(), strict=True))
        return found

    exact = pairs()
    assert planted <= exact
    assert pairs(exact_max_rows=100) == exact                            # 55 partitions, 3 probed per item
