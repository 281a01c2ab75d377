# The worker container for Dataflow (and other portable runners): the Apache Beam Python SDK image with
# this project and its pinned dependencies. One Dockerfile, two builds (docs/clusters.md, "Dataflow GPU workers"):
#   docker build -t IMAGE .                                  CPU workers: torch's CPU-only wheels
#   docker build --build-arg DEVICE=gpu -t IMAGE-gpu .       GPU workers: torch's CUDA wheels
# torch 2.14.1 from PyPI carries its CUDA runtime (the nvidia-* wheels); the driver comes from the
# worker host, which Dataflow installs with `worker_accelerator=...;install-nvidia-driver`. Encoders at
# `device: auto` find the GPU, and `precision: auto` runs them in fp16 there.
ARG BEAM_VERSION=2.77.0
FROM apache/beam_python3.11_sdk:${BEAM_VERSION}
ARG DEVICE=cpu

WORKDIR /opt/catalog-embed
COPY requirements.txt setup.py ./
RUN case "$DEVICE" in \
      cpu) pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
             "$(grep '^torch==' requirements.txt)" "$(grep '^torchvision==' requirements.txt)" ;; \
      gpu) ;; \
      *) echo "DEVICE must be cpu or gpu, got $DEVICE" >&2; exit 2 ;; \
    esac && pip install --no-cache-dir -r requirements.txt
COPY pipelines ./pipelines
COPY transforms ./transforms
COPY configs ./configs
RUN pip install --no-cache-dir --no-deps .

# Models come from installed packages; never reach for a hub at run time.
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
