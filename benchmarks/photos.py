"""Photo throughput of the image stage, side by side with the plain loops a user would write instead
and with the network's own compute limit.

Rates are marginal: each side runs over 200 and over 1,000 photos of 640x480 (real photos from
scikit-image and scikit-learn, cropped and re-encoded as JPEG), each in a fresh process, and its rate
is 800 / (t1000 - t200), so that imports, model load and Beam's start-up cancel out. Start-up, the
200-photo time less 200 photos at that rate, is reported beside it.

Sides, all EfficientNet-Lite0 pooled features from the files on disk:
- pipeline: `catalog-embed run` with one `cnn` encoder as configured by default (`precision: auto`,
  `batch_size: auto`);
- plain fp32: open, convert, transform and run the network in batches of 16, in fp32;
- plain best: the same loop channels-last under bf16 autocast where the CPU runs bf16 (what `auto`
  picks, measured to agree with fp32 in the docs/encoders.md, "Precision"), else channels-last fp32;
- compute limit: the network alone at plain best's precision on tensors decoded beforehand, at its
  fastest batch size (4 to 64), after a warm-up.

Then large JPEGs (1920x1440, a product photo's size): decoded and prepared at full size and at the
encoder's DCT scale (`decode_side`), pictures/s of each and how their fp32 vectors agree.

    python -m benchmarks.photos --out out/bench.json
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import time
from pathlib import Path

from benchmarks.results import marginal_rate, measure_in_fresh_process, run_benchmark
from benchmarks.scale import make_photos

SIZES = (200, 1000)
PHOTO_SIZE = (640, 480)
BATCH_SIZE = 16
LARGE_PHOTOS, LARGE_PHOTO_SIZE = 100, (1920, 1440)   # product-photo size, for JPEG draft decoding
LIMIT_BATCHES = (4, 8, 16, 32, 64)
SIDES = ("pipeline", "plain_fp32", "plain_best")
# Imported before the clock starts: a nightly job pays them once, whatever the catalog's size.
LIBRARIES = ("pipelines.nightly", "torch", "timm", "torchvision")


def write_catalog(folder: Path, photos: list[Path]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    catalog = folder / "catalog.csv"
    with catalog.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "image"])
        writer.writerows((f"photo-{i:05d}", str(path)) for i, path in enumerate(photos))
    return catalog


def _network(best: bool):
    import torch

    from transforms.encoders.cnn_models import load_efficientnet_lite0
    from transforms.encoders.precision import cpu_runs_bf16

    model = load_efficientnet_lite0().eval()
    if not best:
        return model, torch.float32, torch.contiguous_format
    dtype = torch.bfloat16 if cpu_runs_bf16() else torch.float32
    return model.to(memory_format=torch.channels_last), dtype, torch.channels_last


def _transform():
    from transforms.encoders.cnn import CNN_MODELS
    from transforms.encoders.cnn_models import imagenet_transform

    arch = CNN_MODELS["efficientnet-lite0"]
    return imagenet_transform(arch["mean"], arch["std"], arch["resample"])


def _forward(model, pixels, dtype, layout):
    import torch

    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        return model.features(pixels.contiguous(memory_format=layout)).float()


def plain_loop(paths: list[str], best: bool) -> int:
    """What a user would write: decode, transform, batch and run, one batch after another."""
    import torch
    from PIL import Image

    model, dtype, layout = _network(best)
    transform = _transform()
    done = 0
    for start in range(0, len(paths), BATCH_SIZE):
        pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[start:start + BATCH_SIZE]])
        done += len(_forward(model, pixels, dtype, layout))
    return done


def pipeline(catalog: Path, db: Path) -> int:
    from pipelines.nightly import run_job
    from transforms.config import parse_config

    config = {"catalog": {"format": "manifest", "path": str(catalog)},
              "encoders": {"image": {"kind": "cnn"}},
              "output": {"uri": str(db), "table": "photos"}}
    return run_job(parse_config(config), "bench", [])["encoded"]["image"]


def compute_limit(paths: list[str]) -> dict:
    """Images/s of the network alone on decoded tensors, at its fastest batch size."""
    import torch
    from PIL import Image

    model, dtype, layout = _network(best=True)
    transform = _transform()
    pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[:256]])
    rates = {}
    for batch in LIMIT_BATCHES:
        _forward(model, pixels[:batch], dtype, layout)                     # warm-up at this shape
        started = time.perf_counter()
        for start in range(0, len(pixels), batch):
            _forward(model, pixels[start:start + batch], dtype, layout)
        rates[batch] = len(pixels) / (time.perf_counter() - started)
    best = max(rates, key=rates.get)
    return {"images_per_s": rates[best], "batch_size": best, "by_batch": rates}


def draft_decoding(paths: list[str]) -> dict:
    """Large JPEGs decoded and prepared for EfficientNet-Lite0 at full size and at the encoder's DCT scale:
    pictures/s of each, and how the fp32 vectors of the two agree."""
    import numpy as np

    from transforms.config import EncoderConfig
    from transforms.encoders import build_encoder
    from transforms.images import decode_image

    encoder = build_encoder(EncoderConfig(name="image", kind="cnn", precision="fp32"))
    model = encoder.load()
    datas = [Path(path).read_bytes() for path in paths]
    rates, vectors = {}, {}
    for name, side in (("full", None), ("draft", encoder.decode_side)):
        started = time.perf_counter()
        prepared = [encoder.prepare(model, [decode_image(data, side)]) for data in datas]
        rates[name] = len(datas) / (time.perf_counter() - started)
        vectors[name] = np.concatenate([encoder.embed(model, batch) for batch in prepared])
    cosines = np.sum(vectors["full"] * vectors["draft"], axis=1)
    return {"photo_size": list(LARGE_PHOTO_SIZE), "decode_side": encoder.decode_side,
            "full_per_s": round(rates["full"], 1), "draft_per_s": round(rates["draft"], 1),
            "speedup": round(rates["draft"] / rates["full"], 2),
            "cosine_mean": round(float(cosines.mean()), 5), "cosine_min": round(float(cosines.min()), 5)}


def one(side: str, catalog: str, db: str) -> None:
    """One side over one catalog, in this fresh process: seconds from after the imports."""
    for library in LIBRARIES:
        importlib.import_module(library)

    with open(catalog, newline="", encoding="utf-8") as handle:
        paths = [row["image"] for row in csv.DictReader(handle)]
    started = time.perf_counter()
    if side in ("limit", "draft"):
        print(json.dumps(compute_limit(paths) if side == "limit" else draft_decoding(paths)))
        return
    done = pipeline(Path(catalog), Path(db)) if side == "pipeline" else plain_loop(paths, side == "plain_best")
    print(json.dumps({"images": done, "seconds": time.perf_counter() - started}))


def marginal(side: str, catalogs: dict[int, Path], root: Path) -> dict:
    seconds = {n: measure_in_fresh_process("benchmarks.photos", side, str(catalogs[n]), str(root / f"db-{side}-{n}"))
               ["seconds"] for n in SIZES}
    return {"side": side, **marginal_rate(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description="image-stage throughput vs plain loops and the compute limit")
    parser.add_argument("--out", default="out/bench.json", help="the JSON results file (section 'photos')")
    parser.add_argument("--one", nargs=3, metavar=("SIDE", "CATALOG", "DB"), help=argparse.SUPPRESS)
    run_benchmark(parser, one, measure_all)


def measure_all(args: argparse.Namespace, root: Path) -> tuple[str, dict, list[dict]]:
    photos = make_photos(root / "photos", max(SIZES), seed=3, size=PHOTO_SIZE)
    catalogs = {n: write_catalog(root / f"catalog-{n}", photos[:n]) for n in SIZES}
    large_photos = make_photos(root / "large-photos", LARGE_PHOTOS, seed=5, size=LARGE_PHOTO_SIZE)
    large = write_catalog(root / "large", large_photos)
    rows = [marginal(side, catalogs, root) for side in SIDES]
    limit = measure_in_fresh_process("benchmarks.photos", "limit", str(catalogs[max(SIZES)]), str(root / "unused"))
    rates = {row["side"]: row["items_per_s"] for row in rows}
    summary = {"pipeline_over_plain_best": round(rates["pipeline"] / rates["plain_best"], 2),
               "pipeline_over_plain_fp32": round(rates["pipeline"] / rates["plain_fp32"], 2),
               "pipeline_over_compute_limit": round(rates["pipeline"] / limit["images_per_s"], 2),
               "compute_limit": {"images_per_s": round(limit["images_per_s"], 1), "batch_size": limit["batch_size"]},
               "compute_limit_by_batch": {b: round(r, 1) for b, r in limit["by_batch"].items()},
               "large_jpegs": measure_in_fresh_process("benchmarks.photos", "draft", str(large), str(root / "unused"))}
    return "photos", {"runs": rows, "summary": summary}, rows

if __name__ == "__main__":
    main()
