"""Each catalog layout, built as the real data set lays it out, is read completely and exactly once."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import PHOTOS, copy_photo, digikala_layout, food101_layout, make_config, read_table, run

MANIFEST_ROWS = [
    {"sku": f"sku-{i}", "title": f"Product {i}", "price": str(10 + i), "picture": f"img/{name}"}
    for i, name in enumerate(PHOTOS)
]


def _write_manifest(folder, fmt: str):
    for row in MANIFEST_ROWS:
        copy_photo(row["picture"].split("/")[-1], folder / row["picture"])
    path = folder / f"catalog.{fmt}"
    if fmt == "csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(MANIFEST_ROWS[0]))
            writer.writeheader()
            writer.writerows(MANIFEST_ROWS)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in MANIFEST_ROWS))
    else:
        pq.write_table(pa.Table.from_pylist(MANIFEST_ROWS), path, row_group_size=3)
    return path


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_manifest_formats_read_every_row_once(tmp_path, fmt):
    path = _write_manifest(tmp_path / "catalog", fmt)
    config = make_config(tmp_path, {"format": "manifest", "path": str(path), "id_field": "sku",
                                    "image_field": "picture", "text_fields": ["title"], "fields": ["price"]})
    summary = run(config)
    table = read_table(config)
    assert sorted(table["id"].to_pylist()) == sorted(r["sku"] for r in MANIFEST_ROWS)
    assert summary["read"] == summary["written"] == len(MANIFEST_ROWS)
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert by_id["sku-2"]["price"] == "12" and by_id["sku-2"]["title"] == "Product 2"
    assert by_id["sku-2"]["image_uri"] == str(tmp_path / "catalog" / "img" / PHOTOS[2])


def test_food101_layout(tmp_path):
    catalog, train, test = food101_layout(tmp_path / "food-101")
    config = make_config(tmp_path, catalog)
    run(config)
    rows = {r["id"]: r for r in read_table(config).to_pylist()}
    assert sorted(rows) == sorted(train + test)
    assert rows["apple_pie/1000"]["label"] == "apple_pie"
    assert rows["apple_pie/1000"]["name"] == "Apple pie"
    assert rows["baby_back_ribs/2001"]["split"] == "test"


def test_fashion_layout_keeps_commas_in_product_names(tmp_path):
    root = tmp_path / "fashion"
    header = ("id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,"
              "productDisplayName")
    lines = [
        "15970,Men,Apparel,Topwear,Shirts,Navy Blue,Fall,2011,Casual,Turtle Check Men Navy Blue Shirt",
        # The real styles.csv has unquoted commas inside productDisplayName: data, not a crash.
        "39386,Men,Apparel,Bottomwear,Jeans,Blue,Summer,2012,Casual,Peter England Men Party Blue Jeans, Slim, Fit",
        "59263,Women,Accessories,Watches,Watches,Silver,Winter,2016,Casual,Titan Women Silver Watch",
    ]
    (root / "images").mkdir(parents=True)
    (root / "styles.csv").write_text(header + "\n" + "\n".join(lines) + "\n")
    for line, name in zip(lines, PHOTOS, strict=False):
        copy_photo(name, root / "images" / f"{line.split(',')[0]}.jpg")
    config = make_config(tmp_path, {"format": "fashion", "path": str(root), "label_field": "articleType",
                                    "text_fields": ["productDisplayName"], "fields": ["baseColour"]})
    run(config)
    rows = {r["id"]: r for r in read_table(config).to_pylist()}
    assert sorted(rows) == ["15970", "39386", "59263"]
    assert rows["39386"]["productDisplayName"] == "Peter England Men Party Blue Jeans, Slim, Fit"
    assert rows["59263"]["label"] == "Watches" and rows["59263"]["baseColour"] == "Silver"


def test_digikala_color_folders(tmp_path):
    catalog, expected = digikala_layout(tmp_path / "digikala")
    config = make_config(tmp_path, catalog)
    run(config)
    rows = {r["id"]: r for r in read_table(config).to_pylist()}
    assert sorted(rows) == sorted(expected)
    assert rows["blue/product_1"]["label"] == "blue"


NESTED_ROWS = [
    {"sku": "jacket", "name": "Trail jacket", "attributes": {"material": "GORE-TEX", "color": "red"},
     "tags": ["waterproof", "hiking"], "gallery": [{"src": f"img/{PHOTOS[0]}"}, {"src": f"img/{PHOTOS[1]}"}],
     "variants": [{"size": "S"}, {"size": "M"}]},
    {"sku": "mug", "name": "Coffee mug", "attributes": {"material": None, "color": "white"}, "tags": [],
     "gallery": [{"src": f"img/{PHOTOS[2]}"}], "variants": []},
]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_nested_fields_and_lists_are_read_by_path(tmp_path, fmt):
    for name in PHOTOS[:3]:
        copy_photo(name, tmp_path / "catalog" / "img" / name)
    path = tmp_path / "catalog" / f"catalog.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in NESTED_ROWS))
    else:
        pq.write_table(pa.Table.from_pylist(NESTED_ROWS), path)
    config = make_config(tmp_path, {"format": "manifest", "path": str(path), "id_field": "sku",
                                    "image_field": "gallery.src",
                                    "text_fields": ["name", "attributes.material", "tags"],
                                    "fields": ["attributes.color", "variants.size"]})
    summary = run(config)
    rows = {r["id"]: r for r in read_table(config).to_pylist()}
    assert summary["read"] == summary["written"] == 2
    assert rows["jacket"]["embedded_text"] == "Trail jacket. GORE-TEX. waterproof. hiking"
    assert rows["mug"]["embedded_text"] == "Coffee mug"
    assert rows["jacket"]["attributes_material"] == "GORE-TEX" and rows["jacket"]["attributes_color"] == "red"
    assert rows["jacket"]["variants_size"] == "S, M" and rows["mug"]["variants_size"] is None
    assert rows["jacket"]["image_uri"] == str(tmp_path / "catalog" / "img" / PHOTOS[0])    # the gallery's first
    assert rows["jacket"]["color_vec"] is not None
