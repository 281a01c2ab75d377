"""`item2vec`: behaviour, items embedded by the sessions they share (trained in transforms/behaviour.py)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from transforms.config import ConfigError
from transforms.encoders.base import Encoder, l2_normalise

# item2vec's settings and their defaults: skip-gram with negative sampling over sessions (docs/behaviour.md).
# `sample` is word2vec's down-sampling of frequent items: off by default, as at 1e-3 (word2vec's) it ruined a
# 120-item catalog (neighbours from the own cluster 26% against 100%). 20 epochs, not gensim's 5: a log with
# about 12 sessions per item needs them (own cluster 2% at 5 epochs, 42% at 10, 100% at 20; docs/behaviour.md).
ITEM2VEC_DEFAULTS = {"dim": 64, "window": 5, "epochs": 20, "min_count": 1, "negative": 5, "sample": 0.0, "seed": 1}
# How the job trains, not what: how often every behaviour vector is trained again from the whole log (a new
# generation; between, a grown log writes only the items that had no vector, turned onto the stored ones:
# docs/behaviour.md, "Nightly"), and the training's threads (0: every core of the worker; 1 gives the same
# vectors on every run, more do not, as word2vec's threads race by design).
JOB_DEFAULTS = {"retrain_days": 7, "threads": 0}


class Item2VecEncoder(Encoder):
    """Behaviour: item2vec (Barkan & Koenigstein, 2016), word2vec's skip-gram with negative sampling over
    sessions of interactions, items in the role of words.

    Its vectors are not encoded one input at a time: the pipeline's training step (transforms/behaviour.py)
    trains them once over the whole interaction log, and an item's input is its id. The encoder id holds the
    generation of the vectors (`generation`, set by the plan: transforms/behaviour.py), not the log's content:
    a log that grew changes no stored vector until the next generation, every `retrain_days`, re-embeds this
    encoder's column and no other. Items that no session pairs with another item get no vector.
    """

    modality = "behaviour"
    job_options = frozenset({"interactions", "generation", *JOB_DEFAULTS})

    @classmethod
    def check_options(cls, name: str, options: dict[str, Any]) -> None:
        options = {k: v for k, v in options.items() if k not in ("interactions", "generation")}  # set by the job
        known = {**ITEM2VEC_DEFAULTS, **JOB_DEFAULTS}
        unknown = set(options) - set(known)
        if unknown:
            raise ConfigError(f"encoders.{name}: unknown item2vec settings {', '.join(sorted(unknown))}; "
                              f"use {', '.join(known)}")
        for key, value in options.items():
            if key == "sample":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                    raise ConfigError(f"encoders.{name}.sample must be a number from 0 to 1 (excluded), got {value!r}")
                continue
            least = 0 if key in ("seed", *JOB_DEFAULTS) else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"encoders.{name}.{key} must be an integer >= {least}, got {value!r}")

    @property
    def settings(self) -> dict[str, float]:
        return {key: self.config.options.get(key, default) for key, default in ITEM2VEC_DEFAULTS.items()}

    @property
    def retrain_days(self) -> int:
        return int(self.config.options.get("retrain_days", JOB_DEFAULTS["retrain_days"]))

    def threads(self, turned: bool) -> int:
        """The training's threads: as set, or at 0 every core where the new vectors are turned onto stored ones
        (`turned`: the rotation absorbs the racing threads' noise) and one where not (a first training: a run
        that resumes another must train the same vectors)."""
        threads = int(self.config.options.get("threads", JOB_DEFAULTS["threads"]))
        return threads or (os.cpu_count() or 1 if turned else 1)

    @property
    def generation(self) -> str | None:
        """Which training of the whole log its vectors belong to (transforms/behaviour.py); None outside a run."""
        return self.config.options.get("generation")

    @property
    def interactions(self) -> str:
        return self.config.options["interactions"]

    @property
    def dim(self) -> int:
        return int(self.settings["dim"])

    def describe(self) -> dict[str, Any]:
        return {"model": "item2vec-sgns", **self.settings, "interactions": self.generation}

    def load(self) -> Any:
        raise TypeError("item2vec vectors are trained over the whole interaction log (transforms/behaviour.py), "
                        "not loaded and encoded per input")

    def embed(self, model: Any, prepared: Any, memo: dict | None = None) -> np.ndarray:
        return self.load()

    def train(self, sessions: Iterable[list[str]], threads: int = 1) -> tuple[list[str], np.ndarray]:
        """Item ids and their unit vectors, trained on `sessions`, an iterable that can be iterated again
        (once to count items, once per epoch), on `threads` threads."""
        from gensim.models import Word2Vec

        settings = self.settings
        model = Word2Vec(vector_size=settings["dim"], window=settings["window"], epochs=settings["epochs"],
                         min_count=settings["min_count"], negative=settings["negative"], sample=settings["sample"],
                         seed=settings["seed"], sg=1, workers=threads)
        model.build_vocab(sessions)
        if not model.wv.index_to_key:         # no item seen min_count times
            return [], np.zeros((0, self.dim), np.float32)
        model.train(sessions, total_examples=model.corpus_count, epochs=model.epochs)
        return list(model.wv.index_to_key), l2_normalise(model.wv.vectors)
