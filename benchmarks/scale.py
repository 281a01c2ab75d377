"""What a nightly run costs as the catalog grows, with `configs/food101.yaml` as shipped.

Two Food-101-layout catalogs are built from real photos (those in scikit-image and scikit-learn,
cropped, resized to Food-101's 512 px and re-encoded into unique JPEGs), with hard links, so that
100,000 items take seconds and little disk:
- `10k`: 10,000 items, one unique photo each;
- `100k`: 100,000 items over the same 10,000 photos (each photo under 10 ids of different classes).
Per catalog: a first run, an unchanged re-run, and a run after 1% of the items got a new photo.
Each run is `catalog-embed run` in a fresh process, measured for seconds, peak memory (VmHWM),
all bytes the process read (rchar in /proc/self/io: libraries and weights too) and the image bytes
it opened.

    python -m benchmarks.scale --unique 10000 --items 100000 --out out/bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import yaml
from PIL import Image, ImageEnhance, ImageOps

from benchmarks.results import peak_rss_mib, rchar_mib, run_benchmark
from demo.photos import photo_path

REPO = Path(__file__).resolve().parent.parent
CLASSES = (Path(__file__).parent / "food101_classes.txt").read_text().split()
PHOTO_SIZE = (512, 384)


def _source_photos() -> list[Path]:
    with (REPO / "demo" / "captions.csv").open(encoding="utf-8") as handle:
        rows = [line.split(",")[:3] for line in handle.read().splitlines()[1:]]
    return [photo_path(source, name) for _, source, name in rows]


def _make_photo(job: tuple[Path, Path, int, tuple[int, int]]) -> None:
    source, dest, seed, size = job
    rng = random.Random(seed)
    image = Image.open(source).convert("RGB")
    scale = rng.uniform(0.5, 1.0)
    width, height = int(image.width * scale), int(image.height * scale)
    left, top = rng.randrange(image.width - width + 1), rng.randrange(image.height - height + 1)
    image = image.crop((left, top, left + width, top + height)).resize(size, Image.Resampling.BILINEAR)
    image = ImageEnhance.Brightness(ImageOps.mirror(image) if seed % 2 else image).enhance(rng.uniform(0.8, 1.2))
    image.save(dest, "JPEG", quality=rng.randint(80, 92))


def make_photos(folder: Path, count: int, seed: int, size: tuple[int, int] = PHOTO_SIZE) -> list[Path]:
    """`count` unique JPEGs of `size` made from the real photos that ship in scikit-image and scikit-learn."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = _source_photos()
    jobs = [(sources[i % len(sources)], folder / f"{seed}-{i:06d}.jpg", seed * 10_000_000 + i, size)
            for i in range(count)]
    with Pool(os.cpu_count()) as pool:
        pool.map(_make_photo, jobs, chunksize=64)
    return [dest for _, dest, _, _ in jobs]


def food101_catalog(root: Path, photos: list[Path], items: int) -> list[Path]:
    """Food-101's layout with `items` items, hard-linked to `photos` in turn; the items' image paths."""
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "meta" / "labels.txt").write_text("\n".join(c.replace("_", " ").capitalize() for c in CLASSES) + "\n")
    splits: dict[str, list[str]] = {"train": [], "test": []}
    paths = []
    for k in range(items):
        item_id = f"{CLASSES[k % len(CLASSES)]}/{k}"
        path = root / "images" / f"{item_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        os.link(photos[k % len(photos)], path)
        splits["test" if k % 4 == 0 else "train"].append(item_id)
        paths.append(path)
    for split, ids in splits.items():
        (root / "meta" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return paths


def replace_photos(paths: list[Path], photos: list[Path]) -> None:
    """New content under the same paths: a new file renamed over each (its hard links elsewhere keep theirs)."""
    for path, photo in zip(paths, photos, strict=False):
        temporary = path.with_suffix(".new")
        os.link(photo, temporary)
        os.replace(temporary, path)


def shipped_config(catalog: Path, db: Path, dest: Path) -> Path:
    raw = yaml.safe_load((REPO / "configs" / "food101.yaml").read_text())
    raw["catalog"]["path"], raw["output"]["uri"] = str(catalog), str(db)
    dest.write_text(yaml.safe_dump(raw))
    return dest


def one(config: str, run_id: str) -> None:
    """One `catalog-embed run` in this fresh process, with what it cost."""
    from apache_beam.io.filesystems import FileSystems

    from pipelines.cli import main
    from transforms.config import load_config
    from transforms.run_log import read_runs

    opened = []
    real_open = FileSystems.open
    FileSystems.open = staticmethod(lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    started = time.perf_counter()
    code = main(["run", "--config", config, "--run-id", run_id])
    seconds = time.perf_counter() - started
    output = load_config(config).output
    run = next(r for r in read_runs(output.uri, output.table) if r["run_id"] == run_id)
    image_mib = sum(os.path.getsize(p) for p in opened if "/images/" in p) / 2**20
    counts = {key: run[key] for key in ("read", "written", "unchanged", "encoded")}
    print(json.dumps({"exit": code, "seconds": seconds, "peak_mib": peak_rss_mib(), "rchar_mib": rchar_mib(),
                      "image_mib_opened": image_mib, **counts}))


def measure(config: Path, run_id: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.scale", "--one", str(config), run_id]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(done.stdout.strip().splitlines()[-1])


def scenarios(name: str, root: Path, photos: list[Path], items: int) -> list[dict]:
    """First run, unchanged re-run and 1%-changed run of one catalog."""
    paths = food101_catalog(root / name / "food-101", photos, items)
    config = shipped_config(root / name / "food-101", root / name / "db", root / name / "food101.yaml")
    catalog_mib = sum(p.stat().st_size for p in paths) / 2**20
    rows = []
    for scenario in ("first", "unchanged", "1% changed"):
        if scenario == "1% changed":
            changed = paths[::100]
            replace_photos(changed, make_photos(root / name / "new", len(changed), seed=2))
        result = measure(config, scenario.replace("% ", "pct-"))
        print(f"{name} {scenario}: {result['seconds']:.1f} s, {result['peak_mib']:.0f} MiB", file=sys.stderr)
        rows.append({"catalog": name, "items": items, "unique_photos": len(photos), "scenario": scenario,
                     "catalog_image_mib": round(catalog_mib, 1), "items_per_s": round(items / result["seconds"], 1),
                     **{k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}})
    return rows


def summarise(small: list[dict], large: list[dict]) -> dict:
    """The ratios the issue's targets are stated in; rows are (first, unchanged, 1% changed) per catalog."""
    first, unchanged, changed = small
    return {
        "peak_rss_large_over_small": round(large[0]["peak_mib"] / first["peak_mib"], 2),
        "unchanged_vs_first_items_per_s_small": round(unchanged["items_per_s"] / first["items_per_s"], 1),
        "changed_1pct_vs_first_items_per_s_small": round(changed["items_per_s"] / first["items_per_s"], 1),
        "unchanged_image_bytes_read_share_large": round(
            large[1]["image_mib_opened"] / large[1]["catalog_image_mib"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="nightly-run cost at 10k and 100k Food-101-layout items")
    parser.add_argument("--unique", type=int, default=10_000, help="unique photos, and the small catalog's size")
    parser.add_argument("--items", type=int, default=100_000, help="the large catalog's size")
    parser.add_argument("--out", default="out/bench.json", help="the JSON results file (section 'scale')")
    parser.add_argument("--one", nargs=2, metavar=("CONFIG", "RUN_ID"), help=argparse.SUPPRESS)
    run_benchmark(parser, one, measure_all)


def measure_all(args: argparse.Namespace, root: Path) -> tuple[str, dict, list[dict]]:
    photos = make_photos(root / "photos", args.unique, seed=1)
    small = scenarios(f"{args.unique:,}", root, photos, args.unique)
    large = scenarios(f"{args.items:,}", root, photos, args.items)
    rows = small + large
    printed = [{k: v for k, v in r.items() if k != "encoded"} for r in rows]
    return "scale", {"runs": rows, "summary": summarise(small, large)}, printed

if __name__ == "__main__":
    main()
