"""Text and images in one space (ConSE), and query-time weights through the combined vector."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.cli import main
from pipelines.search.query import item_queries, open_table, search, text_queries
from transforms.encoders.conse import class_sentences

TEXT_TO_PHOTO = {"a cat": "chelsea", "a cup of coffee": "coffee", "a rocket": "rocket", "a motorcycle": "motorcycle",
                 "a flower": "flower", "a temple": "china", "a horse": "horse", "coins": "coins"}


@pytest.fixture(scope="module")
def table(multimodal_demo):
    return multimodal_demo, open_table(multimodal_demo.output.uri, "demo")


def test_conse_text_queries_find_the_photo_they_describe(table):
    _, opened = table
    hits, top3 = 0, 0
    for text, photo_id in TEXT_TO_PHOTO.items():
        ranked = [r["id"] for r in search(opened, text_queries(opened, text), 3, weights={"conse": 1.0})]
        hits += ranked[0] == photo_id
        top3 += photo_id in ranked
    assert hits >= 6 and top3 == len(TEXT_TO_PHOTO), (hits, top3)


@pytest.mark.parametrize("text", ["a pony", "a stallion"])
def test_words_imagenet_lacks_find_the_photo_through_class_definitions(table, text):
    """ImageNet knows the horse silhouette as "sorrel"; its WordNet definition says "a horse"."""
    _, opened = table
    ranked = [r["id"] for r in search(opened, text_queries(opened, text), 1, weights={"conse": 1.0})]
    assert ranked == ["horse"]


def test_class_sentences_hold_each_lemma_through_each_template_and_the_definition():
    settings = {"class_names": "all", "class_definitions": True, "class_templates": ["a photo of a {}.", "{}"]}
    sentences, owners = class_sentences(settings)
    assert [s for s, owner in zip(sentences, owners, strict=True) if owner == 0] == [
        "a photo of a tench.", "tench", "a photo of a Tinca tinca.", "Tinca tinca",
        "tench, Tinca tinca: freshwater dace-like game fish of Europe and western Asia noted for ability to survive "
        "outside water"]
    first_only = class_sentences({**settings, "class_names": "first", "class_definitions": False})
    assert first_only[0][:2] == ["a photo of a tench.", "tench"] and len(set(first_only[1])) == 1000


@pytest.mark.parametrize("encoder", ["text", "image", "color", "conse"])
def test_single_encoder_weights_rank_like_that_column(table, encoder):
    _, opened = table
    rows = opened.handle.to_arrow().to_pylist()
    stored = {r["id"]: np.asarray(r[f"{encoder}_vec"]) for r in rows}
    query = item_queries(opened, "chelsea")
    results = search(opened, query, len(rows), weights={encoder: 1.0})
    direct = sorted(stored, key=lambda i: -float(stored[i] @ stored["chelsea"]))
    assert [r["id"] for r in results][:5] == direct[:5]
    for result in results:
        assert result["score"] == pytest.approx(float(stored[result["id"]] @ stored["chelsea"]), abs=1e-4)


def test_mixed_weights_score_the_weighted_sum_of_cosines(table):
    _, opened = table
    rows = {r["id"]: r for r in opened.handle.to_arrow().to_pylist()}
    weights = {"text": 0.1, "image": 0.6, "color": 0.3}
    results = search(opened, item_queries(opened, "coffee"), 5, weights=weights)
    for result in results:
        expected = sum(w * float(np.asarray(rows[result["id"]][f"{n}_vec"]) @ np.asarray(rows["coffee"][f"{n}_vec"]))
                       for n, w in weights.items())
        assert result["score"] == pytest.approx(expected, abs=1e-4)


def test_cli_text_query_with_weights_and_where(table, capsys):
    config, _ = table
    args = ["query", "--uri", config.output.uri, "--table", "demo", "--json", "-k", "3"]
    assert main([*args, "--text", "a cat", "--weights", "conse=1"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["id"] == "chelsea"
    assert main([*args, "--like", "chelsea", "--where", "category = 'food'"]) == 0
    assert {r["category"] for r in json.loads(capsys.readouterr().out)} == {"food"}
    assert main([*args, "--like", "chelsea", "--weights", "nosuch=1"]) == 2
    assert "the table's encoders are text, image, color, conse" in capsys.readouterr().err
