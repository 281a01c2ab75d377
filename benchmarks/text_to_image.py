"""Choosing ConSE's class texts, `top_t` and temperature on the development set, by measurement.

The development set: the photographs of demo/captions.csv that demo/queries.csv asks for (photos shipped
in scikit-image, scikit-learn, matplotlib and imgaug), each with a label and three paraphrased queries
written before any result was seen. For every setting it measures, with the functions `evaluate` uses:
- text-to-image recall@1 and @5: each query's words against all the photos' ConSE vectors;
- zero-shot top-1: each photo's most probable label among the set's labels (their words through the
  zero-shot templates).
Each class-text variant is loaded once; the CNN runs once per variant (its logits are memoised), and the
`top_t` and temperature grid reuses them. The setting chosen is the best by the sum of recall@1 and
zero-shot top-1 (both must improve), then recall@5; then the fewest sentences per class and the
smallest `top_t`.

    python -m benchmarks.text_to_image --out out/bench.json
"""

from __future__ import annotations

import argparse
import csv
import itertools
from pathlib import Path

import numpy as np

from benchmarks.results import save_section
from demo.photos import photo_path
from pipelines.report import print_results
from pipelines.search.evaluate import image_ranks, top1_accuracy
from pipelines.search.query import load_query_image
from pipelines.search.zero_shot import DEFAULT_TEMPLATES, label_vectors
from transforms.config import EncoderConfig
from transforms.encoders.conse import CONSE_DEFAULTS, ConseEncoder, class_sentences

DEMO = Path(__file__).resolve().parent.parent / "demo"
# CLIP's seven ImageNet prompts, the ensemble its authors selected (Radford et al., 2021, notebook).
CLIP_SEVEN = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
              "a {} in a video game.", "art of the {}.", "a photo of the small {}."]
TEMPLATE_SETS = {"plain": ["{}"], "photo x4": list(DEFAULT_TEMPLATES), "clip x7": CLIP_SEVEN}
TOP_T = (1, 3, 5, 10, 20, 50, 100)
TEMPERATURES = (0.5, 1.0, 2.0, 4.0)
BASELINE = {"class_names": "first", "class_definitions": False, "class_templates": ["{}"], "top_t": 10,
            "temperature": 1.0}   # the encoder before the richer class texts


def development_set() -> tuple[list[str], list[str], list[Path], list[tuple[str, str]]]:
    """Ids, labels and photo paths of the photos the queries ask for, and the (query, id) pairs."""
    with (DEMO / "queries.csv").open(newline="", encoding="utf-8") as handle:
        queries = [(row["query"], row["id"]) for row in csv.DictReader(handle)]
    asked = {item for _, item in queries}
    with (DEMO / "captions.csv").open(newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if row["id"] in asked]
    return ([row["id"] for row in rows], [row["label"] for row in rows],
            [photo_path(row["source"], row["file"]) for row in rows], queries)


def conse(settings: dict) -> ConseEncoder:
    return ConseEncoder(EncoderConfig(name="conse", kind="conse", options=settings))


def class_text_variants() -> list[tuple[str, dict]]:
    return [(f"{names} names{' + definition' if definitions else ''}, {templates}",
             {"class_names": names, "class_definitions": definitions, "class_templates": TEMPLATE_SETS[templates]})
            for names, definitions, templates in itertools.product(("first", "all"), (False, True), TEMPLATE_SETS)]


def measure_variant(texts: dict, photos: list, labels: np.ndarray, queries: list[tuple[str, str]],
                    ids: list[str]) -> list[dict]:
    encoder = conse(texts)
    model = encoder.load()
    images = [load_query_image(str(path), encoder.decode_side) for path in photos]
    prepared, memo = encoder.prepare(model, images), {}
    query_vectors = encoder.text_queries([text for text, _ in queries])
    expected = np.array([ids.index(item) for _, item in queries])
    names = sorted(set(labels))
    label_matrix = label_vectors(encoder, names, DEFAULT_TEMPLATES)
    rows = []
    for top_t, temperature in itertools.product(TOP_T, TEMPERATURES):
        vectors = conse({**texts, "top_t": top_t, "temperature": temperature}).embed(model, prepared, memo)
        ranks = image_ranks(query_vectors, vectors, expected)
        rows.append({"top_t": top_t, "temperature": temperature, "recall@1": round(float(np.mean(ranks < 1)), 3),
                     "recall@5": round(float(np.mean(ranks < 5)), 3),
                     "zero_shot_top1": round(top1_accuracy(vectors, label_matrix, names, labels), 3)})
    return rows


def choice_order(row: dict) -> tuple:
    return row["recall@1"] + row["zero_shot_top1"], row["recall@5"], -row["sentences"], -row["top_t"]


def main() -> None:
    parser = argparse.ArgumentParser(description="choose ConSE's class texts, top_t and temperature on the "
                                                 "development set (demo/queries.csv)")
    parser.add_argument("--out", default="out/bench.json", help="the JSON results file (section 'text_to_image')")
    args = parser.parse_args()
    ids, labels, photos, queries = development_set()
    labels = np.asarray(labels, dtype=object)
    grid = []
    for name, texts in class_text_variants():
        sentences = len(class_sentences(texts)[0])
        grid += [{"class_texts": name, **texts, "sentences": sentences, **row}
                 for row in measure_variant(texts, photos, labels, queries, ids)]
        print(f"measured {name}", flush=True)
    best = max(grid, key=choice_order)
    baseline = next(r for r in grid if all(r[k] == v for k, v in BASELINE.items()))
    best_per_texts = [max((r for r in grid if r["class_texts"] == name), key=choice_order)
                      for name, _ in class_text_variants()]
    shown = ("class_texts", "top_t", "temperature", "recall@1", "recall@5", "zero_shot_top1")
    print_results([{k: r[k] for k in shown} for r in best_per_texts])
    print_results([{"setting": label, **{k: r[k] for k in shown}} for label, r in (("before", baseline),
                                                                                    ("chosen", best))])
    save_section(args.out, "text_to_image", {
        "photos": len(ids), "queries": len(queries), "labels": len(set(labels)), "defaults": CONSE_DEFAULTS,
        "baseline": baseline, "chosen": best, "best_per_class_texts": best_per_texts, "grid": grid})
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
