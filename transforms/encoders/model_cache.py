"""One copy per process of each loaded model, whichever encoders of a job use it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

_MODELS: dict[tuple, Any] = {}
_MODELS_LOCK = threading.Lock()


def shared_model(key: tuple, build: Callable[[], Any]) -> Any:
    """One copy per process of each model, whichever encoders use it: `conse` reuses the text and image
    models of the `sentence-transformers` and `cnn` encoders instead of loading them again."""
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = build()
        return _MODELS[key]
