"""An SDK worker started the way a container starts one, for the FnApiRunner's subprocess environment:

    --environment_type=beam:env:harness_subprocess_python:v1
    --environment_config="unshare --mount --propagation private PYTHON tests/isolated_worker.py"

In the mount namespace that `unshare` gave it, the worker sees an empty working directory and TMPDIR of
its own (a tmpfs over $WORKER_ROOT), none of the launcher's folders named in $WORKER_HIDDEN (each covered
by an empty, read-only tmpfs), and imports the project and its packaged models from $WORKER_SITE,
another installation. Like a container's, its environment is not the launcher's: only what Beam hands a
worker (its endpoints and the pipeline options), the object store's settings (AWS_*), and the image's.
"""

import os
import subprocess
import sys

BEAM_VARIABLES = ("CONTROL_API_SERVICE_DESCRIPTOR", "LOGGING_API_SERVICE_DESCRIPTOR", "PIPELINE_OPTIONS", "WORKER_ID")
IMAGE_VARIABLES = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def main() -> None:
    root = os.environ["WORKER_ROOT"]
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", root], check=True)
    for folder in os.environ["WORKER_HIDDEN"].split(os.pathsep):
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", folder], check=True)
    os.chdir(root)
    environment = dict(IMAGE_VARIABLES, TMPDIR=root, HOME=root, PYTHONPATH=os.environ["WORKER_SITE"])
    environment.update((k, v) for k, v in os.environ.items() if k in BEAM_VARIABLES or k.startswith("AWS_"))
    python = os.environ["WORKER_PYTHON"]
    os.execve(python, [python, "-m", "apache_beam.runners.worker.sdk_worker_main"], environment)


if __name__ == "__main__":
    sys.exit(main())
