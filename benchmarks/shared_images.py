"""A picture shared by every item (a "no image available" placeholder) against a picture of its own per item: the
first run's peak memory and seconds, at 10k and 100k items.

Each catalog is a manifest whose rows name small PNGs: one per item (unique noise, so unique digests), or one
file for all. The job runs the color encoder alone, so that the measure is the pipeline's own (the grouping of
items by picture), not a network's. Each run is `catalog-embed run` in a fresh process, measured there for
peak memory (VmHWM: the job runs in one process here, so that is the worker's) and seconds.

    python -m benchmarks.shared_images --sizes 10000,100000 --out out/bench.json
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from benchmarks.results import measure_in_fresh_process, peak_rss_mib, run_benchmark

SIDE = 32


def write_pictures(folder: Path, count: int) -> list[Path]:
    """`count` noise PNGs of SIDE x SIDE, each its own bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for n in range(count):
        path = folder / f"{n}.png"
        Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def write_catalog(path: Path, pictures: list[Path], items: int) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "title", "image"])
        writer.writerows([f"item-{n}", f"item {n}", str(pictures[n % len(pictures)])] for n in range(items))
    return path


def config(root: Path, catalog: Path) -> Path:
    raw = {"catalog": {"format": "manifest", "path": str(catalog), "text_fields": ["title"]},
           "encoders": {"color": {"kind": "color"}}, "output": {"uri": str(root / "db"), "table": "shop"}}
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def one(config_path: str) -> None:
    """One first run in this fresh process: its seconds, peak memory and forward passes."""
    from pipelines.cli import main
    from transforms.config import load_config
    from transforms.run_log import read_runs

    started = time.perf_counter()
    code = main(["run", "--config", config_path, "--run-id", "first"])
    seconds = time.perf_counter() - started
    output = load_config(config_path).output
    run = read_runs(output.uri, output.table)[-1]
    print(json.dumps({"exit": code, "seconds": round(seconds, 1), "peak_mib": round(peak_rss_mib()),
                      "written": run["written"], "encoded": run["encoded"].get("color", 0)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--out", default="out/bench.json")
    parser.add_argument("--one", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    def measure_all(args: argparse.Namespace, scratch: Path):
        sizes = [int(size) for size in args.sizes.split(",")]
        pictures = write_pictures(scratch / "pictures", max(sizes))
        rows = []
        for size in sizes:
            for layout, used in (("own picture", pictures), ("one shared picture", pictures[:1])):
                root = scratch / f"{layout.replace(' ', '-')}-{size}"
                root.mkdir()
                catalog = write_catalog(root / "catalog.csv", used, size)
                found = measure_in_fresh_process("benchmarks.shared_images", str(config(root, catalog)))
                rows.append({"items": size, "layout": layout, **found})
        summary = {f"peak shared / own at {size}": round(
            next(r["peak_mib"] for r in rows if r["items"] == size and r["layout"] == "one shared picture")
            / next(r["peak_mib"] for r in rows if r["items"] == size and r["layout"] == "own picture"), 2)
            for size in sizes}
        return "shared_images", {"rows": rows, "summary": summary}, rows

    run_benchmark(parser, one, measure_all)


if __name__ == "__main__":
    main()
