"""Reading a CSV catalog: the job's reader (transforms/csv_records.py, records found in byte ranges by
csv.reader's quote rules) against the line reader a user would write and the job used before (Beam's ReadFromText, then
`csv.reader` per line, which cuts quoted line breaks). Beam's own ReadFromCsv is not a side: it imports
Beam's DataFrame API, which fails with the pandas Beam 2.77 installs ("type object 'DataFrame' has no
attribute 'first'").

Each side reads the same file of `--rows` product rows (id, title, description, price; commas and quotes in
quoted fields, no line breaks, so that every side reads every row) in a Beam pipeline on the FnApiRunner and
counts its rows; the sides run in turn in one process, after one untimed warm-up pipeline.

    python -m benchmarks.csv_read --rows 1000000 --out out/bench.json
"""

from __future__ import annotations

import argparse
import csv
import random
import tempfile
import time
from pathlib import Path

import apache_beam as beam
from apache_beam import coders
from apache_beam.metrics import Metrics, MetricsFilter

from benchmarks.results import save_section
from transforms.config import CsvFormat
from transforms.csv_records import ReadCsv, csv_header

ROWS = Metrics.counter("csv_read", "rows")
WORDS = ("cotton", "linen", "slim", "classic", "red", "navy", "waterproof", "organic", "wool", "denim", "mug", "lamp")


def write_catalog(path: Path, rows: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "title", "description", "price"])
        for i in range(rows):
            title = " ".join(rng.sample(WORDS, 3))
            description = f'{title}, "{rng.choice(WORDS)}" edition, {rng.randrange(1, 99)} cm; ' * 2
            writer.writerow([f"item-{i:08d}", title, description, f"{rng.random() * 100:.2f}"])
    return path


def _line_rows(path: str, columns: list[str]):
    return (beam.io.ReadFromText(path, skip_header_lines=1, coder=coders.BytesCoder())
            | beam.Map(lambda raw: dict(zip(columns, next(csv.reader([raw.decode("utf-8")])), strict=True))))


def count_rows(path: str, side: str) -> int:
    columns = csv_header(path)
    pipeline = beam.Pipeline(runner="FnApiRunner")
    if side == "record reader (the job)":
        rows, _ = pipeline | beam.Create([path]) | ReadCsv(columns, CsvFormat())
    else:
        rows = pipeline | _line_rows(path, columns)
    _ = rows | beam.Map(lambda _: ROWS.inc())
    result = pipeline.run()
    result.wait_until_finish()
    return sum(found.committed for found in result.metrics().query(MetricsFilter().with_name("rows"))["counters"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--out", default="out/bench.json")
    args = parser.parse_args()
    results: dict = {"rows": args.rows}
    with tempfile.TemporaryDirectory(prefix="csv-bench-") as scratch:
        path = str(write_catalog(Path(scratch) / "catalog.csv", args.rows))
        results["MiB"] = round(Path(path).stat().st_size / 2**20, 1)
        count_rows(str(write_catalog(Path(scratch) / "warm.csv", 1000)), "record reader (the job)")
        for side in ("line reader (before)", "record reader (the job)"):
            started = time.perf_counter()
            found = count_rows(path, side)
            seconds = time.perf_counter() - started
            results[side] = {"seconds": round(seconds, 1), "rows/s": round(found / seconds), "rows": found}
            print(side, results[side], flush=True)
    base = results["line reader (before)"]["seconds"]
    results["record reader / line reader, seconds"] = round(results["record reader (the job)"]["seconds"] / base, 2)
    save_section(args.out, "csv read", results)


if __name__ == "__main__":
    main()
