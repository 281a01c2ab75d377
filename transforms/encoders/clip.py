"""`open-clip`: a CLIP model from open_clip, by name and tag, local checkpoint or folder, or Hub repo."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any
from urllib.parse import urlparse

import numpy as np

from transforms.config import ConfigError
from transforms.encoders.base import Encoder, l2_normalise
from transforms.encoders.digests import weights_digest
from transforms.encoders.downloads import require_download
from transforms.encoders.model_cache import shared_model

CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth")  # what open_clip looks for in a local-dir: folder


@dataclass
class ClipModel:
    network: Any
    preprocess: Any
    tokenizer: Any


class OpenClipEncoder(Encoder):
    """A CLIP model from open_clip. Item images go through the image tower (or, with `input: text`, item
    text through the text tower); text queries and labels always through the text tower.

    `model` is an open_clip architecture name with `pretrained` a tag (downloaded) or a checkpoint file,
    or `local-dir:/path` (a folder with open_clip_config.json and its weights), or `hf-hub:org/repo`.
    """

    queries_by_text = True
    prepares_with_model = True

    @property
    def modality(self) -> str:
        modality = self.config.options.get("input", "image")
        if modality not in ("image", "text"):
            raise ConfigError(f"encoders.{self.name}.input must be 'image' or 'text', got {modality!r}")
        return modality

    @property
    def model_name(self) -> str:
        if not self.config.model:
            raise ConfigError(f"encoders.{self.name}.model is required: an open_clip name such as ViT-B-32 "
                              "(with pretrained), local-dir:/path or hf-hub:org/repo")
        return self.config.model

    @cached_property
    def weights(self) -> str:
        """What identifies the weights: a content hash of local files, else the tag or repo."""
        import open_clip

        option = f"encoders.{self.name}"
        name, pretrained = self.model_name, self.config.pretrained
        if name.startswith(("local-dir:", "hf-hub:")) and pretrained:
            raise ConfigError(f"{option}.pretrained is not used with {name.split(':')[0]}: (the weights are in it)")
        if name.startswith("local-dir:"):
            folder = name[len("local-dir:"):]
            if not os.path.isfile(os.path.join(folder, "open_clip_config.json")):
                raise ConfigError(f"{option}.model: no open_clip_config.json in {folder}")
            if not any(n.endswith(CHECKPOINT_SUFFIXES) for n in os.listdir(folder)):
                raise ConfigError(f"{option}.model: no weights in {folder} (a {', '.join(CHECKPOINT_SUFFIXES)} file)")
            return weights_digest(folder)
        if name.startswith("hf-hub:"):
            require_download(name[len("hf-hub:"):], f"{option}.model", "local-dir:/path/to/folder",
                             ("open_clip_config.json",))
            return name
        if name not in open_clip.list_models():
            raise ConfigError(f"{option}.model '{name}' is not an open_clip architecture (open_clip.list_models())")
        if not pretrained:
            raise ConfigError(f"{option}.pretrained is required: a tag of {name} or a checkpoint file")
        if os.path.isfile(pretrained):
            return weights_digest(pretrained)
        return self._require_tag(name, pretrained, f"{option}.pretrained")

    @staticmethod
    def _require_tag(name: str, tag: str, option: str) -> str:
        import open_clip

        source = open_clip.get_pretrained_cfg(name, tag)
        if not source:
            raise ConfigError(f"{option} '{tag}' is neither a checkpoint file nor a tag of {name} "
                              f"({', '.join(open_clip.list_pretrained_tags_by_model(name))})")
        if source.get("hf_hub"):
            require_download(source["hf_hub"].rstrip("/"), option, "a checkpoint file",
                             ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
        else:
            require_download(tag, option, "a checkpoint file", host=urlparse(source["url"]).hostname)
        return tag

    def describe(self) -> dict[str, Any]:
        return {"model": self.model_name, "weights": self.weights, "input": self.modality,
                "precision": self.precision_setting}

    @cached_property
    def dim(self) -> int:
        import open_clip

        return int(open_clip.get_model_config(self.model_name)["embed_dim"])

    def load(self) -> ClipModel:
        name, pretrained, device = self.model_name, self.config.pretrained, self.device
        return shared_model(("open-clip", name, pretrained, device), lambda: _load_open_clip(name, pretrained, device))

    @cached_property
    def input_side(self) -> int | None:
        if self.modality == "text":
            return None
        import open_clip

        size = open_clip.get_model_config(self.model_name)["vision_cfg"]["image_size"]
        return min(size) if isinstance(size, (list, tuple)) else int(size)

    def prepare(self, model: ClipModel, inputs: list) -> Any:
        if self.modality == "text":
            return model.tokenizer(inputs)
        import torch

        return self.pinned(torch.stack([model.preprocess(image) for image in inputs]))

    def embed(self, model: ClipModel, prepared: Any, memo: dict | None = None) -> np.ndarray:
        return self._tower(model, self.modality, prepared)

    def encode_text(self, model: ClipModel, texts: list[str]) -> np.ndarray:
        return self._tower(model, "text", model.tokenizer(texts))

    def _tower(self, model: ClipModel, modality: str, batch: Any) -> np.ndarray:
        import torch

        tower = model.network.encode_text if modality == "text" else model.network.encode_image
        with torch.inference_mode(), self.autocast():
            return l2_normalise(tower(self.to_device(batch)).float().cpu().numpy())

    def logit_scale(self) -> float:
        if "logit_scale" in self.config.options:
            return float(self.config.options["logit_scale"])
        return float(self.load().network.logit_scale.detach().exp())

    @property
    def space(self) -> tuple:
        return ("open-clip", self.model_name, self.weights)


def _load_open_clip(name: str, pretrained: str | None, device: str) -> ClipModel:
    import open_clip

    network, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, device=device, require_pretrained=True)
    return ClipModel(network.eval(), preprocess, open_clip.get_tokenizer(name))
