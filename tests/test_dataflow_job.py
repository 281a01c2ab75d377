"""The Dataflow job of docs/clusters.md's GPU command, built offline: the graph translates for Runner v2, the
workers are asked for GPUs, the encoders are planned at the GPU's precision, and nothing in the job
names a folder of the launcher's.

Beam writes `--dataflow_job_file` in its `create_job`, after it has staged the pipeline on GCS and just
before it submits the job (`--dry_run` returns before either). Offline, the staging goes to a local GCS
(gcp-storage-emulator) and the test stops the run at the submission, the one step that needs Google's
service. `--no_auth` spares the Dataflow client Google's credentials; Beam's GCS client has no such
switch, and would look for them for about 20 s before it connects anonymously, as it does here at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.portability.api import beam_runner_api_pb2

from pipelines.cli import main
from tests.conftest import BUCKET, CAPTIONS, PHOTOS, photo, readme_gpu_command
from tests.launcher_paths import decoded, launcher_paths
from tests.servers import gcs_server

STAGING_BUCKET = "catalog-embed-staging"
PROJECT = "catalog-embed-test"
IMAGE = "registry.example/catalog-embed-gpu:test"


def _catalog_on_s3(tmp_path: Path) -> Path:
    s3 = boto3.client("s3")
    rows = ["id,caption,image"]
    for i, (caption, name) in enumerate(zip(CAPTIONS, PHOTOS, strict=False)):
        s3.upload_file(str(photo(name)), BUCKET, f"dataflow/images/{i}{photo(name).suffix}")
        rows.append(f"item-{i},{caption},images/{i}{photo(name).suffix}")
    s3.put_object(Bucket=BUCKET, Key="dataflow/catalog.csv", Body="\n".join(rows).encode())
    config = tmp_path / "dataflow.yaml"
    config.write_text(json.dumps({
        "catalog": {"format": "manifest", "path": f"s3://{BUCKET}/dataflow/catalog.csv", "text_fields": ["caption"]},
        "encoders": {"text": {"kind": "sentence-transformers", "weight": 0.5}, "image": {"kind": "cnn", "weight": 0.4},
                     "color": {"kind": "color", "weight": 0.1}},
        "output": {"uri": f"s3://{BUCKET}/dataflow-db", "table": "products"}}))
    return config


def test_the_readme_gpu_job_translates_offline_and_names_no_launcher_path(s3, tmp_path, monkeypatch):
    from apache_beam.internal.gcp import auth
    from apache_beam.runners.dataflow.internal import apiclient

    def offline(self, job):
        raise ConnectionError("offline: the job is not submitted to the Dataflow service")

    monkeypatch.setattr(auth, "get_service_credentials", lambda options: None)
    monkeypatch.setattr(apiclient.DataflowApplicationClient, "submit_job_description", offline)
    ours = {"--project=P": f"--project={PROJECT}", "--temp_location=gs://B/tmp": f"--temp_location=gs://{STAGING_BUCKET}/tmp",
            "--sdk_container_image=IMAGE": f"--sdk_container_image={IMAGE}"}
    flags = [ours.get(flag, flag) for flag in readme_gpu_command()[2:] if flag.startswith("--") and flag != "--config"]
    job_file = tmp_path / "job.json"
    with gcs_server(tmp_path, STAGING_BUCKET):
        code = main(["run", "--config", str(_catalog_on_s3(tmp_path)), *flags, "--no_auth",
                     f"--dataflow_job_file={job_file}"])
        staged = FileSystems.match([f"gs://{STAGING_BUCKET}/tmp/**/pipeline.pb"])[0].metadata_list
        with FileSystems.open(staged[0].path) as handle:
            pipeline = handle.read()
    assert code == 1                                  # the run failed at the submission, and committed nothing
    job = json.loads(job_file.read_text())
    environment = job["environment"]
    assert {"use_runner_v2", "no_use_multiple_sdk_containers"} <= set(environment["experiments"])
    assert "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver" in environment["serviceOptions"]
    [pool] = environment["workerPools"]
    assert pool["machineType"] == "g2-standard-8" and pool["numThreadsPerWorker"] == 4
    assert {image["containerImage"] for image in pool["sdkHarnessContainerImages"]} == {IMAGE}
    graph = beam_runner_api_pb2.Pipeline.FromString(pipeline)
    names = {transform.unique_name for transform in graph.components.transforms.values()}
    assert {"Encode image/RunInference", "Encode text/RunInference", "Write fragments", "Commit"} <= names
    # The workers have GPUs: `precision: auto` is planned as fp16 for them, whatever this machine has; the
    # encoder id holds the setting, `auto`, so that no machine's choice re-encodes (test_what_rewrites.py).
    encoders = b"".join(part for part in decoded(pipeline) if b'"kind": "sentence-transformers"' in part)
    assert b"_auto_precision\x94\x8c\x04fp16" in encoders and b"_auto_precision\x94\x8c\x04bf16" not in encoders
    assert b'"precision": "auto"' in encoders and b'"precision": "fp16"' not in encoders
    # --dataflow_job_file is where the launcher writes this file; Beam sends every option to the workers.
    assert launcher_paths(job_file.read_bytes(), allowed={str(job_file)}) == launcher_paths(pipeline) == []


@pytest.mark.parametrize("where", ["catalog.path", "output.uri"])
def test_a_cloud_runner_refuses_paths_on_this_machine(tmp_path, capsys, where):
    raw = {"catalog": {"format": "manifest", "path": f"s3://{BUCKET}/x.csv", "text_fields": ["caption"]},
           "encoders": {"color": {"kind": "color"}}, "output": {"uri": f"s3://{BUCKET}/db", "table": "t"}}
    section, key = where.split(".")
    raw[section][key] = str(tmp_path / ("catalog.csv" if key == "path" else "db"))
    (tmp_path / "catalog.csv").write_text("id,caption\n")
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(raw))
    assert main(["run", "--config", str(config), "--runner=DataflowRunner", f"--project={PROJECT}",
                 "--region=us-central1", f"--temp_location=gs://{STAGING_BUCKET}/tmp"]) == 2
    err = capsys.readouterr().err
    assert f"{where} is a path on this machine" in err and "DataflowRunner's workers cannot read it" in err
