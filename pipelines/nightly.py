"""The nightly job: read -> load and fingerprint -> encode per encoder -> combine -> write -> commit.

`run_job` builds what the pipeline needs on the launcher (encoder ids and dimensions, the table
schema, the table version the run starts from), then runs the graph on whichever Beam runner the
options name (DirectRunner by default) and returns the run's record.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import apache_beam as beam
import pyarrow as pa
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipelines.config import Config, ConfigError
from transforms.combine import combine
from transforms.commit import CommitRun, RunContext
from transforms.compare import DELETES, UNCHANGED, ReadTableRows, compare_with_table
from transforms.encoders import Encoder, build_encoder
from transforms.fingerprint import LoadInputs
from transforms.inference import EncodeWith
from transforms.items import ITEMS, REJECTS
from transforms.lance_sink import WriteFragments, dataset_uri, open_dataset, table_metadata, table_schema
from transforms.progress import LogProgress
from transforms.readers import ReadCatalog
from transforms.run_log import read_runs, utc_now

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobPlan:
    """Everything fixed before the graph runs."""

    config: Config
    encoders: tuple[Encoder, ...]
    schema: pa.Schema
    context: RunContext


def plan_job(config: Config, run_id: str, reembed: bool = False) -> JobPlan:
    encoders = tuple(build_encoder(e) for e in config.encoders)
    weights = config.normalised_weights()
    described = [
        {"name": e.name, "kind": e.config.kind, "dim": e.dim, "weight": weights[e.name], "id": e.encoder_id,
         "config": _encoder_config(e)}
        for e in encoders
    ]
    meta = {"encoders": described, "order": [e.name for e in encoders], "config_hash": config.config_hash()}
    schema = table_schema(config.passthrough_columns(), described, meta)
    uri = dataset_uri(config.output.uri, config.output.table)
    current = open_dataset(uri)
    if current is not None and not reembed:
        _check_table_fits(config.output.table, table_metadata(current.schema), described)
    context = RunContext(
        output=config.output, max_reject_ratio=config.run.max_reject_ratio, dataset_uri=uri, run_id=run_id,
        config_hash=config.config_hash(),
        encoder_ids={e.name: e.encoder_id for e in encoders},
        read_version=current.version if current is not None else None,
        # Another encoder set or weighting changes the schema: every row is rewritten.
        overwrite=current is not None and not current.schema.equals(schema, check_metadata=True),
        started_at=utc_now(),
    )
    return JobPlan(config, encoders, schema, context)


def build_pipeline(pipeline: beam.Pipeline, plan: JobPlan) -> None:
    config = plan.config
    read = pipeline | "Read catalog" >> ReadCatalog(config.catalog, config.passthrough_columns())
    loaded = (
        read[ITEMS]
        | "Log read" >> beam.ParDo(LogProgress("read"))
        | "Load inputs" >> beam.ParDo(LoadInputs({e.name: (e.encoder_id, e.modality) for e in plan.encoders},
                                                 config.run.max_pixels))
        .with_outputs(REJECTS, main=ITEMS)
    )
    compared = compare_with_table(loaded[ITEMS], _stored_rows(pipeline, plan), plan.context.output.on_missing
                                  == "delete", plan.context.overwrite)
    items, rejects = compared[ITEMS], [read[REJECTS], loaded[REJECTS], compared[REJECTS]]
    # Image encoders first: the image bytes are then dropped and never cross the text stages' shuffles.
    for modality in ("image", "text"):
        for encoder in (e for e in plan.encoders if e.modality == modality):
            encoded = items | f"Encode {encoder.name}" >> EncodeWith(encoder)
            items = encoded[ITEMS] | f"Count {encoder.name}" >> beam.ParDo(LogProgress(f"encoded_{encoder.name}"))
            rejects.append(encoded[REJECTS])
        if modality == "image":
            items = items | "Drop image bytes" >> beam.Map(_without_image_bytes)
    weights, order = config.normalised_weights(), [e.name for e in plan.encoders]
    written = (
        items
        | "Combine" >> beam.Map(_with_combined_vector, weights, order)
        # Fixed-size batches: each is one Lance fragment, and small fragments make slow tables.
        | "Batch rows" >> beam.BatchElements(min_batch_size=config.output.write_batch_rows,
                                             max_batch_size=config.output.write_batch_rows)
        | "Write fragments" >> beam.ParDo(WriteFragments(
            plan.context.dataset_uri, plan.schema, plan.context.run_id, plan.context.overwrite))
    )
    all_rejects = rejects | "All rejects" >> beam.Flatten() | "Count rejects" >> beam.ParDo(LogProgress("rejected"))
    unchanged = compared[UNCHANGED] | "Count unchanged" >> beam.combiners.Count.Globally()
    # Counted as read, independently of the outcomes, so that the summary can check they add up.
    rows_read = (
        (read[ITEMS], read[REJECTS]) | "Rows read" >> beam.Flatten() | "Count read" >> beam.combiners.Count.Globally()
    )
    (
        pipeline
        | "Once" >> beam.Create([None])
        | "Commit" >> beam.ParDo(
            CommitRun(plan.context, plan.schema), written=beam.pvalue.AsList(written),
            rejects=beam.pvalue.AsList(all_rejects), deletes=beam.pvalue.AsList(compared[DELETES]),
            unchanged=beam.pvalue.AsList(unchanged), read=beam.pvalue.AsList(rows_read))
    )


def _stored_rows(pipeline: beam.Pipeline, plan: JobPlan):
    """The table's rows at the version the run started from (none on the first run)."""
    if plan.context.read_version is None:
        return pipeline | "No stored rows" >> beam.Create([])
    return pipeline | "Read table" >> ReadTableRows(
        plan.context.dataset_uri, plan.context.read_version, [e.name for e in plan.encoders],
        list(plan.config.passthrough_columns()))


def run_job(config: Config, run_id: str, beam_args: Sequence[str], reembed: bool = False) -> dict:
    """Run the job to completion and return its row of `<table>_runs`."""
    options = PipelineOptions(list(beam_args))
    if not options.view_as(StandardOptions).runner:
        options.view_as(StandardOptions).runner = "DirectRunner"
    plan = plan_job(config, run_id, reembed)
    log.info("run %s: %s -> %s (from version %s)", run_id, config.catalog.path, plan.context.dataset_uri,
             plan.context.read_version)
    with beam.Pipeline(options=options) as pipeline:
        build_pipeline(pipeline, plan)
    return next(r for r in reversed(read_runs(config.output.uri, config.output.table)) if r["run_id"] == run_id)


def _check_table_fits(table: str, stored: dict, described: list[dict]) -> None:
    """A table embedded with other encoders is re-embedded only when asked: it costs a full run."""
    before = {e["name"]: e["id"] for e in stored.get("encoders", [])}
    now = {e["name"]: e["id"] for e in described}
    if before != now:
        changed = sorted(set(before.items()) ^ set(now.items()))
        names = sorted({name for name, _ in changed})
        raise ConfigError(f"table '{table}' was embedded with other encoders ({', '.join(names)} differ); "
                          "run with --reembed to re-embed it into a new version")


def _without_image_bytes(item: dict) -> dict:
    return {key: value for key, value in item.items() if key != "image_bytes"}


def _with_combined_vector(item: dict, weights: dict, order: list[str]) -> dict:
    item["vectors"]["vector"] = combine(item["vectors"], weights, order)
    return item


def _encoder_config(encoder: Encoder) -> dict:
    cfg = encoder.config
    return {"kind": cfg.kind, "model": cfg.model, "weights_file": cfg.weights_file, "pretrained": cfg.pretrained,
            "options": cfg.options}
