"""The base every encoder kind builds on: from a batch of inputs (texts or RGB images) to L2-normalised
float32 vectors.

An encoder object is light and picklable: it holds its config, and `load()` builds the model on a
worker (once, through the model handler in transforms/inference.py). `encoder_id` names everything that
determines the vectors (kind, model, weights, preprocessing, decoding, dimension); it is recorded in
the table's metadata and hashed into every fingerprint, so any change to it re-embeds.

Encoding is three steps, so that the pipeline can keep the network busy (transforms/inference.py):
- `decode`: an item's input as the encoder takes it (a picture decoded at the size it needs);
- `prepare`: the CPU work that needs no network (resizing, tokenising), run ahead on other threads;
- `embed`: the network's forward pass on the device.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import cached_property
from typing import Any

import numpy as np
from PIL import Image

from transforms.config import EncoderConfig
from transforms.encoders.precision import AUTOCAST_DTYPES, auto_precision, cpu_runs_bf16, resolve_device
from transforms.encoders.query_models import exported_folder
from transforms.images import decode_image

# The DCT's downscale does not filter like a resize: decoded at 1x the input side, CNN vectors of real
# photos keep a mean cosine of 0.994 to a full decode (a texture 0.966); at 2x, the bicubic resize that
# follows does the filtering and they keep 0.9994 or more (docs/encoders.md, "Decoding, batching and
# keeping the network busy").
DRAFT_MARGIN = 2
SHARED_INPUT_SIDE = 256   # a CNN's input side
QUERY_BATCH_SIZE = 32   # queries and labels, where an encoder's batch size is `auto`
SAMPLE_TITLE = "slim fit organic cotton crew neck t-shirt in navy blue, model"  # a catalog title's length


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


class Encoder(ABC):
    """Base of all encoders. `modality` says which input an item gives it: "text", "image" or "behaviour" (its id).
    `queries_by_text` says it can also encode a text query into the same space (text, multimodal)."""

    queries_by_text: bool = False
    # Settings of its kind that say how or from where the job makes its vectors, not what they are (item2vec's
    # log, schedule and threads): left out of the table's metadata (`defining_options`).
    job_options: frozenset[str] = frozenset()
    # Whether `prepare` needs the loaded model (a tokeniser, CLIP's transform); others prepare without it.
    prepares_with_model: bool = False

    def __init__(self, config: EncoderConfig, precision: str | None = None, auto_kind: str | None = None):
        """`precision`: what `precision: auto` runs at where the plan decided it; `auto_kind`: the kind whose `auto`
        it follows where it is part of another encoder (ConSE's networks), else its own."""
        self.config = config
        self._auto_precision = precision
        self._auto_kind = auto_kind or config.kind

    @classmethod
    def check_options(cls, name: str, options: dict[str, Any]) -> None:
        """Raise ConfigError for settings of this kind that cannot run (`options`: the config's kind-specific keys).
        Most kinds take any: their settings are checked where they are used."""
        return None

    @property
    def name(self) -> str:
        return self.config.name

    def defining_options(self) -> dict[str, Any]:
        """Its kind's settings that define its vectors: what the table's metadata holds, so that a moved log or
        another schedule is the same table."""
        return {key: value for key, value in self.config.options.items() if key not in self.job_options}

    # Kinds set these two as class attributes, or as properties where the config decides.
    @property
    @abstractmethod
    def modality(self) -> str:
        """Which input an item gives it: "text", "image" or "behaviour" (its id)."""

    @property
    def input_side(self) -> int | None:
        """The shorter side an image encoder resizes pictures to (None for text). See `decode_side`."""
        return None

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
        return ("encoder", self.encoder_id, self.precision)

    def sample_inputs(self, count: int) -> list | None:
        """Inputs to time the network on, for `batch_size: auto`; None where batch size does not matter."""
        if self.modality == "text":
            return [f"{SAMPLE_TITLE} {i}" for i in range(count)]
        return random_pictures(count)

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
        """The arithmetic the network runs in; resolved once, where the job is planned. Vectors are stored
        as float32 whatever it is. The encoder id holds the setting (`precision_setting`), not this: `auto`
        picks only arithmetic that keeps the vectors (precision.py), so a scheduler on another CPU re-encodes
        nothing. For a remote runner's workers the plan resolves `auto` itself (`build_encoders`); here it
        is this machine's device and CPU that decide."""
        if self.config.precision != "auto":
            return self.config.precision
        if self._auto_precision:
            return self._auto_precision
        return auto_precision(self._auto_kind, self.device_type,
                              self.device_type == "cpu" and cpu_runs_bf16())

    @property
    def precision_setting(self) -> str:
        """The precision as the config sets it: what the encoder id holds."""
        return self.config.precision

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
        return exported_folder(self.name, self.model_key, export)

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


def random_pictures(count: int) -> list[Image.Image]:
    """Noise pictures of a small photo's size, the same on every call: what networks are timed and checked on."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (320, 320, 3), dtype=np.uint8)) for _ in range(count)]


def same_vectors(stored_id: str, encoder_id: str) -> bool:
    """Whether an encoder id a table holds names the vectors that `encoder_id` makes, whatever data they were
    trained on: equal without it, where a precision stored resolved (earlier builds stored what `auto` resolved
    to) counts as the `auto` that now names it (`auto` keeps the vectors: precision.py)."""
    now = json.loads(without_data(encoder_id))
    return _as_settings(json.loads(without_data(stored_id)), now) == now


def _as_settings(stored: Any, now: Any) -> Any:
    if not isinstance(stored, dict) or not isinstance(now, dict):
        return stored
    return {key: now[key] if key == "precision" and now.get(key) == "auto" else _as_settings(value, now.get(key))
            for key, value in stored.items()}


def without_data(encoder_id: str) -> str:
    """An encoder id without the digest of the data it was trained on: what a table's column is, whatever
    the interaction log of the night (a new log re-embeds the column, it does not make another table)."""
    described = json.loads(encoder_id)
    described.pop("interactions", None)
    return json.dumps(described, sort_keys=True)
