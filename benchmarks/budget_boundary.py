"""The budget's boundary at a budget of 1M forward passes: peak memory and seconds of the budget step alone, on
2M items that each need the text encoder, against the same pipeline with no budget (what the items themselves
take on a local runner, which holds a stage's input in memory).

    python -m benchmarks.budget_boundary --items 2000000 --budget 1000000 --out out/bench.json

Run it in the tree of another build (`cd` there) to measure that build's boundary the same way.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import apache_beam as beam

from benchmarks.results import measure_in_fresh_process, peak_rss_mib, run_benchmark


def one(items: str, budget: str) -> None:
    """The budget step over `items` synthetic items in this fresh process (a budget of 0 here: none)."""
    from transforms.budget import DEFERRED, apply_budget
    from transforms.config import EncoderConfig
    from transforms.encoders import build_encoder
    from transforms.items import ITEMS

    encoders = [build_encoder(EncoderConfig(name="text", kind="sentence-transformers"))]
    started = time.perf_counter()
    with beam.Pipeline() as pipeline:
        made = (pipeline
                | beam.Create(range(int(items)))
                | beam.Map(lambda n: {"id": f"item-{n}", "fields": {}, "digests": {"text": "t"}, "keep": [],
                                      "vectors": {}, "deferred": [], "rewrite": True}))
        split = apply_budget(made, encoders, int(budget) or None, None)
        _ = split[ITEMS] | "Count encoded" >> beam.combiners.Count.Globally()
        _ = split[DEFERRED] | "Count deferred" >> beam.combiners.Count.Globally()
    print(json.dumps({"seconds": round(time.perf_counter() - started, 1), "peak_mib": round(peak_rss_mib())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=2_000_000)
    parser.add_argument("--budget", type=int, default=1_000_000)
    parser.add_argument("--out", default="out/bench.json")
    parser.add_argument("--one", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    def measure_all(args: argparse.Namespace, _scratch: Path):
        rows = [{"side": side, **measure_in_fresh_process("benchmarks.budget_boundary", str(args.items), str(budget))}
                for side, budget in (("no budget", 0), (f"budget {args.budget:,}", args.budget))]
        summary = {"boundary_mib": rows[1]["peak_mib"] - rows[0]["peak_mib"]}
        return "budget_boundary", {"items": args.items, "rows": rows, "summary": summary}, rows

    run_benchmark(parser, one, measure_all)


if __name__ == "__main__":
    main()
