"""The job's YAML configuration, parsed into typed, validated objects.

Every problem in a config is a `ConfigError` raised before any work starts; the command line turns
it into one line on stderr and exit code 2.

This module sits below all others and imports none of ours (tests/test_layers.py). What an encoder kind
takes beyond the common settings is checked by its class when the encoders are built (transforms/encoders).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import yaml

CATALOG_FORMATS = ("manifest", "food101", "fashion", "digikala")
INTERACTION_COLUMNS = ("session_id", "item_id")   # and optionally `ts`
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RUNTIME_KEYS = frozenset({"batch_size", "device", "large_model", "model_copies"})   # how it runs, not what it makes
CATALOG_RUNTIME_KEYS = frozenset({"http", "immutable_urls"})
# What each published layout brings with it unless the config says otherwise: the text to embed, the
# label, and the columns worth passing through. A manifest's columns are the user's to name.
FORMAT_PRESETS: dict[str, dict[str, Any]] = {
    "manifest": {},
    "food101": {"text_fields": ["name"], "fields": ["split"]},
    "fashion": {"text_fields": ["productDisplayName"], "label_field": "articleType",
                "fields": ["gender", "masterCategory", "subCategory", "baseColour", "season", "year", "usage"]},
    "digikala": {"fields": ["color"]},
}


class ConfigError(ValueError):
    """A configuration that cannot run. The message is one line, fit for a terminal."""


def column_name(field_name: str) -> str:
    """A catalog field's column in the table. A path into structs (`attributes.color`) has `_` for `.`,
    which Lance does not allow in a column's name: `attributes_color`."""
    return field_name.replace(".", "_")


@dataclass(frozen=True)
class CsvFormat:
    """How a CSV catalog is written (RFC 4180 with these characters; quoted fields may hold line breaks)."""

    delimiter: str = ","
    quotechar: str = '"'
    encoding: str = "utf-8"


@dataclass(frozen=True)
class HttpSettings:
    """How images named by http(s) URL are fetched: politely, and within limits (docs/catalogs.md, "Images by URL")."""

    max_per_host: int = 16          # requests in flight to one host, per worker process
    max_per_worker: int = 64        # requests in flight from one worker process, all hosts together
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0    # the longest wait for the next bytes of a response
    retries: int = 4                # after the first try, on 429, 5xx, timeouts and refused connections
    backoff_s: float = 1.0          # the first retry's wait, doubled each time, unless Retry-After says
    max_retry_after_s: float = 120.0
    max_redirects: int = 5
    user_agent: str = "catalog-embed/0.2 (a nightly batch embedding job)"


@dataclass(frozen=True)
class CatalogConfig:
    format: str
    path: str
    id_field: str = "id"
    text_fields: tuple[str, ...] = ()
    image_field: str = "image"
    label_field: str | None = None
    fields: tuple[str, ...] = ()
    interactions: str | None = None   # session_id,item_id[,ts] rows for item2vec encoders
    csv: CsvFormat = CsvFormat()
    http: HttpSettings = HttpSettings()
    immutable_urls: bool = False      # an unchanged http(s) URL is an unchanged image: no request at all


@dataclass(frozen=True)
class EncoderConfig:
    """One encoder: `name` is the config key and the table column prefix (`<name>_vec`)."""

    name: str
    kind: str
    model: str | None = None
    weight: float = 1.0
    weights_file: str | None = None
    pretrained: str | None = None
    batch_size: int | str = "auto"   # or "auto": the fastest, measured on each worker's device
    device: str = "auto"
    precision: str = "auto"
    large_model: bool = False      # Beam serves one model per worker VM to its processes (RunInference)
    model_copies: int = 1          # or this many, shared by the processes
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputConfig:
    uri: str
    table: str
    write_batch_rows: int = 4096
    # A write batch is also cut after this many seconds (once it holds 256 rows), and staged: what a kill can lose
    # per worker. Measured in docs/safety.md, "What a kill costs".
    stage_seconds: float = 2.0
    on_missing: str = "delete"
    # Over this share of the table's rows deleted in one night, the run commits nothing (as rsync's --max-delete):
    # an export that lost rows must not take them out of the table. docs/safety.md.
    max_delete_ratio: float = 0.1
    retain_days: float = 30.0
    keep_runs: int = 2                  # the last runs' versions kept whatever retain_days says (maintain.py)
    index_min_rows: int = 10_000
    compact: bool = True
    # Lance-only object store settings (Lance's storage_options). Credentials and endpoints come from the
    # standard environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS), as for every library the job uses.
    storage_options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RunConfig:
    max_reject_ratio: float = 0.05      # over it, the run commits nothing (exit 1)
    warn_reject_ratio: float = 0.01     # over it, the run commits and exits 3, for the scheduler to alert
    warn_drift: float = 0.05            # likewise over this drift score in any column (docs/health.md)
    max_pixels: int = 100_000_000
    max_image_bytes: int = 50_000_000   # an image file or response body over it is a reject
    rehash: bool = False  # read and hash every image, whatever its stat says (e.g. a weekly run)
    # A budget of forward passes per run: a number for all encoders together, or one per encoder name
    # ({clip: 25000}); the rest is left for later runs, in backfill order (transforms/budget.py).
    max_encode: int | dict[str, int] | None = None
    backfill_order: str | None = None   # a pass-through field to encode first by ("-added_at": largest first)


@dataclass(frozen=True)
class Config:
    catalog: CatalogConfig
    encoders: tuple[EncoderConfig, ...]
    output: OutputConfig
    run: RunConfig = RunConfig()
    source_path: str = ""

    def encoder(self, name: str) -> EncoderConfig:
        return next(e for e in self.encoders if e.name == name)

    def normalised_weights(self) -> dict[str, float]:
        total = sum(e.weight for e in self.encoders)
        return {e.name: e.weight / total for e in self.encoders}

    def passthrough_fields(self) -> tuple[str, ...]:
        """Catalog fields copied into the table (names, or paths into structs), text fields first, once each."""
        return tuple(dict.fromkeys(self.catalog.text_fields + self.catalog.fields))

    def passthrough_columns(self) -> tuple[str, ...]:
        """Their columns in the table."""
        return tuple(column_name(name) for name in self.passthrough_fields())

    def config_hash(self) -> str:
        """What shapes the table's rows: the catalog and the encoders, not how or where they run. It is in
        the table's schema metadata, and a table whose schema changes is rewritten whole: a new batch size
        or reject level must not rewrite 100M rows."""
        encoders = [{k: v for k, v in asdict(e).items() if k not in RUNTIME_KEYS} for e in self.encoders]
        catalog = {k: v for k, v in asdict(self.catalog).items() if k not in CATALOG_RUNTIME_KEYS}
        data = {"catalog": catalog, "encoders": encoders}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_config(path: str) -> Config:
    """Read and validate a YAML config. Relative paths in it are relative to the working directory, and
    made absolute here: workers have working directories of their own."""
    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle)
    except FileNotFoundError as err:
        raise ConfigError(f"config file not found: {path}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {err}".replace("\n", " ")) from err
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping with catalog, encoders and output")
    return parse_config(raw, source_path=path)


def parse_config(raw: dict[str, Any], source_path: str = "") -> Config:
    unknown = set(raw) - {"catalog", "encoders", "output", "run"}
    if unknown:
        raise ConfigError(f"unknown top-level config keys: {', '.join(sorted(unknown))}")
    catalog = _parse_catalog(_section(raw, "catalog"))
    config = Config(
        catalog=catalog,
        encoders=_parse_encoders(_section(raw, "encoders"), catalog.interactions),
        output=_parse_output(_section(raw, "output")),
        run=_parse_run(raw.get("run") or {}),
        source_path=source_path,
    )
    _check_encoders_fit_catalog(config)
    _check_columns(config)
    _check_budget(config)
    return config


def absolute(path: str) -> str:
    """A local path made absolute here, where the command runs (a worker's working directory is its own);
    a URI as it is."""
    return path if "://" in path else os.path.abspath(path)


def _section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name)
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"config section '{name}' is missing or empty")
    return value


def _strings(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"catalog.{key} must be a list of field names")
    return tuple(value)


def _parse_catalog(raw: dict[str, Any]) -> CatalogConfig:
    fmt = raw.get("format")
    if fmt not in CATALOG_FORMATS:
        raise ConfigError(f"catalog.format '{fmt}' is unknown; use one of: {', '.join(CATALOG_FORMATS)}")
    path = raw.get("path")
    if not isinstance(path, str) or not path:
        raise ConfigError("catalog.path is required")
    if "://" not in path and not os.path.exists(path):
        raise ConfigError(f"catalog.path does not exist: {path}")
    path = absolute(path)
    allowed = {"format", "path", "id_field", "text_fields", "image_field", "label_field", "fields", "interactions",
               "csv", "http", "immutable_urls"}
    unknown = set(raw) - allowed
    if unknown:
        raise ConfigError(f"unknown catalog keys: {', '.join(sorted(unknown))}")
    raw = {**FORMAT_PRESETS[fmt], **raw}
    return CatalogConfig(
        format=fmt,
        path=path,
        id_field=raw.get("id_field", "id"),
        text_fields=_strings(raw.get("text_fields"), "text_fields"),
        image_field=raw.get("image_field", "image"),
        label_field=raw.get("label_field"),
        fields=_strings(raw.get("fields"), "fields"),
        interactions=_interactions_path(raw.get("interactions")),
        csv=_csv_format(raw.get("csv") or {}),
        http=_http_settings(raw.get("http") or {}),
        immutable_urls=_flag(raw.get("immutable_urls", False), "catalog.immutable_urls"),
    )


def _http_settings(raw: Any) -> HttpSettings:
    known = {f.name: f for f in fields(HttpSettings)}
    if not isinstance(raw, dict) or set(raw) - set(known):
        raise ConfigError(f"catalog.http must be a mapping of: {', '.join(known)}")
    for key, value in raw.items():
        if key == "user_agent":
            if not isinstance(value, str) or not value.strip():
                raise ConfigError("catalog.http.user_agent must be a non-empty string naming the job")
            continue
        least = 0 if key in ("retries", "backoff_s", "max_redirects", "max_retry_after_s") else 1e-9
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < least:
            raise ConfigError(f"catalog.http.{key} must be a number of at least {least:g}, got {value!r}")
        if known[key].type == "int" and not isinstance(value, int):
            raise ConfigError(f"catalog.http.{key} must be a whole number, got {value!r}")
    return HttpSettings(**raw)


def _flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def _csv_format(raw: Any) -> CsvFormat:
    """The CSV settings, checked: one-character delimiter and quote, and an encoding that writes them, and the
    line break, as their ASCII bytes (the reader finds records in the bytes; UTF-16 does not qualify)."""
    if not isinstance(raw, dict) or set(raw) - {"delimiter", "quotechar", "encoding"}:
        raise ConfigError("catalog.csv must be a mapping of delimiter, quotechar and encoding")
    found = CsvFormat(**raw)
    for key in ("delimiter", "quotechar"):
        value = getattr(found, key)
        if not isinstance(value, str) or len(value) != 1 or value in "\r\n":
            raise ConfigError(f"catalog.csv.{key} must be one character (not a line break), got {value!r}")
    try:
        written = (found.delimiter + found.quotechar + "\n").encode(found.encoding)
    except (LookupError, TypeError, UnicodeEncodeError):
        raise ConfigError(f"catalog.csv.encoding {found.encoding!r} is not an encoding Python knows, or cannot "
                          "write the delimiter and quote") from None
    if written != (found.delimiter + found.quotechar + "\n").encode("latin-1", "replace"):
        raise ConfigError(f"catalog.csv.encoding {found.encoding!r} does not write the delimiter, quote and line "
                          "break as single ASCII bytes; use utf-8, cp1252, latin-1 or another such encoding")
    return found


def _interactions_path(path: Any) -> str | None:
    if path is None:
        return None
    if not isinstance(path, str) or not path:
        raise ConfigError("catalog.interactions must be the path of a CSV, Parquet or JSONL file")
    if "://" not in path and not os.path.isfile(path):
        raise ConfigError(f"catalog.interactions does not exist: {path}")
    return absolute(path)


def _parse_encoders(raw: dict[str, Any], interactions: str | None) -> tuple[EncoderConfig, ...]:
    encoders = tuple(_parse_encoder(name, spec) for name, spec in raw.items())
    # An item2vec encoder's input is the interaction log: it travels with the encoder (into the table's metadata).
    encoders = tuple(replace(e, options={**e.options, "interactions": interactions}) if e.kind == "item2vec" else e
                     for e in encoders)
    if sum(e.weight for e in encoders) <= 0:
        raise ConfigError("encoder weights are all zero; give at least one encoder a weight > 0")
    return encoders


def _parse_encoder(name: str, raw: Any) -> EncoderConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"encoders.{name} must be a mapping with at least 'kind'")
    if not name.isidentifier():
        raise ConfigError(f"encoder name '{name}' must be a plain identifier (it names a column)")
    kind = raw.get("kind")
    if not isinstance(kind, str) or not kind:
        raise ConfigError(f"encoders.{name}.kind is required: one of the encoder kinds (docs/encoders.md)")
    weight = raw.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise ConfigError(f"encoders.{name}.weight must be a number >= 0, got {weight!r}")
    batch_size = raw.get("batch_size", "auto")
    if batch_size != "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"encoders.{name}.batch_size must be a positive integer or 'auto', got {batch_size!r}")
    device = raw.get("device", "auto")
    if device not in DEVICES:
        raise ConfigError(f"encoders.{name}.device '{device}' is unknown; use one of: {', '.join(DEVICES)}")
    precision = raw.get("precision", "auto")
    if precision not in PRECISIONS:
        raise ConfigError(f"encoders.{name}.precision '{precision}' is unknown; use one of: {', '.join(PRECISIONS)}")
    large_model = raw.get("large_model", False)
    if not isinstance(large_model, bool):
        raise ConfigError(f"encoders.{name}.large_model must be true or false, got {large_model!r}")
    copies = raw.get("model_copies", 1)
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ConfigError(f"encoders.{name}.model_copies must be a positive integer, got {copies!r}")
    known = {"kind", "model", "weight", "weights_file", "pretrained", "batch_size", "device", "precision",
             "large_model", "model_copies"}
    return EncoderConfig(
        name=name,
        kind=kind,
        model=raw.get("model"),
        weight=float(weight),
        weights_file=raw.get("weights_file"),
        pretrained=raw.get("pretrained"),
        batch_size=batch_size,
        device=device,
        precision=precision,
        large_model=large_model,
        model_copies=copies,
        options={k: v for k, v in raw.items() if k not in known},
    )


def _parse_output(raw: dict[str, Any]) -> OutputConfig:
    for key in ("uri", "table"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ConfigError(f"output.{key} is required")
    unknown = set(raw) - {f.name for f in fields(OutputConfig)}
    if unknown:
        raise ConfigError(f"unknown output keys: {', '.join(sorted(unknown))}")
    for key in ("write_batch_rows", "index_min_rows", "keep_runs"):
        if key in raw and (isinstance(raw[key], bool) or not isinstance(raw[key], int) or raw[key] < 1):
            raise ConfigError(f"output.{key} must be a positive integer, got {raw[key]!r}")
    seconds = raw.get("stage_seconds", OutputConfig.stage_seconds)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
        raise ConfigError(f"output.stage_seconds must be a number of seconds > 0, got {seconds!r}")
    ratio = raw.get("max_delete_ratio", OutputConfig.max_delete_ratio)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        raise ConfigError(f"output.max_delete_ratio must be a share of the table's rows from 0 to 1, got {ratio!r}")
    if raw.get("on_missing", "delete") not in ("delete", "keep"):
        raise ConfigError(f"output.on_missing must be 'delete' or 'keep', got {raw['on_missing']!r}")
    if not isinstance(raw.get("retain_days", 30.0), (int, float)) or raw.get("retain_days", 30.0) < 0:
        raise ConfigError(f"output.retain_days must be a number of days >= 0, got {raw['retain_days']!r}")
    storage = raw.get("storage_options") or {}
    if not isinstance(storage, dict) or not all(isinstance(v, (str, int, float, bool)) for v in storage.values()):
        raise ConfigError("output.storage_options must map Lance's storage option names to values, e.g. "
                          "{aws_virtual_hosted_style_request: true}")
    storage = {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in storage.items()}
    return OutputConfig(**dict(raw, uri=absolute(raw["uri"]), storage_options=storage))


def _parse_run(raw: dict[str, Any]) -> RunConfig:
    unknown = set(raw) - {f.name for f in fields(RunConfig)}
    if unknown:
        raise ConfigError(f"unknown run keys: {', '.join(sorted(unknown))}")
    settings: dict[str, Any] = {}      # the ratios and limits, checked
    for key, most in (("max_reject_ratio", 1), ("warn_reject_ratio", 1), ("warn_drift", 2)):
        ratio = raw.get(key, getattr(RunConfig, key))
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= most:
            raise ConfigError(f"run.{key} must be a number from 0 to {most}, got {ratio!r}")
        settings[key] = float(ratio)
    for key in ("max_pixels", "max_image_bytes"):
        limit = raw.get(key, getattr(RunConfig, key))
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"run.{key} must be a positive integer, got {limit!r}")
        settings[key] = limit
    return RunConfig(**settings, rehash=_flag(raw.get("rehash", False), "run.rehash"),
                     max_encode=_budget(raw.get("max_encode")),
                     backfill_order=_backfill_order(raw.get("backfill_order")))


def _budget(raw: Any) -> int | dict[str, int] | None:
    def count(value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{key} must be a whole number of forward passes, 0 or more, got {value!r}")
        return value

    if raw is None or isinstance(raw, int):
        return None if raw is None else count(raw, "run.max_encode")
    if isinstance(raw, dict) and raw:
        return {str(name): count(value, f"run.max_encode.{name}") for name, value in raw.items()}
    raise ConfigError(f"run.max_encode must be a number, or a number per encoder name, got {raw!r}")


def _backfill_order(raw: Any) -> str | None:
    if raw is not None and (not isinstance(raw, str) or not raw.lstrip("-")):
        raise ConfigError(f"run.backfill_order must be a field name (\"-name\": largest first), got {raw!r}")
    return raw


def _check_columns(config: Config) -> None:
    """Two fields may not land in one column (`a.b` and `a_b`)."""
    seen: dict[str, str] = {}
    for name in config.passthrough_fields():
        other = seen.setdefault(column_name(name), name)
        if other != name:
            raise ConfigError(f"catalog fields {other!r} and {name!r} would both be the column {column_name(name)!r}")


def _check_budget(config: Config) -> None:
    budget, order = config.run.max_encode, config.run.backfill_order
    if isinstance(budget, dict):
        for name in budget:
            if name not in {e.name for e in config.encoders}:
                raise ConfigError(f"run.max_encode.{name}: there is no encoder {name!r}")
            if config.encoder(name).kind == "item2vec":
                raise ConfigError(f"run.max_encode.{name}: item2vec trains on the whole log in one run, "
                                  "it takes no budget")
    if order is not None and order.lstrip("-") not in {"id", *config.passthrough_fields()}:
        raise ConfigError(f"run.backfill_order: {order.lstrip('-')!r} is not id or a field the table keeps "
                          "(catalog.fields or text_fields)")


def _check_encoders_fit_catalog(config: Config) -> None:
    behaviour = [e.name for e in config.encoders if e.kind == "item2vec"]
    if behaviour and not config.catalog.interactions:
        raise ConfigError(f"encoders.{behaviour[0]} is an item2vec encoder: it needs catalog.interactions, "
                          "a file of session_id,item_id[,ts] rows")
    if config.catalog.interactions and not behaviour:
        raise ConfigError("catalog.interactions is set but no encoder uses it; add one with kind: item2vec")
    for enc in config.encoders:
        encodes_text = enc.kind == "sentence-transformers" or enc.options.get("input") == "text"
        if encodes_text and not config.catalog.text_fields:
            raise ConfigError(f"encoders.{enc.name} encodes text but catalog.text_fields is empty")
