"""Encoders: one module per kind, and the registry that maps a config's `kind` to its class.

`base.Encoder` is what every kind builds on. Beside the kinds live the helpers they share, each on one
concern: `precision` (what `precision: auto` means on a device), `model_cache` (one copy per process of a
model), `digests` (what identifies weights), `downloads` (models that must be fetched), `cnn_models` (the
ImageNet networks) and `query_models` (networks exported for queries).

May import: `transforms.config`, `transforms.derived`, `transforms.images`, and the model libraries (inside
functions, so that importing an encoder stays cheap). Never `pipelines`.

A new kind is a module with an `Encoder` subclass and one line in `ENCODERS` (CONTRIBUTING.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from transforms.config import ConfigError, EncoderConfig
from transforms.encoders.base import Encoder
from transforms.encoders.clip import OpenClipEncoder
from transforms.encoders.cnn import CnnEncoder
from transforms.encoders.color import ColorEncoder
from transforms.encoders.conse import ConseEncoder
from transforms.encoders.item2vec import Item2VecEncoder
from transforms.encoders.precision import auto_precision, device_type_of
from transforms.encoders.sentence_transformer import SentenceTransformerEncoder

ENCODERS: dict[str, type[Encoder]] = {
    "sentence-transformers": SentenceTransformerEncoder,
    "cnn": CnnEncoder,
    "color": ColorEncoder,
    "open-clip": OpenClipEncoder,
    "conse": ConseEncoder,
    "item2vec": Item2VecEncoder,
}


def build_encoder(config: EncoderConfig, precision: str | None = None) -> Encoder:
    """The encoder a config names, its kind's settings checked; `precision`: what its `precision: auto`
    runs at, where the plan decided it for other machines (Encoder.precision)."""
    kind = ENCODERS.get(config.kind)
    if kind is None:
        raise ConfigError(f"encoders.{config.name}.kind '{config.kind}' is unknown; use one of: {', '.join(ENCODERS)}")
    kind.check_options(config.name, config.options)
    return kind(config, precision)


def build_encoders(configs: Sequence[EncoderConfig], worker_device_type: str | None = None) -> tuple[Encoder, ...]:
    """A job's encoders. A `cnn` left at `precision: auto` takes the precision of a `conse` on the same
    network, so that the network still runs once per batch for both (a second pass costs more than bf16
    saves).

    `worker_device_type` is the device of a remote runner's workers ("cuda" or "cpu"): `precision: auto`
    is then decided for it, not for this machine (a CPU there is taken not to do bf16)."""
    encoders = [build_encoder(c, auto_precision(c.kind, device_type_of(c.device, worker_device_type), False)
                              if worker_device_type else None) for c in configs]
    shared = {e.parts[0].network: e.precision for e in encoders if isinstance(e, ConseEncoder)}
    return tuple(
        build_encoder(e.config, shared[e.network])
        if isinstance(e, CnnEncoder) and e.config.precision == "auto" and e.network in shared else e
        for e in encoders)
