"""Catalog health reports: the duplicate threshold measured on real photos, and the reports' cost at 1M rows.

Separation: the photos shipped in scikit-image and scikit-learn (the demo's 22, plus the right view
of the stereo motorcycle pair) are embedded by the job with the demo's image encoders beside their
re-uploads (demo/reuploads.py: resized, recompressed, cropped, all three), the left and right halves
of eight of them, and 30 face photos of scikit-image's LFW subset. Per column: the lowest cosine of a
re-upload to its photo, the highest between different photos of other subjects, between the halves of
one photo, between the stereo pair and between two faces.

Scale: a synthetic table of 1,000,000 rows written as the job writes them (text 384-d, image 512-d,
conse 384-d and the combined vector; items in 1,000 kinds), with planted cases: 1,000 near-duplicate
pairs, 1,000 captions swapped, and a second version where 1% of the rows are replaced by a new kind.
Each report runs as `catalog-embed ... --json` in a fresh process: seconds, peak memory (VmHWM)
and what it found of the planted cases.

    python -m benchmarks.health --rows 1000000 --out out/bench.json
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import sys
import time
from contextlib import redirect_stdout
from datetime import datetime, timezone
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
from PIL import Image

from benchmarks.results import peak_rss_mib, run_benchmark
from demo.photos import PACKAGE_FOLDERS, photo_path
from demo.reuploads import VARIANTS, reupload
from pipelines.nightly import run_job
from transforms.config import parse_config
from transforms.lance_sink import dataset_uri, table_schema, vector_matrix

REPO = Path(__file__).resolve().parent.parent
IMAGE_ENCODERS = {"image": {"kind": "cnn", "weight": 0.3}, "color": {"kind": "color", "weight": 0.1},
                  "conse": {"kind": "conse", "top_t": 10, "weight": 0.2}}
HALVED = ("china", "coffee", "astronaut", "rocket", "chelsea", "flower", "brick", "grass")
FACES = 30
KINDS, PLANTED, WRITE_ROWS, SPREAD = 1000, 1000, 50_000, 0.8
SYNTHETIC = {"text": 384, "image": 512, "conse": 384}
WEIGHTS = {"text": 0.4, "image": 0.4, "conse": 0.2}


def _photo_items(root: Path) -> list[dict]:
    with (REPO / "demo" / "captions.csv").open(encoding="utf-8") as handle:
        sources = {row["id"]: photo_path(row["source"], row["file"]) for row in csv.DictReader(handle)}
    sources["motorcycle_right"] = PACKAGE_FOLDERS["skimage"] / "motorcycle_right.png"
    items = []
    for name, path in sources.items():
        items.append({"id": name, "image": str(path)})
        items += [{"id": f"{name}~{v}", "image": str(reupload(path, v, root / f"{name}-{v}.jpg"))} for v in VARIANTS]
    for name in HALVED:
        with Image.open(sources[name]) as image:
            width, height = image.size
            for side, box in (("L", (0, 0, width // 2, height)), ("R", (width - width // 2, 0, width, height))):
                image.convert("RGB").crop(box).save(root / f"{name}#{side}.png")
                items.append({"id": f"{name}#{side}", "image": str(root / f"{name}#{side}.png")})
    for k, face in enumerate(np.load(PACKAGE_FOLDERS["skimage"] / "lfw_subset.npy")[:FACES]):
        Image.fromarray((face * 255).astype(np.uint8)).resize((200, 200), Image.BICUBIC).save(root / f"face{k}.png")
        items.append({"id": f"face{k}", "image": str(root / f"face{k}.png")})
    return items


def separation(root: Path) -> list[dict]:
    """Per image column, cosines of re-uploads to their photo against those of different photos."""
    items = _photo_items(root)
    with (root / "catalog.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "image"])
        writer.writeheader()
        writer.writerows(items)
    config = parse_config({"catalog": {"format": "manifest", "path": str(root / "catalog.csv")},
                           "encoders": IMAGE_ENCODERS, "output": {"uri": str(root / "db"), "table": "photos"}})
    run_job(config, "separation", [])
    table = lance.dataset(dataset_uri(str(root / "db"), "photos")).to_table()
    ids = table["id"].to_pylist()
    at = {item: k for k, item in enumerate(ids)}
    originals = [i for i in ids if not any(mark in i for mark in "~#") and not i.startswith("face")]
    rows = []
    for column in [*IMAGE_ENCODERS, "vector"]:
        vectors = vector_matrix(table["vector" if column == "vector" else f"{column}_vec"])
        cos = vectors @ vectors.T

        def pairs(names, cos=cos):
            return [cos[at[a], at[b]] for a, b in itertools.combinations(names, 2)]

        different = [a for a in originals if a != "motorcycle_right"]
        rows.append({
            "column": column,
            **{f"reupload_{v}_min": round(float(min(cos[at[f"{o}~{v}"], at[o]] for o in originals)), 4)
               for v in VARIANTS},
            "different_subjects_max": round(float(max(pairs(different))), 4),
            "halves_max": round(float(max(cos[at[f"{n}#L"], at[f"{n}#R"]] for n in HALVED)), 4),
            "stereo_pair": round(float(cos[at["motorcycle"], at["motorcycle_right"]]), 4),
            "faces_max": round(float(max(pairs([f"face{k}" for k in range(FACES)]))), 4),
        })
    return rows


def _unit(rng: np.random.Generator, centres: np.ndarray, kinds: np.ndarray, noise: float) -> np.ndarray:
    vectors = centres[kinds] + noise * rng.standard_normal((len(kinds), centres.shape[1]), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _batch(schema: pa.Schema, start: int, kinds: np.ndarray, centres: dict, rng: np.random.Generator,
           prefix: str = "item") -> pa.RecordBatch:
    # Two items of a kind meet at a cosine of about 1 / (1 + SPREAD^2), as two photos of one kind do; a
    # caption and its picture (text and conse) likewise, from the kind's point in the text space.
    vectors = {"text": _unit(rng, centres["text"], kinds, SPREAD), "image": _unit(rng, centres["image"], kinds, SPREAD),
               "conse": _unit(rng, centres["text"], kinds, SPREAD)}
    ids = [f"{prefix}-{start + i:07d}" for i in range(len(kinds))]
    for k in range(0, len(kinds), len(kinds) // (PLANTED // 20) if prefix == "item" else len(kinds) + 1):
        vectors["image"][k + 1] = vectors["image"][k]                       # a re-upload: a near copy
        vectors["image"][k + 1] += 0.002 * rng.standard_normal(vectors["image"].shape[1], dtype=np.float32)
        vectors["text"][[k + 2, k + 3]] = vectors["text"][[k + 3, k + 2]]    # two captions swapped (different kinds)
    combined = np.concatenate([np.sqrt(WEIGHTS[n]) * vectors[n] for n in SYNTHETIC], axis=1)
    now = datetime.now(timezone.utc)
    columns = {"id": pa.array(ids)}
    for field in schema:
        if field.name.endswith("_vec") or field.name == "vector":
            data = combined if field.name == "vector" else vectors[field.name[:-4]]
            columns[field.name] = pa.FixedSizeListArray.from_arrays(pa.array(data.astype(np.float32).ravel()),
                                                                    field.type.list_size)
        elif field.name == "embedded_at":
            columns[field.name] = pa.array([now] * len(ids), field.type)
        elif field.name != "id":
            columns[field.name] = pa.nulls(len(ids), field.type)
    return pa.RecordBatch.from_pydict(columns, schema=schema)


def synthetic_table(db: Path, rows: int) -> dict:
    """Version 1 with `rows` items, version 2 with 1% of them replaced by items of a new kind."""
    described = [{"name": name, "kind": kind, "dim": SYNTHETIC[name], "weight": WEIGHTS[name], "id": name,
                  "config": {"kind": kind, "model": model, "weights_file": None, "pretrained": None,
                             "options": options}}
                 for name, kind, model, options in (("text", "sentence-transformers", "all-MiniLM-L6-v2", {}),
                                                    ("image", "cnn", "resnet18", {}),
                                                    ("conse", "conse", None, {"text_model": "all-MiniLM-L6-v2"}))]
    schema = table_schema([], described, {"encoders": described, "order": list(SYNTHETIC), "config_hash": "synthetic"})
    rng = np.random.default_rng(0)
    centres = {name: rng.standard_normal((KINDS + 1, dim), dtype=np.float32) for name, dim in SYNTHETIC.items()}
    kinds = rng.integers(0, KINDS, rows)
    uri = dataset_uri(str(db), "synthetic")

    def batches():
        for start in range(0, rows, WRITE_ROWS):
            yield _batch(schema, start, kinds[start:start + WRITE_ROWS], centres, rng)

    lance.write_dataset(pa.RecordBatchReader.from_batches(schema, batches()), uri, schema=schema,
                        max_rows_per_file=1_000_000)
    replaced = rows // 100
    dataset = lance.dataset(uri)
    dataset.delete(f"id < 'item-{replaced:07d}'")
    dataset.insert(pa.Table.from_batches([_batch(schema, 0, np.full(replaced, KINDS), centres, rng, "new")]))
    per_batch = PLANTED // 20
    return {"rows": rows, "replaced": replaced, "planted_per_batch": per_batch}


def one(*argv: str) -> None:
    """One report in this process: its seconds, peak memory and JSON output."""
    from pipelines.cli import main

    printed = io.StringIO()
    started = time.perf_counter()
    with redirect_stdout(printed):
        code = main(list(argv))
    seconds = time.perf_counter() - started
    print(json.dumps({"code": code, "seconds": round(seconds, 1), "peak_mib": round(peak_rss_mib()),
                      "found": json.loads(printed.getvalue())}))


def _measure(*argv: str) -> dict:
    import subprocess

    done = subprocess.run([sys.executable, "-m", "benchmarks.health", "--one", *argv], capture_output=True,
                          text=True, check=True, cwd=REPO)
    return json.loads(done.stdout.strip().splitlines()[-1])


def scale(db: Path, rows: int) -> list[dict]:
    started = time.perf_counter()
    built = synthetic_table(db, rows)
    print(f"synthetic table of {rows} rows written in {time.perf_counter() - started:.0f}s", flush=True)
    table = ["--uri", str(db), "--table", "synthetic", "--json"]
    results = []
    for name, argv in (("duplicates", ["duplicates", *table, "--version", "1"]),
                       ("outliers", ["outliers", *table, "--version", "1", "-k", "2000"]),
                       ("outliers --isolated", ["outliers", *table, "--version", "1", "--isolated", "--column",
                                                "image", "-k", "100"]),
                       ("drift", ["drift", *table, "--from", "1", "--to", "3"])):
        measured = _measure(*argv)
        results.append({"report": name, "rows": rows, "seconds": measured["seconds"],
                        "peak_mib": measured["peak_mib"], **_planted_found(name, measured["found"], built)})
        print(results[-1], flush=True)
    return results


def _planted_found(name: str, found, built: dict) -> dict:
    """What the report found of the planted cases."""
    planted = built["rows"] // WRITE_ROWS * built["planted_per_batch"]
    if name == "duplicates":
        pairs = [g for g in found if len(g["ids"]) == 2 and g["score"] > 0.99]
        return {"found": f"{len(pairs)} of {planted} planted pairs", "groups": len(found)}
    if name == "outliers":
        ids = {int(item["id"].split("-")[1]) for item in found}
        step = WRITE_ROWS // built["planted_per_batch"]
        swapped = {s + k + j for s in range(0, built["rows"], WRITE_ROWS) for k in range(0, WRITE_ROWS, step)
                   for j in (2, 3)}
        return {"found": f"{len(ids & swapped)} of {len(swapped)} swapped captions in the top {len(found)}"}
    if name == "drift":
        return {"found": f"vector score {found['columns']['vector']['score']}, added {found['added']}, "
                         f"removed {found['removed']}"}
    return {"found": f"top score {found[0]['score']}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the synthetic table")
    parser.add_argument("--out", default="out/bench.json")
    parser.add_argument("--one", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    run_benchmark(parser, one, measure_all)


def measure_all(args: argparse.Namespace, root: Path) -> tuple[str, dict, list[dict]]:
    (root / "photos").mkdir()
    separated = separation(root / "photos")
    from pipelines.report import print_results

    print_results(separated)
    reports = scale(root / "db", args.rows)
    return "health", {"separation": separated, "reports": reports}, reports


if __name__ == "__main__":
    main()
