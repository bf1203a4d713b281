from pathlib import Path

from setuptools import find_packages, setup


here = Path(__file__).parent
version = next(
    line.split('"')[1]
    for line in (here / "g2sd_hf" / "__init__.py").read_text().splitlines()
    if line.startswith("__version__")
)

# ONNX export and ONNX Runtime (torch.onnx's dynamo exporter needs onnxscript).
onnx = ["onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18"]
extras = {
    # The embedded demo data set, the demo's figure, and its ONNX Runtime export.
    "demo": ["elpv-dataset>=1.0", "matplotlib>=3.7", "tensorboard>=2.14", *onnx],
    # Tests: timm is an independent ViT implementation to check the converted checkpoints against.
    "testing": [
        "pytest>=7.4",
        "timm>=1.0",
        "elpv-dataset>=1.0",
        "matplotlib>=3.7",
        "pyyaml>=6.0",
        "mkdocs>=1.6",
        "mkdocs-material>=9.5",
        "mkdocstrings[python]>=0.26",
        # `make lint`; pinned, so that a new release's formatting changes do not fail CI.
        "ruff==0.17.6",
    ],
    "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],
    "onnx": onnx,
    # A local, offline experiment tracker for `--report_to trackio` (any Trainer backend works; this one is tested).
    # trackio (0.43) requires pillow < 13: in the testing environment pip installs Pillow 12.
    "tracking": ["trackio>=0.43"],
}
extras["testing"] += onnx + extras["tracking"]
extras["dev"] = sorted({requirement for group in extras.values() for requirement in group})

setup(
    name="g2sd-hf",
    version=version,
    description="Generic-to-Specific Distillation of masked autoencoders (G2SD, CVPR 2023) for Hugging Face transformers",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["g2sd_hf", "g2sd_hf.*"]),
    # The `evaluate` modules are scripts that `evaluate.load` reads from their folders (not imported packages).
    package_data={"g2sd_hf": ["imagenet_subsets.json", "evaluate_modules/*/*.py"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "transformers>=5.0,<6",
        "accelerate>=1.0",
        "datasets>=3.0",
        "huggingface_hub>=1.0",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pillow>=10.0",
        "scipy>=1.10",  # the DETR family's Hungarian matcher
        "pycocotools>=2.0.7",  # COCO AP of the detection example
        "evaluate>=0.4.1",  # the package's metrics, as evaluate modules loaded from the package (offline)
    ],
    extras_require=extras,
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
