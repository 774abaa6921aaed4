"""Kino: train text-to-video diffusion transformers on licensed video at any scale."""
from setuptools import setup

setup(
    name="kino",
    version="0.1.0",
    description="Video diffusion transformer training on licensed WebDataset video, "
    "DeepSpeed ZeRO, Ray data plane, Hydra curricula",
    python_requires=">=3.10",
    packages=["train", "data", "models", "launch", "conf"],
    package_data={"conf": ["*.yaml", "*/*.yaml"]},
    install_requires=[
        # torch is pinned by constraints.txt at install time; the floor documents the API we use.
        "torch>=2.4",
        "deepspeed>=0.16",
        "webdataset>=0.2.100",
        "wandb>=0.19",
        "hydra-core>=1.3.2",
        "omegaconf>=2.3",
        "decord>=0.6.0",
        "ray[data]>=2.40",
        "numpy>=1.26",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        # Dataset roots that are URLs (s3://, gs://, az://): Path-like objects over fsspec (data/storage.py).
        "universal_pathlib>=0.2",
    ],
    extras_require={
        # Encoding sample videos (mp4 via PyAV, gif via imageio) and W&B video logging.
        "media": ["av>=12", "imageio>=2.34", "moviepy>=1.0"],
        # Datasets in S3 or an S3-compatible store (gcsfs / adlfs for gs:// and az://).
        "s3": ["s3fs>=2024.1"],
        # Loading pretrained autoencoders (diffusers) and text encoders (transformers) from local paths.
        "encoders": ["diffusers>=0.35", "transformers>=4.50", "accelerate>=1.0", "tokenizers>=0.21",
                     "sentencepiece>=0.2", "peft>=0.13"],
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "av>=12", "imageio>=2.34", "moviepy>=1.0", "diffusers>=0.35",
                "transformers>=4.50",
                "accelerate>=1.0", "tokenizers>=0.21", "sentencepiece>=0.2", "peft>=0.13", "jsonschema>=4",
                "kubernetes-validate>=1.30",
                # The last torchcodec whose registry wheel is a CPU build (later ones need a CUDA torch): with the
                # FFmpeg libraries PyAV's wheel bundles, the decoder test runs it here (tests/unit/test_decoders.py).
                "torchcodec==0.13.0",
                # object storage, tested against a real S3 API server on 127.0.0.1 (moto in server mode)
                "s3fs>=2024.1", "moto[server]>=5"],
        # Needs CUDA to build; install on GPU machines only.
        "gpu": ["flash-attn>=2.6", "torchcodec>=0.2"],
    },
)
