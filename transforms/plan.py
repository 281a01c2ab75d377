"""The dry run's last stage: what a run would do, counted instead of done.

It takes the decisions of a real run (the same read, inspection, comparison, hashing and fingerprints)
and counts them: new items, changed items (and per encoder, the items whose vector it would encode
again), unchanged, deleted and rejected so far, and the encode work (distinct inputs per encoder, as
the encode stages would run them). A picture file whose stat changed is read where the run decodes it, so
the plan counts it as work: one whose bytes turn out the same keeps its vectors in the run. Nothing is
encoded and nothing is written to the table or its side
tables; the plan is one small JSON file for the launcher to read.
"""

from __future__ import annotations

import json

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from transforms.budget import backfill_progress
from transforms.fingerprint import has_input, input_key


def count(pcoll: beam.PCollection, label: str):
    """The number of elements, as a side input."""
    return beam.pvalue.AsSingleton(pcoll | f"Count {label}" >> beam.combiners.Count.Globally())


def counts_per_key(pcoll: beam.PCollection, label: str):
    return beam.pvalue.AsDict(pcoll | f"Count {label}" >> beam.combiners.Count.PerElement())


def encoders_to_run(item: dict, modalities: dict[str, str]) -> list[tuple[str, str]]:
    """(encoder, input digest) for each encoder whose vector the item neither keeps nor leaves for a later run."""
    return [(name, input_key(item, modality)) for name, modality in modalities.items()
            if name not in item["keep"] and name not in item["deferred"] and has_input(item, modality)]


class WritePlan(beam.DoFn):
    def __init__(self, path: str, budget: dict[str, int]):
        self._path = path
        self._budget = budget

    def process(self, element, waiting: dict[str, int], with_input: dict[str, int], **plan):
        """`element` only triggers the write; `plan` (the counts), `waiting` and `with_input` are side inputs."""
        plan["backfill"] = backfill_progress(with_input, waiting, plan["encode"], self._budget)
        with FileSystems.create(self._path) as handle:
            handle.write(json.dumps(plan, sort_keys=True).encode())
        yield plan


def count_plan(pipeline: beam.Pipeline, items, unchanged, deleted, rejects, read, modalities: dict[str, str],
               path: str, backfill: dict, budget: dict[str, int]) -> None:
    """Count what a run would do and write it to `path` (JSON). `backfill`: the budget's side inputs
    (`deferred`, `waiting`, `with_input`, budget.py), `budget` its scopes."""
    work = items | "Encoders to run" >> beam.FlatMap(encoders_to_run, modalities)
    changed = items | "Changed" >> beam.Filter(lambda item: item["replaces"] is not None)
    changed_encoders = changed | "Changed encoders" >> beam.FlatMap(lambda item: [n for n in modalities
                                                                                   if n not in item["keep"]])
    _ = (
        pipeline
        | "Once" >> beam.Create([None])
        | "Write plan" >> beam.ParDo(
            WritePlan(path, budget),
            new=count(items | "New" >> beam.Filter(lambda item: item["replaces"] is None), "new"),
            changed=count(changed, "changed"),
            changed_by_encoder=counts_per_key(changed_encoders, "changed by encoder"),
            encode=counts_per_key(work | "Distinct inputs" >> beam.Distinct() | "Encoder" >> beam.Keys(),
                                  "distinct inputs"),
            unchanged=count(unchanged, "unchanged"), deleted=count(deleted, "deleted"),
            rejected=count(rejects, "rejected"), read=read, **backfill)
    )
