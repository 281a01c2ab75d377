"""`conse`: images into a text model's space through an ImageNet CNN's class probabilities (ConSE)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from PIL import Image

from transforms.config import ConfigError, EncoderConfig
from transforms.derived import cached_array
from transforms.encoders.base import Encoder, l2_normalise
from transforms.encoders.cnn import CnnEncoder
from transforms.encoders.sentence_transformer import MINILM_NAMES, SentenceTransformerEncoder

# ConSE's settings: each ImageNet class is the mean of the text model's vectors of its sentences (its names
# through the templates, and its WordNet definition), and an image the mix of its top_t classes' vectors by
# their probabilities at a temperature. Defaults chosen on the development set (docs/encoders.md, "ConSE").
CONSE_DEFAULTS = {"top_t": 20, "temperature": 2.0, "class_names": "first", "class_definitions": True,
                  "class_templates": ["{}"]}
CONSE_CLASS_NAMES = ("first", "all")   # the first of a class's WordNet lemmas, or all of them
CLASS_TEXT_SETTINGS = ("class_names", "class_definitions", "class_templates")   # what ConSE's classes depend on


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

    @classmethod
    def check_options(cls, name: str, options: dict[str, Any]) -> None:
        options = {k: v for k, v in options.items() if k in CONSE_DEFAULTS}
        top_t, temperature = options.get("top_t", 1), options.get("temperature", 1.0)
        if isinstance(top_t, bool) or not isinstance(top_t, int) or not 1 <= top_t <= 1000:
            raise ConfigError(f"encoders.{name}.top_t must be an integer from 1 to 1000, got {top_t!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ConfigError(f"encoders.{name}.temperature must be a number > 0, got {temperature!r}")
        if options.get("class_names", "first") not in CONSE_CLASS_NAMES:
            raise ConfigError(f"encoders.{name}.class_names must be one of {', '.join(CONSE_CLASS_NAMES)}, "
                              f"got {options['class_names']!r}")
        if not isinstance(options.get("class_definitions", False), bool):
            raise ConfigError(f"encoders.{name}.class_definitions must be true or false")
        templates = options.get("class_templates", ["{}"])
        if not isinstance(templates, list) or not templates or not all(
                isinstance(t, str) and t.count("{}") == 1 for t in templates):
            raise ConfigError(f"encoders.{name}.class_templates must be a list of texts with one {{}} each "
                              f"(where the class name goes), e.g. [\"a photo of a {{}}.\"], got {templates!r}")

    @cached_property
    def parts(self) -> tuple[CnnEncoder, SentenceTransformerEncoder]:
        """The image and text encoders it is made of (their models are shared with theirs, see shared_model)."""
        options = self.config.options
        image = EncoderConfig(name=self.name, kind="cnn", model=options.get("image_model", "efficientnet-lite0"),
                              weights_file=self.config.weights_file, device=self.config.device,
                              precision=self.precision_setting)
        text = EncoderConfig(name=self.name, kind="sentence-transformers",
                             model=options.get("text_model", MINILM_NAMES[0]), device=self.config.device,
                             precision=self.precision_setting)
        # Resolved when a forward pass needs it, as ConSE's `auto`: a query that runs an exported network loads
        # no torch.
        return (CnnEncoder(image, self._auto_precision, auto_kind=self.config.kind),
                SentenceTransformerEncoder(text, self._auto_precision, auto_kind=self.config.kind))

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
        # The text model's description holds its precision setting; with the device setting and what the plan
        # resolved, `auto` resolves alike on this machine, whose cache this is (no torch is loaded to say so).
        key = json.dumps({"text": text.describe(), "device": self.config.device, "resolved": self._auto_precision,
                          **class_texts}, sort_keys=True)

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
