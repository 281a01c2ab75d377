"""Photos as sellers re-upload them: resized, recompressed, slightly cropped, or all three.

The near-duplicate report must group these with their originals and keep different photos apart;
the demo's second night, the tests and `benchmarks/health.py` make them the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image


def _resized(image: Image.Image, scale: float) -> Image.Image:
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)


def _cropped(image: Image.Image, share: float) -> Image.Image:
    dx, dy = round(image.width * share), round(image.height * share)
    return image.crop((dx, dy, image.width - dx, image.height - dy))


# variant -> (how the picture changes, JPEG quality it is saved at)
VARIANTS: dict[str, tuple[Callable[[Image.Image], Image.Image], int]] = {
    "resized": (lambda image: _resized(image, 0.5), 90),
    "recompressed": (lambda image: image, 35),
    "cropped": (lambda image: _cropped(image, 0.05), 90),
    "all": (lambda image: _resized(_cropped(image, 0.04), 0.6), 50),
}


def reupload(source: Path, variant: str, dest: Path) -> Path:
    """Save `source` changed as `variant` says, as a JPEG at `dest`."""
    change, quality = VARIANTS[variant]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as image:
        change(image.convert("RGB")).save(dest, format="JPEG", quality=quality)
    return dest
