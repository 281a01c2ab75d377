"""The runner a run gets is chosen, not guessed: the FnApiRunner unless --runner names another, never
Prism on its own; DaskRunner refused; remote workers planned for their own device, not the launcher's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability import prism_runner
from apache_beam.runners.portability.fn_api_runner import fn_runner

from pipelines import nightly
from pipelines.cli import main
from pipelines.runners import pipeline_runner, runner_name, worker_device_type
from tests.conftest import COLOR_ONLY, captioned_catalog, make_config, run
from transforms import encoders
from transforms.config import ConfigError, EncoderConfig
from transforms.encoders import base

GPU_DATAFLOW = ["--runner=DataflowRunner", "--dataflow_service_options=worker_accelerator=type:nvidia-l4;count:1"]


@pytest.fixture
def color_config(tmp_path):
    folder, _ = captioned_catalog(tmp_path)
    return make_config(tmp_path, {"format": "manifest", "path": str(folder / "catalog.csv")}, COLOR_ONLY)


def test_without_a_runner_the_job_runs_on_the_fn_api_runner_and_never_tries_prism(color_config, monkeypatch):
    built, prism = [], []

    def spy(options):
        built.append(pipeline_runner(options))
        return built[-1]

    monkeypatch.setattr(nightly, "pipeline_runner", spy)
    monkeypatch.setattr(prism_runner.PrismRunner, "run_pipeline", lambda *args: prism.append(args))
    assert run(color_config)["status"] == "committed"
    assert [type(runner) for runner in built] == [fn_runner.FnApiRunner] and prism == []


def test_the_command_line_logs_the_runner_it_uses_and_no_prism_line(color_config, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"catalog: {{format: manifest, path: '{color_config.catalog.path}'}}\n"
                      f"encoders: {{color: {{kind: color}}}}\noutput: {{uri: '{tmp_path / 'db'}', table: t}}\n")
    done = subprocess.run([str(Path(sys.executable).parent / "catalog-embed"), "run", "-v", "--dry-run", "--config",
                           str(config)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "on FnApiRunner" in done.stderr and "prism" not in done.stderr.lower()


def test_a_named_runner_is_beams_and_dask_is_refused(color_config, capsys):
    assert pipeline_runner(PipelineOptions(["--runner=PrismRunner"])) is None      # Beam builds what was asked
    assert runner_name(PipelineOptions(["--runner=dataflow"])) == "DataflowRunner"
    with pytest.raises(ConfigError, match="DaskRunner loses elements"):
        pipeline_runner(PipelineOptions(["--runner=apache_beam.runners.dask.dask_runner.DaskRunner"]))
    config = Path(color_config.output.uri).parent / "c.yaml"
    config.write_text(f"catalog: {{format: manifest, path: '{color_config.catalog.path}'}}\n"
                      f"encoders: {{color: {{kind: color}}}}\noutput: {{uri: '{color_config.output.uri}', table: t}}\n")
    assert main(["run", "--config", str(config), "--runner=DaskRunner"]) == 2
    assert "DaskRunner loses elements" in capsys.readouterr().err


def test_remote_workers_are_planned_for_the_device_the_options_give_them(monkeypatch):
    assert worker_device_type(PipelineOptions([])) is None                         # local: this machine decides
    assert worker_device_type(PipelineOptions(GPU_DATAFLOW)) == "cuda"
    assert worker_device_type(PipelineOptions(["--runner=FlinkRunner"])) == "cpu"
    monkeypatch.setattr(base, "cpu_runs_bf16", lambda: True)                  # whatever this CPU does
    configs = [EncoderConfig(name=kind, kind=kind) for kind in ("sentence-transformers", "cnn", "conse")]
    on_gpus = encoders.build_encoders(configs, "cuda")
    on_cpus = encoders.build_encoders(configs, "cpu")
    assert [e.precision for e in on_gpus] == ["fp16", "fp16", "fp16"]
    assert [e.precision for e in on_cpus] == ["fp32", "fp32", "fp32"]
    assert [e.precision for e in encoders.build_encoders(configs[:2])] == ["bf16", "bf16"]   # here, bf16 in hardware


def test_gs_and_s3_resolve_in_beams_filesystems_here_and_in_the_worker_image():
    from apache_beam.io.aws.s3filesystem import S3FileSystem
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.io.gcp.gcsfilesystem import GCSFileSystem

    assert isinstance(FileSystems.get_filesystem("gs://bucket/x"), GCSFileSystem)
    assert isinstance(FileSystems.get_filesystem("s3://bucket/x"), S3FileSystem)
    repo = Path(__file__).resolve().parent.parent
    assert "apache-beam[gcp,aws]==" in (repo / "requirements.txt").read_text()      # what .venv installed
    assert "pip install --no-cache-dir -r requirements.txt" in (repo / "Dockerfile").read_text()
