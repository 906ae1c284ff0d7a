from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent

setup(
    name="dinoscale",
    version="0.1.0",
    description="Distributed self-supervised pretraining of Vision Transformers (DINOv2 and friends) in PyTorch",
    long_description=(here / "README.md").read_text(encoding="utf-8") if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dinoscale", "dinoscale.*"]),
    include_package_data=True,
    install_requires=[
        "torch>=2.6",
        "torchvision>=0.21",
        "numpy",
        "pillow",
        # the per-sample photometry on CPU (dinoscale/data/transforms/photometric_cpu.py); headless: no GUI libraries
        "opencv-python-headless>=4.10",
        "webdataset>=0.2.100",
        "submitit>=1.5",
        "fvcore",
        "omegaconf>=2.3",
        "safetensors",
        "tensorboard",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # CUDA-only memory-efficient attention kernels; never needed on CPU.
        "xformers": ["xformers"],
        # Optional experiment trackers (trackers.enabled=[wandb, mlflow]); the local MLflow store needs full mlflow.
        "trackers": ["wandb", "mlflow"],
        # The representation-conditioned diffusion decoder (dinoscale/viz/rcdm.py, tools/visualize_rcdm.py).
        "viz": ["diffusers>=0.30"],
        "dev": [
            "pytest",
            "timm>=1.0.20",  # parity checks and export round trips ("local-dir:" model names)
            "transformers>=4.48",  # parity checks and export round trips (Dinov2Model, Dinov2WithRegistersModel)
            "onnx",  # tools/export.py --to onnx
            "onnxscript",  # torch.onnx's dynamo exporter
            "onnxruntime",  # checks the exported ONNX graphs
            "scikit-image",  # sample photos for tests and benchmarks
            "scikit-learn",  # logistic-regression probe, sample photos
            "diffusers>=0.30",  # the RCDM decoder's tests (the "viz" extra)
        ],
    },
)
