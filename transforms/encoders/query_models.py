"""The encoders' networks as queries run them: exported once to ONNX (with torch, into the cache of
derived.py, keyed by the model's identity) and run with onnxruntime, so that a query process imports
neither torch nor the model libraries (torch, transformers, sentence-transformers and timm take 8 to 12 s
to import here; onnxruntime 0.2 s).

- A sentence-transformers model is exported whole (transformer, pooling, normalisation, any dense layer),
  with its tokenizer; texts are tokenised as SentenceTransformer.encode does (its prompt, its
  max_seq_length). Its vectors agree with the model's own to about 1e-6.
- A CNN is exported from uint8 pixels to its pooled features and ImageNet logits, normalising inside as
  the job does; pictures are resized and cropped with PIL alone (images.imagenet_crop), as in the job.

The job itself runs the torch models (batched, on the GPU where there is one); only queries use these.
"""

from __future__ import annotations

import json
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from transforms.derived import cached_files

log = logging.getLogger(__name__)
OPSET = 17
_SESSIONS: dict[Path, Any] = {}
_SESSIONS_LOCK = threading.Lock()
_EXPORTS: dict[str, Path | None] = {}          # model key -> its export's folder, or None (exported_folder)
_EXPORTS_LOCK = threading.Lock()
# Texts an export for queries is checked on: spaces around, capitals, accents, and one past any model's length.
EXPORT_CHECK_TEXTS = ["a cup of coffee", "  Slim fit ORGANIC cotton crew neck T-shirt, navy  ",
                      "Café crème au lait – 12 × 200 ml", " ".join(["a long product description"] * 200)]
EXPORT_TOLERANCE = 1e-4     # the largest difference to the torch model's vectors an export may have


def exported_folder(name: str, model_key: str, export: Callable[[Path], None]) -> Path | None:
    """The folder of a network exported for queries, made by `export(folder)` the first time on this machine;
    None where it could not be, and queries run the torch model instead. Looked up (and its files checked)
    once per process: a service answers many queries."""
    with _EXPORTS_LOCK:
        if model_key not in _EXPORTS:
            folder = cached_files("query-onnx", model_key, lambda into: _export_or_note(name, export, into))
            _EXPORTS[model_key] = folder if (folder / "model.onnx").exists() else None
        return _EXPORTS[model_key]


def session(folder: Path) -> Any:
    """One onnxruntime session per exported model and process."""
    import onnxruntime

    with _SESSIONS_LOCK:
        if folder not in _SESSIONS:
            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3
            # Threads that wait for work sleep instead of spinning: a service runs several queries at once.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            _SESSIONS[folder] = onnxruntime.InferenceSession(str(folder / "model.onnx"), options,
                                                             providers=["CPUExecutionProvider"])
        return _SESSIONS[folder]


def loaded_models() -> int:
    """How many exported models this process has loaded."""
    return len(_SESSIONS)


def export_sentence_transformer(model: Any, folder: Path) -> None:
    """The whole model, from token ids to unit vectors, and its tokenizer."""
    import torch

    prompt = model.prompts.get(model.default_prompt_name) if model.default_prompt_name else None
    sample = model.tokenizer(["a cup of coffee", "an astronaut in a white suit"], padding=True,
                             return_tensors="pt")
    names = list(sample.keys())

    class Whole(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *tensors):
            return self.model(dict(zip(names, tensors, strict=True)))["sentence_embedding"]

    _export(Whole(), tuple(sample[name] for name in names), names, ["embedding"], folder,
            {name: {0: "batch", 1: "tokens"} for name in names} | {"embedding": {0: "batch"}})
    model.tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    settings = {"inputs": names, "max_length": model.max_seq_length, "prompt": prompt,
                "pad_id": model.tokenizer.pad_token_id, "pad_token": model.tokenizer.pad_token}
    (folder / "settings.json").write_text(json.dumps(settings))


def export_cnn(model: Any, mean: tuple, std: tuple, folder: Path) -> None:
    """The network from uint8 pixels (N, 3, 224, 224) to its pooled features and logits."""
    import torch

    from transforms.encoders.cnn_models import normalise_pixels

    class FromPixels(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixels):
            features = self.model.features(normalise_pixels(pixels, mean, std))
            return features, self.model.classifier(features)

    pixels = torch.zeros((2, 3, 224, 224), dtype=torch.uint8)
    _export(FromPixels(), (pixels,), ["pixels"], ["features", "logits"], folder,
            {"pixels": {0: "batch"}, "features": {0: "batch"}, "logits": {0: "batch"}})


def _export(module: Any, sample: tuple, inputs: list[str], outputs: list[str], folder: Path, axes: dict) -> None:
    import torch

    with torch.no_grad():
        torch.onnx.export(module.eval().to("cpu").float(), sample, str(folder / "model.onnx"), input_names=inputs,
                          output_names=outputs, dynamic_axes=axes, opset_version=OPSET, dynamo=False)


class Loaded(ABC):
    """One instance per exported model and process (`of`): loading a tokenizer costs more than a query."""

    _loaded: dict = {}
    _lock = threading.Lock()

    @abstractmethod
    def __init__(self, folder: Path):
        """Load the export in `folder`."""

    @classmethod
    def of(cls, folder: Path):
        with cls._lock:
            if (cls, folder) not in cls._loaded:
                cls._loaded[(cls, folder)] = cls(folder)
            return cls._loaded[(cls, folder)]


class TextQueries(Loaded):
    """A sentence-transformers model's vectors for texts, from its export."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        self._settings = json.loads((folder / "settings.json").read_text())
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tokenizer.enable_truncation(self._settings["max_length"])
        self._tokenizer.enable_padding(pad_id=self._settings["pad_id"], pad_token=self._settings["pad_token"])
        self._session = session(folder)

    def encode(self, texts: list[str]) -> np.ndarray:
        prompt = self._settings["prompt"] or ""
        encodings = self._tokenizer.encode_batch([prompt + text for text in texts])
        field = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
        feed = {name: np.array([getattr(e, field[name]) for e in encodings], dtype=np.int64)
                for name in self._settings["inputs"]}
        return self._session.run(["embedding"], feed)[0]


class ImageQueries(Loaded):
    """A CNN's pooled features and logits for prepared pixels, from its export."""

    def __init__(self, folder: Path):
        self._session = session(folder)

    def forward(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        features, logits = self._session.run(["features", "logits"], {"pixels": pixels})
        return features, logits


def _export_or_note(name: str, export: Callable[[Any], None], folder: Any) -> None:
    """Export, checked against the torch model; what cannot be exported is noted, and queries use torch."""
    log.info("encoder %s: exporting its network for queries (once per model, in the cache)", name)
    try:
        export(folder)
    except Exception as err:  # noqa: BLE001 - any failure to export only means that queries run the torch model
        for path in folder.iterdir():
            path.unlink()
        (folder / "unusable.txt").write_text(f"{type(err).__name__}: {err}")
        log.warning("encoder %s: queries will run the torch model, the export failed: %s", name, err)


def check_export(name: str, exported: np.ndarray, reference: np.ndarray) -> None:
    difference = float(np.abs(exported - reference).max())
    if difference > EXPORT_TOLERANCE:
        raise ValueError(f"the export of {name} differs from the torch model by {difference:.2e}")
