"""`color`: a picture's colours as a joint CIE Lab histogram; no network."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from transforms.encoders.base import Encoder, l2_normalise


class ColorEncoder(Encoder):
    """A joint histogram in CIE Lab, square-rooted (Hellinger) so that cosine compares distributions."""

    modality = "image"
    input_side = 64    # the thumbnail it histograms

    @property
    def bins(self) -> tuple[int, int, int]:
        return tuple(self.config.options.get("bins", (4, 6, 6)))

    @property
    def dim(self) -> int:
        return int(np.prod(self.bins))

    def describe(self) -> dict[str, Any]:
        return {"model": "lab-histogram", "bins": list(self.bins), "preprocess": "thumbnail64"}

    def load(self) -> None:
        return None

    def prepare(self, model: Any, inputs: list[Image.Image]) -> np.ndarray:
        return np.stack([self._histogram(image) for image in inputs])   # all of its work: off the network's thread

    def embed(self, model: Any, prepared: np.ndarray, memo: dict | None = None) -> np.ndarray:
        return l2_normalise(prepared)

    def sample_inputs(self, count: int) -> None:
        return None

    def _histogram(self, image: Image.Image) -> np.ndarray:
        from skimage.color import rgb2lab

        small = image.copy()
        small.thumbnail((64, 64), Image.Resampling.BILINEAR)
        lab = rgb2lab(np.asarray(small)).reshape(-1, 3)
        ranges = ((0, 100), (-128, 128), (-128, 128))
        hist, _ = np.histogramdd(lab, bins=self.bins, range=ranges)
        return np.sqrt(hist.ravel() / max(hist.sum(), 1))
