"""What resumes and budgets cost, on a 100,000-item catalog of unique product titles (text encoder, all-MiniLM-L6-v2).

1. Resume: an uninterrupted first run, against a first run SIGKILLed once about 70% of its write batches are
   staged and run again: the forward passes and the wall time of that second run.
2. An unchanged run, the cost of the bookkeeping.
3. A new encoder backfilled at a budget of 25,000 per run (a tiny random CLIP's text tower, as no CLIP weights
   can be had here): seconds and peak memory per run, until a run has nothing left to encode.
4. The rewrite of the combined `vector` from stored vectors (a change of weights, nothing to encode), against
   the plain loop a user could write: read the table with Lance, recombine with numpy, write a new version.

Each run is `catalog-embed run` in a fresh process (`--one`), measured there: `python -m benchmarks.backfill`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.results import peak_rss_mib, run_benchmark
from benchmarks.throughput import titles, write_catalog
from demo.tiny_clip import save_tiny_clip

REPO = Path(__file__).resolve().parent.parent
WRITE_BATCH = 2048
BUDGET = 25_000
KILL_AT = 0.7


def _config(root: Path, catalog: Path, encoders: dict, name: str, table: str = "shop") -> Path:
    raw = {"catalog": {"format": "manifest", "path": str(catalog), "text_fields": ["title"]},
           "encoders": encoders,
           # Batches cut by rows alone (not by output.stage_seconds), so that 70% of them is 70% of the work.
           "output": {"uri": str(root / "db"), "table": table, "write_batch_rows": WRITE_BATCH, "stage_seconds": 3600}}
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def one(config: str, run_id: str, *extra: str) -> None:
    """One `catalog-embed run` in this fresh process: its record's counts, its seconds and peak memory."""
    from pipelines.cli import main
    from transforms.config import load_config
    from transforms.run_log import read_runs

    started = time.perf_counter()
    code = main(["run", "--config", config, "--run-id", run_id, *extra])
    seconds = time.perf_counter() - started
    output = load_config(config).output
    run = next(r for r in read_runs(output.uri, output.table) if r["run_id"] == run_id)
    print(json.dumps({"exit": code, "seconds": round(seconds, 1), "peak_mib": round(peak_rss_mib()),
                      **{key: run[key] for key in ("read", "written", "unchanged", "deferred", "resumed",
                                                   "encoded", "backfill", "encode_rate")}}))


def plain_rewrite(uri: str, weights_json: str) -> None:
    """The loop a user could write for new weights: every row read, its vector recombined, a new version written."""
    import lance
    import numpy as np
    import pyarrow as pa

    started = time.perf_counter()
    weights = json.loads(weights_json)
    table = lance.dataset(uri).to_table()
    parts = [np.sqrt(weight) * np.stack(table[f"{name}_vec"].to_numpy(zero_copy_only=False))
             for name, weight in weights.items()]
    combined = np.concatenate(parts, axis=1).astype(np.float32).ravel()
    vector = pa.FixedSizeListArray.from_arrays(pa.array(combined), table.schema.field("vector").type.list_size)
    table = table.set_column(table.schema.get_field_index("vector"), "vector", vector)
    lance.write_dataset(table, uri, mode="overwrite")
    print(json.dumps({"seconds": round(time.perf_counter() - started, 1), "peak_mib": round(peak_rss_mib())}))


def measure(*args: str) -> dict:
    """One measurement in a fresh process: what it printed, and the command's wall time (imports included)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "benchmarks.backfill", "--one", *args], capture_output=True,
                          text=True, check=True, cwd=REPO)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), command_s=round(time.perf_counter() - started, 1))


def _killed_at(config: Path, root: Path, batches: int) -> float:
    """A first run SIGKILLed (with its workers) once KILL_AT of its write batches are staged; its seconds."""
    command = [str(Path(sys.executable).with_name("catalog-embed")), "run", "--config", str(config),
               "--run-id", "killed"]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    staging = root / "db" / "_catalog_embed_scratch"
    while len(list(staging.glob("catalog-embed-*-staging-*/*/*.fragments.json"))) < KILL_AT * batches:
        if process.poll() is not None:
            raise RuntimeError("the run ended before it was killed")
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return time.perf_counter() - started


def resume_rows(root: Path, catalog: Path, items: int, text: dict) -> list[dict]:
    whole = measure(str(_config(root / "whole", catalog, {"text": text}, "job")), "whole")
    killed_root = root / "killed"
    config = _config(killed_root, catalog, {"text": text}, "job")
    killed_s = _killed_at(config, killed_root, -(-items // WRITE_BATCH))
    resumed = measure(str(config), "resumed")
    unchanged = measure(str(config), "unchanged")
    return [dict(whole, case="first run, uninterrupted"), {"case": "first run, killed", "seconds": round(killed_s, 1)},
            dict(resumed, case="its re-run (resumed)"), dict(unchanged, case="unchanged run")]


def backfill_rows(root: Path, text: dict) -> list[dict]:
    """On the resumed table: add the tiny CLIP's text tower at BUDGET per run until nothing is left."""
    config_path = root / "killed" / "job.yaml"
    raw = yaml.safe_load(config_path.read_text())
    model, _ = save_tiny_clip(root / "tiny-clip")
    raw["encoders"] = {"text": text, "clip": {"kind": "open-clip", "model": model, "input": "text", "weight": 0.5}}
    config_path.write_text(yaml.safe_dump(raw))
    rows = []
    for night in range(1, 10):
        found = measure(str(config_path), f"backfill-{night}", "--max-encode", str(BUDGET))
        rows.append(dict(found, case=f"backfill run {night}"))
        if not found["encoded"].get("clip"):
            break
    raw["encoders"]["clip"]["weight"] = 0.25              # new weights: every vector rewritten, nothing encoded
    config_path.write_text(yaml.safe_dump(raw))
    rows.append(dict(measure(str(config_path), "reweighted"), case="new weights: vector rewritten"))
    weights = {"text": 1 / 1.25, "clip": 0.25 / 1.25}
    plain = measure("plain", str(root / "killed" / "db" / "shop.lance"), json.dumps(weights))
    rows.append(dict(plain, case="plain loop: read, recombine, write"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--out", default="out/bench.json")
    parser.add_argument("--one", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    def one_or_plain(*args: str) -> None:
        if args[0] == "plain":
            plain_rewrite(*args[1:])
        else:
            one(*args)

    def measure_all(args: argparse.Namespace, scratch: Path):
        catalog = write_catalog(scratch / "catalog.csv", titles(args.items, seed=5))
        text = {"kind": "sentence-transformers"}
        rows = resume_rows(scratch, catalog, args.items, text) + backfill_rows(scratch, text)
        for row in rows:
            row.pop("backfill", None)
        return "backfill", {"items": args.items, "budget": BUDGET, "rows": rows}, rows

    run_benchmark(parser, one_or_plain, measure_all)


if __name__ == "__main__":
    main()
