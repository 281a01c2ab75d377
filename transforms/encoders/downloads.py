"""Models that must be downloaded: found in the Hugging Face cache, or refused up front on a machine with no route."""

from __future__ import annotations

import os
import socket

from transforms.config import ConfigError


def require_download(source: str, option: str, local_form: str, cached_files: tuple[str, ...] = ("config.json",),
                     host: str = "huggingface.co") -> None:
    """Fail before any work when a model must be downloaded and cannot: not in the Hugging Face cache
    (`source` is then a Hub repo id) and no route to `host`."""
    from huggingface_hub import try_to_load_from_cache

    if host == "huggingface.co" and any(isinstance(try_to_load_from_cache(source, f), str) for f in cached_files):
        return
    if _reachable(host):
        return
    raise ConfigError(f"{option} '{source}' needs a download and this machine has no internet; "
                      f"set {option} to a local path ({local_form})")


def _reachable(host: str) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False
