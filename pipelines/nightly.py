"""The nightly job: read -> inspect -> compare -> ask image URLs -> budget -> encode per modality -> keep ->
behaviour -> combine -> write -> remove replaced and deleted rows -> commit -> upkeep.

Beside it, when an encoder is item2vec: read the interaction log -> sessions -> train once (behaviour.py).

Elements carry references (paths, digests, ids), never image bytes or stored vectors: a picture's bytes are
read once, where they are hashed and decoded (a URL's where it is fetched), stored vectors only for the items
written again that keep them.

What the run does to each row, and so what the table keeps when an input fails, is transforms/lifecycle.py:
a row that fails before the compare is `held` by its id, one that fails after it knows its stored row, and
only replaced and deleted rows leave the table.

A dry run takes the same path up to the decisions, then counts them instead (transforms/plan.py).

`run_job` builds what the pipeline needs on the launcher (encoder ids and dimensions, the table
schema, the table version the run starts from), then runs the graph on whichever Beam runner the
options name (Beam's FnApiRunner by default, pipelines/runners.py) and returns the run's record.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import apache_beam as beam
import lance
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

from pipelines.runners import check_paths_reach_workers, pipeline_runner, runner_name, worker_device_type
from pipelines.scratch import open_scratch, remove_scratch, remove_stale_scratch, scratch_folder, scratch_root
from transforms.behaviour import AttachBehaviourVectors, behaviour_vectors, with_generations
from transforms.budget import DEFERRED, apply_budget, budget_scopes
from transforms.combine import combine
from transforms.commit import COMMITTING, CommitRun, RunContext, Upkeep, settle, upkeep_owed
from transforms.compare import ABSENT, DELETES, UNCHANGED, DecideWork, ReadTableSummaries, compare_with_table
from transforms.config import Config, ConfigError
from transforms.encoders import build_encoders
from transforms.encoders.base import Encoder, same_vectors, without_data
from transforms.encoders.sentence_transformer import SentenceTransformerEncoder
from transforms.fingerprint import HashImages, InspectInputs, has_input
from transforms.inference import ENCODE_ORDER, EncodeModality, needs
from transforms.interaction_log import check_interactions
from transforms.items import HELD, ITEMS, REJECTS, failed
from transforms.lance_sink import (
    REPLACED,
    WriteFragments,
    dataset_uri,
    only_weights_differ,
    open_dataset,
    table_metadata,
    table_schema,
)
from transforms.lifecycle import RemoveRows, SortReadRejects
from transforms.plan import count, count_plan
from transforms.progress import KnowWork, LogProgress, LogWork
from transforms.readers import ReadCatalog
from transforms.reuse import FetchKeptVectors
from transforms.run_lease import Lease, is_gone
from transforms.run_log import WriteRejects, read_runs, record_run, upgrade_side_tables, utc_now
from transforms.staging import (
    STAGED,
    STAGED_FRAGMENTS,
    BatchRows,
    ReadStagedRows,
    adopt_staging,
    resume,
    staging_folder,
)
from transforms.storage import ImageReader
from transforms.table_commit import RunIdentity, committed_version

log = logging.getLogger(__name__)
REJECT_BATCH = 10_000  # rejects per fragment of the rejects table


@dataclass(frozen=True)
class JobPlan:
    """Everything fixed before the graph runs."""

    config: Config
    encoders: tuple[Encoder, ...]
    schema: pa.Schema
    context: RunContext
    rehash: bool
    reembed: bool                   # encode every item again, keeping no stored vector
    scratch: str                    # the run's own folder for what it makes on the way (trained vectors)
    plan_path: str | None = None    # a dry run: where the plan goes, instead of encoding and writing
    staged_batches: tuple[str, ...] = ()    # what a run that died wrote from the same version (staging.py)
    earlier_ids: dict = field(default_factory=dict)     # encoder -> the id its stored fingerprints were made with


def plan_job(config: Config, run_id: str, root: str, reembed: bool = False, rehash: bool = False,
             worker_device_type: str | None = None, runs: Sequence[dict] = ()) -> JobPlan:
    """`root`: where runs keep their scratch and staging (pipelines/scratch.py). `worker_device_type`: the
    device of a remote runner's workers, for `precision: auto` (runners.py). `runs`: the table's runs so far
    (whether upkeep is owed: commit.py; the behaviour vectors' generation: behaviour.py)."""
    if config.catalog.interactions:
        check_interactions(config.catalog.interactions)
    uri = dataset_uri(config.output.uri, config.output.table)
    current = open_dataset(uri, config.output.storage_options)
    rows_before = current.count_rows() if current is not None else 0
    encoders = with_generations(build_encoders(config.encoders, worker_device_type), runs, run_id, utc_now().date(),
                                rows_before)
    described = describe_encoders(encoders, config.normalised_weights())
    # Only what defines the vectors: another catalog path, working directory or scheduler machine is the same table.
    meta = {"encoders": described, "order": [e.name for e in encoders]}
    functions = [e.lancedb_function() for e in encoders if isinstance(e, SentenceTransformerEncoder)]
    schema = table_schema(config.passthrough_columns(), described, meta, [f for f in functions if f])
    if current is not None:
        _log_encoder_changes(table_metadata(current.schema), described)
    # New weights alone rewrite the combined column of the stored rows; another encoder set, a new table.
    reweigh = current is not None and not reembed and only_weights_differ(current.schema, schema)
    context = RunContext(
        output=config.output, max_reject_ratio=config.run.max_reject_ratio,
        max_delete_ratio=config.output.max_delete_ratio, dataset_uri=uri,
        run=RunIdentity(run_id, uuid.uuid4().hex), config_hash=config.config_hash(),
        encoder_ids={e.name: e.encoder_id for e in encoders},
        read_version=current.version if current is not None else None,
        rows_before=rows_before, upkeep_owed=upkeep_owed(runs),
        # Another encoder set changes the schema: every row is rewritten, from the stored vectors of the encoders
        # that did not change.
        overwrite=current is not None and not reweigh and (reembed or not current.schema.equals(
            schema, check_metadata=True)),
        reweigh=reweigh,
        started_at=utc_now(),
        staging=staging_folder(root, config.output.table, config.config_hash(), current and current.version, run_id,
                               reembed),
        budget=budget_scopes(config.run.max_encode),
        interactions=config.catalog.interactions,
    )
    return JobPlan(config, encoders, schema, context, rehash or config.run.rehash, reembed,
                   scratch_folder(root, config.output.table, run_id),
                   earlier_ids=_earlier_ids(current.schema, encoders) if current is not None else {})


def _earlier_ids(stored: pa.Schema, encoders: Sequence[Encoder]) -> dict[str, str]:
    """The encoders whose stored fingerprints an earlier build made with another id for the same vectors (a
    resolved `precision: auto`): their ids then, so that the rows keep their vectors and are written once with
    today's fingerprints, instead of being encoded again."""
    ids = {e["name"]: e["id"] for e in table_metadata(stored).get("encoders", [])}
    return {e.name: ids[e.name] for e in encoders if e.name in ids and without_data(ids[e.name])
            != without_data(e.encoder_id) and same_vectors(ids[e.name], e.encoder_id)}


def describe_encoders(encoders: Sequence[Encoder], weights: dict[str, float]) -> list[dict]:
    """The encoders as the table's metadata describes them: what queries rebuild them from."""
    return [{"name": e.name, "kind": e.config.kind, "dim": e.dim, "weight": weights[e.name],
             "id": without_data(e.encoder_id), "config": _encoder_config(e)} for e in encoders]


def build_pipeline(pipeline: beam.Pipeline, plan: JobPlan) -> None:
    config, ctx = plan.config, plan.context
    storage = config.output.storage_options
    inputs = {e.name: (e.encoder_id, e.modality) for e in plan.encoders}
    reader = ImageReader(config.catalog.http, config.run.max_image_bytes, config.run.max_pixels)
    read = pipeline | "Read catalog" >> ReadCatalog(config.catalog, config.passthrough_fields())
    # A read reject with an id holds that id's stored row; one without an id could have held any: no deletions.
    read_rejects = read[REJECTS] | "Sort read rejects" >> beam.ParDo(SortReadRejects()).with_outputs(
        HELD, main=REJECTS)
    inspected = (
        read[ITEMS]
        | "Log read" >> beam.ParDo(LogProgress("read"))
        | "Inspect inputs" >> beam.ParDo(InspectInputs(frozenset(m for _, m in inputs.values()),
                                                       config.catalog.immutable_urls))
        .with_outputs(HELD, main=ITEMS)
    )
    staged = pipeline | "Staged rows" >> ReadStagedRows(plan.staged_batches, ctx.dataset_uri)
    staged_rows = staged[ITEMS]
    held = (read_rejects[HELD], inspected[HELD]) | "Held rejects" >> beam.Flatten()
    compared = compare_with_table(inspected[ITEMS], _stored_summaries(pipeline, plan), staged_rows, held,
                                  count(read_rejects[REJECTS], "unclean reads"), ctx.output.on_missing == "delete",
                                  plan.rehash)
    copies = FileSystems.join(plan.scratch, "images")
    hashed = compared[ITEMS] | "Hash URLs and rehashed files" >> beam.ParDo(
        HashImages(reader, plan.rehash, copies)).with_outputs(REJECTS, main=ITEMS)
    decided = hashed[ITEMS] | "Decide work" >> beam.ParDo(
        DecideWork(inputs, ctx.overwrite, not plan.reembed, plan.earlier_ids)).with_outputs(UNCHANGED, main=ITEMS)
    budgeted = apply_budget(decided[ITEMS], plan.encoders, config.run.max_encode, config.run.backfill_order)
    items = budgeted[ITEMS]
    backfill = {"deferred": count(budgeted[DEFERRED], "deferred"), "waiting": budgeted["waiting"],
                "with_input": _inputs_per_encoder(pipeline, hashed[ITEMS], plan)}
    rejects = [read_rejects[REJECTS], compared[REJECTS], hashed[REJECTS]]
    behaviour = {}
    if config.catalog.interactions and not plan.plan_path:
        table = (ctx.dataset_uri, ctx.read_version) if ctx.read_version is not None else None
        trained, log_rejects, log_rows = behaviour_vectors(pipeline, config.catalog.interactions, plan.encoders,
                                                           items, plan.scratch, storage, table)
        rejects.append(log_rejects)
        behaviour = {"trained": beam.pvalue.AsList(trained), "interactions_read": beam.pvalue.AsSingleton(log_rows)}
    # Counted as read, independently of the outcomes, so that the summary can check they add up.
    rows_read = (
        (read[ITEMS] | "Count items read" >> beam.combiners.Count.Globally(),
         read[REJECTS] | "Count rejects read" >> beam.combiners.Count.Globally())
        | "Both counts" >> beam.Flatten()
        | "Rows read" >> beam.CombineGlobally(sum)
    )
    if plan.plan_path:
        count_plan(pipeline, items, decided[UNCHANGED], compared[DELETES], rejects | "Rejects so far" >> beam.Flatten(),
                   beam.pvalue.AsSingleton(rows_read), {e.name: e.modality for e in plan.encoders}, plan.plan_path,
                   backfill, ctx.budget)
        return
    resumed = resume(items, staged_rows, inputs)
    items = resumed[ITEMS]
    items = items | "Know the work" >> beam.ParDo(KnowWork(), _encode_work(pipeline, items, plan.encoders))
    for modality in [m for m in ENCODE_ORDER if any(e.modality == m for e in plan.encoders)]:
        encoded = items | f"Encode {modality}" >> EncodeModality(modality, plan.encoders, reader)
        items = encoded[ITEMS] | f"Count {modality}" >> beam.ParDo(
            LogProgress(f"encoded_{modality}", work_key=("modality", modality)))
        rejects.append(encoded[REJECTS])
    batches = (
        items
        # Each batch is one Lance fragment, and small fragments make slow tables; each is also staged, so that a
        # kill loses at most stage_seconds of work.
        | "Batch rows" >> beam.ParDo(BatchRows(config.output.write_batch_rows, config.output.stage_seconds))
        | "Kept vectors" >> beam.ParDo(FetchKeptVectors(ctx.dataset_uri, ctx.read_version, storage))
    )
    if behaviour:
        batches |= "Behaviour vectors" >> beam.ParDo(AttachBehaviourVectors(plan.encoders, storage),
                                                     behaviour["trained"])
    combined = batches | "Combine" >> beam.ParDo(
        CombineVectors(config.normalised_weights(), {e.name: e.dim for e in plan.encoders})).with_outputs(
        REJECTS, main=ITEMS)
    rejects.append(combined[REJECTS])
    writer = WriteFragments(ctx.dataset_uri, plan.schema, ctx.run_id, ctx.overwrite, inputs, ctx.staging, storage)
    written = combined[ITEMS] | "Write fragments" >> beam.ParDo(writer).with_outputs(REPLACED, main=ITEMS)
    replaced_by_staged = resumed[STAGED] | "Staged replacing" >> beam.Filter(lambda pair: pair[0] is not None)
    removals = _removals(pipeline, plan, (written[REPLACED], replaced_by_staged, compared[DELETES]))
    reject_batches = (
        rejects
        | "All rejects" >> beam.Flatten()
        | "Count rejects" >> beam.ParDo(LogProgress("rejected"))
        | "Batch rejects" >> beam.BatchElements(min_batch_size=REJECT_BATCH, max_batch_size=REJECT_BATCH)
        | "Write rejects" >> beam.ParDo(WriteRejects(ctx.output.uri, ctx.output.table, ctx.run_id, storage))
    )
    (
        pipeline
        | "Once" >> beam.Create([None])
        | "Commit" >> beam.ParDo(
            CommitRun(ctx, plan.schema), written=beam.pvalue.AsList(written[ITEMS]),
            rejects=beam.pvalue.AsList(reject_batches), removals=beam.pvalue.AsList(removals),
            deleted=count(compared[DELETES], "deleted"), absent=count(compared[ABSENT], "absent"),
            unchanged=count(decided[UNCHANGED], "unchanged"), read=beam.pvalue.AsSingleton(rows_read),
            matched=resumed["matched"], sizes=resumed["sizes"],
            staged=beam.pvalue.AsDict(staged[STAGED_FRAGMENTS]), **backfill, **behaviour)
        | "Its own step" >> beam.Reshuffle()        # a retried upkeep does not run the commit again
        | "Upkeep" >> beam.ParDo(Upkeep(ctx))
    )


def _inputs_per_encoder(pipeline: beam.Pipeline, items, plan: JobPlan):
    """Per budgeted encoder, the items that have its input: what its column holds once a backfill is done.
    Counted only under a budget, so that an unchanged run pays nothing for it."""
    if not plan.context.budget:
        counted = pipeline | "No budget" >> beam.Create([])
    else:
        budgeted = [e for e in plan.encoders if e.modality in ENCODE_ORDER]
        counted = (items
                   | "Encoders with input" >> beam.FlatMap(
                       lambda item: [e.name for e in budgeted if has_input(item, e.modality)])
                   | "Inputs per encoder" >> beam.combiners.Count.PerElement())
    return beam.pvalue.AsDict(counted)


def _encode_work(pipeline: beam.Pipeline, items, encoders: Sequence[Encoder]):
    """The run's encode work, logged once: items per encoder that must encode them (forward passes at most), and
    per modality, for the stages' progress; a side input keyed ("encoder", name) and ("modality", name)."""
    def work_of(item: dict) -> list[tuple[str, str]]:
        wanted = [e for e in encoders if needs(item, e)]
        return [("encoder", e.name) for e in wanted] + [("modality", m) for m in {e.modality for e in wanted}]

    work = beam.pvalue.AsDict(
        items
        | "Work of item" >> beam.FlatMap(work_of)
        | "Work in all" >> beam.combiners.Count.PerElement())
    _ = pipeline | "Before encoding" >> beam.Create([None]) | "Log the work" >> beam.ParDo(LogWork(), work)
    return work


def _removals(pipeline: beam.Pipeline, plan: JobPlan, leaving) -> beam.PCollection:
    """Per stored fragment, what the removal stage did with the rows that leave it (replaced or deleted): a
    deletion file, or on a new schema's night the fragment's other rows carried over (lifecycle.py)."""
    ctx = plan.context
    if ctx.read_version is None:
        return pipeline | "Nothing stored" >> beam.Create([])
    pairs = leaving | "Rows leaving" >> beam.Flatten()
    if ctx.overwrite or ctx.reweigh:    # every stored fragment is visited: its rows that stay are carried over,
                                        # or their combined vectors made again
        stored = lance.dataset(ctx.dataset_uri, version=ctx.read_version, storage_options=ctx.output.storage_options)
        every = pipeline | "Stored fragments" >> beam.Create([(f.fragment_id, None) for f in stored.get_fragments()])
        pairs = (pairs, every) | "And every fragment" >> beam.Flatten()
    remove = RemoveRows(ctx.dataset_uri, ctx.read_version, plan.schema if ctx.overwrite else None, ctx.encoder_ids,
                        plan.config.normalised_weights(), {e.name: e.dim for e in plan.encoders},
                        ctx.output.storage_options, ctx.reweigh)
    return pairs | "Group by fragment" >> beam.GroupByKey() | "Remove rows" >> beam.ParDo(remove)


def _stored_summaries(pipeline: beam.Pipeline, plan: JobPlan):
    """The table's rows at the version the run started from, as summaries (none on the first run)."""
    if plan.context.read_version is None:
        return pipeline | "No stored rows" >> beam.Create([])
    return pipeline | "Read table" >> ReadTableSummaries(
        plan.context.dataset_uri, plan.context.read_version, [e.name for e in plan.encoders],
        list(plan.config.passthrough_columns()), plan.config.output.storage_options)


def run_job(config: Config, run_id: str, beam_args: Sequence[str], reembed: bool = False,
            rehash: bool = False, dry_run: bool = False) -> dict:
    """Run the job to completion and return its row of `<table>_runs`; with `dry_run`, what it would do."""
    options = PipelineOptions(list(beam_args))
    runner = pipeline_runner(options)
    check_paths_reach_workers(config, options)
    FileSystems.set_options(options)    # the launcher reads and writes object stores as the workers will
    root = scratch_root(options.view_as(GoogleCloudOptions).temp_location, config.output.uri)
    storage = config.output.storage_options
    runs = _settled(config, read_runs(config.output.uri, config.output.table, storage))
    _check_run_id_is_new(runs, run_id)
    plan = plan_job(config, run_id, root, reembed, rehash, worker_device_type(options), runs)
    scratch = plan.scratch
    if dry_run:
        plan = replace(plan, plan_path=FileSystems.join(scratch, "plan.json"))
    log.info("run %s%s: %s -> %s (from version %s, on %s)", run_id, " (dry run)" if dry_run else "",
             config.catalog.path, plan.context.dataset_uri, plan.context.read_version, runner_name(options))
    remove_stale_scratch(root, config.output.table, {run["run_id"] for run in runs}, config.output.retain_days)
    open_scratch(scratch, config.output.table, run_id)
    lease = Lease(plan.context.staging, config.output.table, run_id)
    if not dry_run:
        upgrade_side_tables(config.output.uri, config.output.table, storage)
        adopted = adopt_staging(root, config.output.table, plan.context.config_hash, plan.context.read_version,
                                run_id, reembed)
        plan = replace(plan, staged_batches=adopted.batches, context=replace(plan.context, adopted=adopted.folders))
        lease.start()
    try:
        with beam.Pipeline(runner=runner, options=options) as pipeline:
            build_pipeline(pipeline, plan)
        if dry_run:
            return _read_plan(plan)
    except Exception as err:  # noqa: BLE001 - re-raised unless the run's version was committed before it
        lease.release()
        settled = None if dry_run else _settled_after(config, plan, f"{type(err).__name__}: {err}")
        if settled is None or settled["status"] == "failed":
            raise
        log.error("run %s committed version %s, but failed after: %s", run_id, settled["table_version"], err)
        return settled
    finally:
        lease.stop()
        remove_scratch(scratch)
    record = _record(config, run_id)
    assert record is not None, "the commit stage records every run it reaches"
    if record["status"] == "failed":
        lease.release()             # refused or moved: what it staged is the next run's
    return record


def _check_run_id_is_new(runs: list[dict], run_id: str) -> None:
    """A run id names one run: it tags a version and keys the run's record and folders."""
    for run in runs:
        if run["run_id"] == run_id and run["status"] != "failed":
            raise ConfigError(f"run id {run_id} was already used (a run {run['status']} with it, at version "
                              f"{run['table_version']}); give each run its own --run-id")


def _settled_after(config: Config, plan: JobPlan, why: str) -> dict | None:
    """The record of this run, whose pipeline failed (`why`), settled from the table: committed if the table holds
    its commit, though the failure came before its record could say so, or even before it wrote one."""
    recorded = _record(config, plan.context.run_id)
    if recorded is None:
        dataset = open_dataset(plan.context.dataset_uri, config.output.storage_options)
        version = None if dataset is None else committed_version(dataset, plan.context.run_id,
                                                                 plan.context.read_version)
        if version is None:
            return None
        recorded = {"run_id": plan.context.run_id, "status": COMMITTING, "message": "its counts were lost",
                    "read_version": plan.context.read_version, "started_at": plan.context.started_at,
                    "ended_at": utc_now()}
    settled = settle(recorded, plan.context.dataset_uri, why, config.output.storage_options)
    if settled != recorded:
        record_run(config.output.uri, config.output.table, settled, config.output.storage_options,
                   only_if_committing=recorded["status"] == COMMITTING)
    return settled


def _settled(config: Config, runs: list[dict]) -> list[dict]:
    """The runs, with those that were killed while they committed settled from the table: a record still
    `committing` whose run is provably gone (run_lease.py). The record is rewritten only if it still says
    `committing`: a run that was slow, not gone, has the last word."""
    uri = dataset_uri(config.output.uri, config.output.table)

    def gone(run: dict) -> bool:
        try:
            return run["status"] == COMMITTING and bool(run.get("staging")) and is_gone(run["staging"])
        except (OSError, ValueError):       # its lease cannot be read now: it may still run
            return False

    settled = [settle(run, uri, "the run ended while it committed", config.output.storage_options)
               if gone(run) else run for run in runs]
    for before, after in zip(runs, settled, strict=True):
        if after is not before:
            log.info("run %s ended while it committed: it %s", after["run_id"], "committed version "
                     f"{after['table_version']}" if after["status"] != "failed" else "committed nothing")
            record_run(config.output.uri, config.output.table, after, config.output.storage_options,
                       only_if_committing=True)
    return settled


def _record(config: Config, run_id: str) -> dict | None:
    """The run's row of `<table>_runs`, if the commit stage wrote one."""
    runs = read_runs(config.output.uri, config.output.table, config.output.storage_options)
    return next((r for r in reversed(runs) if r["run_id"] == run_id), None)


def _read_plan(plan: JobPlan) -> dict:
    with FileSystems.open(plan.plan_path) as handle:
        counts = json.loads(handle.read())
    return {"run_id": plan.context.run_id, "dry_run": True, "table_version": plan.context.read_version, **counts}


def _log_encoder_changes(stored: dict, described: list[dict]) -> None:
    """Say what a change of encoders costs: new and changed encoders fill their columns (over several runs under
    a budget); the others keep their stored vectors, and a removed encoder's column is dropped."""
    before = {e["name"]: e["id"] for e in stored.get("encoders", [])}
    now = {e["name"]: e["id"] for e in described}
    for name in sorted(set(before) | set(now)):
        if name not in before or name not in now or not same_vectors(before[name], now[name]):
            what = "new" if name not in before else "removed" if name not in now else "changed"
            log.info("encoder %s is %s: %s", name, what, "its column is dropped" if what == "removed" else
                     "its column is filled again, the other encoders' vectors are kept")


class CombineVectors(beam.DoFn):
    """Batches in, batches out, every item with its combined vector (transforms/combine.py); an item
    with no vector at all (none of its inputs could be embedded) is a reject."""

    def __init__(self, weights: dict[str, float], dims: dict[str, int]):
        self._weights = weights
        self._dims = dims
        self._order = list(dims)

    def process(self, items: list[dict]):
        combined = []
        for item in items:
            try:
                vector = combine(item["vectors"], self._weights, self._order, self._dims)
            except ValueError as err:
                yield beam.pvalue.TaggedOutput(REJECTS, failed(item, "combine", err))
                continue
            combined.append(dict(item, vectors={**item["vectors"], "vector": vector}))
        if combined:
            yield combined


def _encoder_config(encoder: Encoder) -> dict:
    cfg = encoder.config
    return {"kind": cfg.kind, "model": cfg.model, "weights_file": cfg.weights_file, "pretrained": cfg.pretrained,
            "precision": encoder.precision_setting, "options": encoder.defining_options()}
