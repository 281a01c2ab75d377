"""`out/bench.json` holds one section per benchmark, so that `make bench` leaves every result in one file.

Every benchmark has the same entry point (`run_benchmark`): the parent process builds the catalogs in
a scratch folder and starts one fresh process per measurement, `python -m benchmarks.X --one ...`, so
that no side inherits a model or a warm cache from another.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.report import print_results


def save_section(path: str, section: str, data: Any) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else {}
    if not isinstance(results, dict):       # a file from before the benchmarks had sections
        results = {}
    results[section] = data
    out.write_text(json.dumps(results, indent=2))


def run_benchmark(parser: argparse.ArgumentParser, one: Callable[..., None],
                  measure_all: Callable[[argparse.Namespace, Path], tuple[str, Any, list[dict]]]) -> None:
    """With `--one ARGS`, measure one side in this process. Otherwise `measure_all(args, scratch folder)`
    returns (section, data, rows): the data is saved under the section of `--out`, the rows printed."""
    args = parser.parse_args()
    if args.one:
        one(*args.one)
        return
    with tempfile.TemporaryDirectory() as scratch:
        section, data, rows = measure_all(args, Path(scratch))
    save_section(args.out, section, data)
    print_results(rows)
    if isinstance(data, dict) and "summary" in data:
        print(json.dumps(data["summary"], indent=2))
    print(f"results: {args.out}")
