"""Which Beam runner a run uses, and what the launcher may tell its workers.

Without `--runner`, a run uses Beam's FnApiRunner, the engine every test and benchmark runs: in this
process, or with `--direct_num_workers=N` in N SDK worker processes (`--direct_running_mode=
multi_processing`, or `--environment_type`/`--environment_config` for another way to start them, such
as EXTERNAL for Beam's worker pool in containers). Beam's own DirectRunner would first try its Prism
runner, a Go binary it downloads from GitHub at start; `--runner=PrismRunner` (or `DirectRunner`) still
gets it for a user who asks. DaskRunner is refused: on a pipeline of this shape it reports success
while it drops what DoFns emit in `finish_bundle`, gives every tag of a multi-output ParDo the whole
output, and runs only the last leaf of the graph.

Workers share nothing with the launcher but the options and the pickled graph: where the runner is
remote, local paths in the config are refused (its workers cannot read this machine's disk), and the
encoders' `precision: auto` is decided for the workers' device as the options describe it, never by
this machine's CPU or GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

from apache_beam.options.pipeline_options import (
    DebugOptions,
    GoogleCloudOptions,
    PipelineOptions,
    PortableOptions,
    StandardOptions,
)
from apache_beam.runners.runner import PipelineRunner

from transforms.config import Config, ConfigError

DEFAULT_RUNNER = "FnApiRunner"
# Runners whose workers run on this machine, and so see its disk, GPU and CPU.
LOCAL_RUNNERS = frozenset(StandardOptions.LOCAL_RUNNERS) | {"InteractiveRunner"}
# Runners whose workers are known to have no access to the launcher's disk.
CLOUD_RUNNERS = frozenset({"DataflowRunner"})
REFUSED_RUNNERS = {   # by name, lower case without "runner"
    "dask": "Beam's DaskRunner loses elements on this pipeline's shape (finish_bundle output, tagged "
                  "outputs, all leaves but the last) while it reports success; use the default runner, "
                  "DataflowRunner, FlinkRunner or SparkRunner",
}


def runner_name(options: PipelineOptions) -> str:
    """The runner's class name, however the options spell it (`dataflow`, `DataflowRunner`, a module path)."""
    runner = options.view_as(StandardOptions).runner
    if runner is None:
        return DEFAULT_RUNNER
    given = str(runner).rsplit(".", 1)[-1]
    return next((known for known in StandardOptions.KNOWN_RUNNER_NAMES
                 if given.lower() in (known.lower(), known.lower().removesuffix("runner"))), given)


def runs_locally(options: PipelineOptions) -> bool:
    return runner_name(options) in LOCAL_RUNNERS


def pipeline_runner(options: PipelineOptions) -> PipelineRunner | None:
    """The runner to build the pipeline with: the FnApiRunner when no --runner is given, else None (Beam
    creates the one the options name). Refuses the runners that cannot run this job."""
    name = runner_name(options)
    refusal = REFUSED_RUNNERS.get(name.lower().removesuffix("runner"))
    if refusal:
        raise ConfigError(f"--runner={name}: {refusal}")
    if options.view_as(StandardOptions).runner is not None:
        return None
    return local_fn_api_runner(options)


def local_fn_api_runner(options: PipelineOptions) -> PipelineRunner:
    """Beam's FnApiRunner as the DirectRunner builds it when it falls back to it: its SDK workers are given
    the pipeline options (object store settings among them), and start as `--environment_type` says."""
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle
    from apache_beam.transforms.environments import Environment

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    provision = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    portable = options.view_as(PortableOptions)
    environment = Environment.from_options(portable) if portable.environment_type else None
    return fn_runner.FnApiRunner(default_environment=environment, provision_info=provision)


def worker_device_type(options: PipelineOptions) -> str | None:
    """The device type ("cuda" or "cpu") the workers of a remote runner have, as far as the options say
    (an accelerator asked of Dataflow: `worker_accelerator` among the service options or experiments);
    None for a local runner, whose workers are this machine."""
    if runs_locally(options):
        return None
    asked = (options.view_as(GoogleCloudOptions).dataflow_service_options or []) + (
        options.view_as(DebugOptions).experiments or [])
    return "cuda" if any(str(option).startswith("worker_accelerator") for option in asked) else "cpu"


def check_paths_reach_workers(config: Config, options: PipelineOptions) -> None:
    """A runner in the cloud runs its workers elsewhere: paths on this machine's disk are not there."""
    name = runner_name(options)
    if name not in CLOUD_RUNNERS:
        return
    paths: Sequence[tuple[str, str | None]] = (
        ("catalog.path", config.catalog.path), ("catalog.interactions", config.catalog.interactions),
        ("output.uri", config.output.uri), ("--temp_location", options.view_as(GoogleCloudOptions).temp_location))
    for what, path in paths:
        if path and "://" not in path:
            raise ConfigError(f"{what} is a path on this machine ({path}); {name}'s workers cannot read it: "
                              "put it on gs:// or s3://")
