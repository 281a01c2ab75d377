"""What an encoder derives once from its model and settings, kept on disk under a key that names them
(its encoder id, or the model's identity): ConSE's class vectors, a text model's dimension, the networks
exported for queries. Neither a query nor a night's run computes them again.

The folder is $CATALOG_EMBED_CACHE, else $XDG_CACHE_HOME/catalog-embed, else ~/.cache/catalog-embed: each
machine (and each worker) keeps its own. An entry is a folder of files and `entry.json`, which names the
entry's kind and key and each file's size and sha256. An entry whose `entry.json` names another kind or
key (a foreign entry), or whose files are missing or differ from their digests (a corrupt one), is built
again and replaced, never used. An entry is built in a folder of its own and renamed into place, so
processes that build one at once leave one whole entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
ENTRY = "entry.json"


def cache_folder() -> Path:
    if os.environ.get("CATALOG_EMBED_CACHE"):
        return Path(os.environ["CATALOG_EMBED_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "catalog-embed"


def cached_files(kind: str, key: str, build: Callable[[Path], None]) -> Path:
    """The folder of the entry (kind, key), after `build(folder)` has written its files if it had to."""
    name = f"{kind}-{hashlib.sha256((kind + chr(0) + key).encode()).hexdigest()[:24]}"
    folder = cache_folder() / name
    problem = _check(folder, kind, key)
    if problem is None:
        return folder
    if problem != "missing":
        log.warning("cache entry %s is %s: building it again", folder, problem)
    cache_folder().mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_folder()))
    try:
        build(building)
        files = {path.name: _describe(path) for path in sorted(building.iterdir())}
        (building / ENTRY).write_text(json.dumps({"kind": kind, "key": key, "files": files}, indent=1))
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(building, folder)
    except OSError:
        if _check(folder, kind, key) is None:   # another process put the same entry in place meanwhile
            return folder
        raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return folder


def cached_array(kind: str, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    folder = cached_files(kind, key, lambda into: np.save(into / "array.npy", compute(), allow_pickle=False))
    return np.load(folder / "array.npy", allow_pickle=False)


def cached_value(kind: str, key: str, compute: Callable[[], Any]) -> Any:
    """A small JSON value (a dimension, a setting)."""
    def write(into: Path) -> None:
        (into / "value.json").write_text(json.dumps(compute()))

    folder = cached_files(kind, key, write)
    return json.loads((folder / "value.json").read_text())


def _check(folder: Path, kind: str, key: str) -> str | None:
    """None when the entry is whole and is the one asked for; else what is wrong with it."""
    try:
        entry = json.loads((folder / ENTRY).read_text())
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError):
        return "corrupt (entry.json unreadable)"
    if entry.get("kind") != kind or entry.get("key") != key:
        return "foreign (another kind or key)"
    for name, described in entry.get("files", {}).items():
        path = folder / name
        if not path.is_file() or _describe(path) != described:
            return f"corrupt ({name} differs from its digest)"
    return None


def _describe(path: Path) -> dict:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}
