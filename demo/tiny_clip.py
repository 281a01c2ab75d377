"""A tiny CLIP with random weights, saved as a local checkpoint: no CLIP weights can be downloaded here, so the
open-clip code path is run for real on this (tests, benchmarks)."""

from __future__ import annotations

import json
from pathlib import Path

TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}


def save_tiny_clip(folder: Path, seed: int = 7):
    """Save a random tiny CLIP in `folder`; returns its model name for the config (`local-dir:<folder>`) and the
    model itself, in eval mode, as the reference."""
    import open_clip
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{folder}")       # no weights file yet: random
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return f"local-dir:{folder}", model.eval()
