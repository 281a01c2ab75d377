"""Catalogs whose images are http URLs: the job against the plain loop a user would write.

A local stand-in for a CDN (demo/image_server.py, in this process) serves `--sizes` unique JPEGs (crops of
the package photos, about 6 KB each) with a fixed latency per response (`--latency-ms`, a CDN's time to
first byte). Each side runs as its own command in a fresh process and embeds the catalog with the color
encoder, so that the fetching is what is measured:
- the job: `catalog-embed run` over a manifest of the URLs (catalog.http at its defaults: 16 requests in
  flight to one host);
- the plain loop: `requests.get` on a thread pool of the same 16 threads, then each picture decoded and
  embedded with the same color encoder, then one LanceDB table written;
- the job's unchanged night: a second run, with its requests and seconds.

    python -m benchmarks.url_images --sizes 1000 10000 --latency-ms 50 --out out/bench.json
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from PIL import Image

from benchmarks.results import run_benchmark, run_command
from demo.image_server import ImageServer
from demo.photos import photo_path
from transforms.config import HttpSettings

THREADS = HttpSettings().max_per_host
SOURCES = (("skimage", "chelsea.png"), ("skimage", "coffee.png"), ("skimage", "astronaut.png"),
           ("skimage", "rocket.jpg"), ("sklearn", "china.jpg"), ("sklearn", "flower.jpg"))


def unique_photos(count: int, seed: int = 0) -> dict[str, bytes]:
    """`count` different small JPEGs: random crops of real photos."""
    rng = random.Random(seed)
    sources = [Image.open(photo_path(*source)).convert("RGB") for source in SOURCES]
    photos = {}
    for i in range(count):
        source = rng.choice(sources)
        left, top = rng.randrange(source.width - 200), rng.randrange(source.height - 200)
        crop = source.crop((left, top, left + 200, top + 200)).resize((128, 128))
        data = io.BytesIO()
        crop.save(data, "JPEG", quality=85)
        photos[f"{i:06d}.jpg"] = data.getvalue()
    return photos


def plain_loop(urls_file: str, db: str) -> None:
    """What a user would write: download on a thread pool, embed, write one table."""
    import lancedb
    import requests

    from transforms.config import EncoderConfig
    from transforms.encoders import build_encoder

    urls = Path(urls_file).read_text().split()
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=THREADS))
    with ThreadPoolExecutor(THREADS) as pool:
        bodies = list(pool.map(lambda url: session.get(url, timeout=30).content, urls))
    encoder = build_encoder(EncoderConfig(name="color", kind="color"))
    vectors = [encoder.embed(None, encoder.prepare(None, [encoder.decode(body)]))[0] for body in bodies]
    rows = [{"id": url, "vector": vector.tolist()} for url, vector in zip(urls, vectors, strict=True)]
    lancedb.connect(db).create_table("plain", rows)
    print(json.dumps({"rows": len(rows)}))


def _config(folder: Path, urls: list[str]) -> Path:
    with (folder / "catalog.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "image"])
        writer.writerows([url.rsplit("/", 1)[1], url] for url in urls)
    config = {"catalog": {"format": "manifest", "path": str(folder / "catalog.csv")},
              "encoders": {"color": {"kind": "color"}},
              "output": {"uri": str(folder / "db"), "table": "urls"}}
    (folder / "job.yaml").write_text(yaml.safe_dump(config))
    return folder / "job.yaml"


def _job(config: Path) -> tuple[dict, float]:
    stdout, seconds = run_command([sys.executable, "-m", "pipelines.cli", "run", "--config", str(config), "--json"])
    return json.loads(stdout.strip().splitlines()[-1]), seconds


def measure_size(size: int, latency_s: float, scratch: Path) -> list[dict]:
    folder = scratch / str(size)
    folder.mkdir()
    with ImageServer(unique_photos(size), latency_s=latency_s) as server:
        urls = [server.url(f"/img/{name}") for name in server.photos]
        (folder / "urls.txt").write_text("\n".join(urls))
        _, plain_s = run_command([sys.executable, "-m", "benchmarks.url_images", "--one", str(folder / "urls.txt"),
                                  str(folder / "plain-db")])
        server.reset_counts()
        first, first_s = _job(_config(folder, urls))
        first_requests = sum(server.requests.values())
        server.reset_counts()
        night, night_s = _job(folder / "job.yaml")
        night_bodies = sum(server.bodies.values())
        night_requests = sum(server.requests.values())
    assert first["written"] == size and night["unchanged"] == size, (first, night)
    return [
        {"images": size, "side": f"plain requests + {THREADS}-thread pool", "seconds": round(plain_s, 1),
         "images_per_s": round(size / plain_s, 1)},
        {"images": size, "side": "catalog-embed run (first)", "seconds": round(first_s, 1),
         "images_per_s": round(size / first_s, 1), "vs_plain": round(plain_s / first_s, 2),
         "requests": first_requests},
        {"images": size, "side": "catalog-embed run (unchanged night)", "seconds": round(night_s, 1),
         "requests": night_requests, "image_bodies": night_bodies},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--out", default="out/bench.json")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)

    def measure_all(args: argparse.Namespace, scratch: Path):
        rows = []
        for size in args.sizes:
            started = time.perf_counter()
            rows += measure_size(size, args.latency_ms / 1000, scratch)
            print(f"{size} images measured in {time.perf_counter() - started:.0f} s", flush=True)
        return "url images", {"latency_ms": args.latency_ms, "rows": rows}, rows

    run_benchmark(parser, plain_loop, measure_all)


if __name__ == "__main__":
    main()
