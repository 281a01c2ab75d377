"""Decode image bytes into a normalised RGB picture, whatever the file was.

Phone photos carry their rotation in EXIF; palette, grey, CMYK, 16-bit and alpha images each need
their own conversion to look right in RGB; animated files contribute their first frame. Oversized
images are refused before their pixels are decoded (decompression bombs). ImageNet networks' resize
and crop are here too, in PIL alone, for the job and for queries, which import no torch.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps

RESIZED_SIDE, CROPPED_SIDE = 256, 224        # ImageNet networks' preprocessing
RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


class ImageTooLarge(ValueError):
    """The image has more pixels than the configured limit."""


def check_image(data: bytes, max_pixels: int) -> None:
    """Reject what can be known from the header alone: empty files, unknown formats, too many pixels."""
    if not data:
        raise ValueError("the image file is empty (0 bytes)")
    with _no_pillow_bomb_check():
        width, height = Image.open(io.BytesIO(data)).size
    if width * height > max_pixels:
        raise ImageTooLarge(f"{width}x{height} pixels is over the limit of {max_pixels} (run.max_pixels)")


def decode_image(data: bytes, min_side: int | None = None) -> Image.Image:
    """Bytes that passed `check_image` to an upright RGB image. Raises on truncated files.

    With `min_side`, a JPEG is decoded at the smallest of its DCT scales (1/2, 1/4, 1/8) that keeps both
    sides at least `min_side` long: a 2400x1600 photo wanted at 256 decodes at 600x400, about 10 times
    faster. Other formats, and JPEGs under twice `min_side`, decode at full size."""
    with _no_pillow_bomb_check():
        image = Image.open(io.BytesIO(data))
        image.seek(0)
        if min_side:
            image.draft(None, (min_side, min_side))
        image.load()
    ImageOps.exif_transpose(image, in_place=True)
    return to_rgb(image)


@contextlib.contextmanager
def _no_pillow_bomb_check():
    # The limit is ours (run.max_pixels), checked in check_image with a clear message.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: scale to 8 bits by the type's range instead of clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels go on white, as catalog photos are shown.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def imagenet_crop(image: Image.Image, resample: str) -> np.ndarray:
    """A picture resized to 256 on its shorter side and centre-cropped to 224, as uint8 (3, 224, 224): the
    pixels torchvision's Resize(256) and CenterCrop(224) make of a PIL image, computed with PIL alone, so
    that the job and a query (which imports no torch) prepare pictures alike.

    Only the crop is resampled: the crop's box, taken back to the picture's own pixels, resized straight to
    224. The filter and the pixel centres are those of the whole resize (99.99% of the bytes equal, none off by
    more than 2 levels), at 60% of its CPU time."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    long = int(RESIZED_SIDE * long / short)
    resized_width, resized_height = (RESIZED_SIDE, long) if width <= height else (long, RESIZED_SIDE)
    top = int(round((resized_height - CROPPED_SIDE) / 2.0))
    left = int(round((resized_width - CROPPED_SIDE) / 2.0))
    x_scale, y_scale = width / resized_width, height / resized_height
    box = (left * x_scale, top * y_scale, (left + CROPPED_SIDE) * x_scale, (top + CROPPED_SIDE) * y_scale)
    cropped = image.resize((CROPPED_SIDE, CROPPED_SIDE), RESAMPLING[resample], box=box)
    return np.ascontiguousarray(np.asarray(cropped, dtype=np.uint8).transpose(2, 0, 1))
