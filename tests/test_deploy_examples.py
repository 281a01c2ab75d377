"""The scheduler examples in deploy/ run the real command line: each one's command, against the demo
table, as a dry run (the examples would write)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from demo.build_catalog import build as build_demo_catalog
from pipelines.cli import main
from pipelines.logs import OUR_LOGGERS
from tests.conftest import COLOR_ONLY, DEMO_CATALOG

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
EXAMPLE_CONFIG = "/etc/catalog-embed/food101.yaml"


def airflow_command() -> list[str]:
    source = (DEPLOY / "airflow_dag.py").read_text()
    config = re.search(r'^CONFIG = "(.+)"$', source, re.MULTILINE).group(1)
    command = re.search(r'bash_command=f"(catalog-embed run [^"]+)"', source).group(1)
    return shlex.split(command.replace("{CONFIG}", config))


def systemd_command() -> list[str]:
    line = next(line for line in (DEPLOY / "catalog-embed.service").read_text().splitlines()
                if line.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart="))


def kubernetes_command() -> list[str]:
    container = yaml.safe_load((DEPLOY / "kubernetes-cronjob.yaml").read_text())[
        "spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    return [*container["command"], *container["args"]]


@pytest.fixture(scope="module")
def demo_config(tmp_path_factory) -> Path:
    """The demo catalog embedded by the command line, and its config: where the examples' config would be."""
    root = tmp_path_factory.mktemp("deploy")
    config = root / "food101.yaml"
    config.write_text(yaml.safe_dump({
        "catalog": dict(DEMO_CATALOG, path=str(build_demo_catalog(root / "catalog"))), "encoders": COLOR_ONLY,
        "output": {"uri": str(root / "db"), "table": "demo"}}))
    assert main(["run", "--config", str(config)]) == 0
    return config


@pytest.mark.parametrize("example", [airflow_command, systemd_command, kubernetes_command])
def test_each_example_runs_the_real_command(example, demo_config):
    command = example()
    assert Path(command[0]).name == "catalog-embed" and EXAMPLE_CONFIG in command
    argv = [str(Path(sys.executable).with_name("catalog-embed")), *command[1:], "--dry-run"]
    done = subprocess.run([str(demo_config) if part == EXAMPLE_CONFIG else part for part in argv],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout.splitlines()[-1])                  # what the scheduler keeps
    assert plan["dry_run"] and plan["unchanged"] == plan["read"] > 0, plan
    if "--log-format" in command:                                   # our log lines, each one JSON object
        lines = done.stderr.splitlines()
        assert lines and all(json.loads(line)["logger"].split(".")[0] in OUR_LOGGERS for line in lines), lines
