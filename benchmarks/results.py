"""`out/bench.json` holds one section per benchmark, so that `make bench` leaves every result in one file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def save_section(path: str, section: str, data: Any) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else {}
    if not isinstance(results, dict):       # a file from before the benchmarks had sections
        results = {}
    results[section] = data
    out.write_text(json.dumps(results, indent=2))
