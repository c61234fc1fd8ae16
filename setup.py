"""megatron-sz: a Megatron-Core training backend for data-free self-evolving reasoning.

Layout notes (why this file is not a one-liner):

* The Triton kernels live in the top-level ``kernels/`` folder but are installed as
  ``megatron_sz.kernels``. The import name ``kernels`` belongs to another PyPI project,
  so we never install a top-level ``kernels`` package.
* ``recipes/``, ``slurm/`` and ``seeds/`` are plain folders in the checkout. They are
  shipped inside the wheel as ``megatron_sz/_resources/<name>/`` so an installed copy
  finds them too (see ``megatron_sz/paths.py``).

On CPU-only machines install ``torch==2.13.0`` *before* this package: any other torch
spec pulls the CUDA build with several GB of NVIDIA wheels.
"""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

RESOURCE_DIRS = ["recipes", "slurm", "seeds"]

packages = find_packages(include=["megatron_sz", "megatron_sz.*"])
packages.append("megatron_sz.kernels")
package_dir = {"megatron_sz.kernels": "kernels"}
package_data = {"megatron_sz": ["teacher/prompts/*.txt", "templates/*"]}
for name in RESOURCE_DIRS:
    pkg = f"megatron_sz._resources.{name}"
    packages.append(pkg)
    package_dir[pkg] = name
    package_data[pkg] = ["*", "*/*"]

# Tested ranges. The upper bounds are deliberate: Megatron-Core changes private APIs
# between minor releases, and our adapter (megatron_sz/megatron/) is written against 0.16.
install_requires = [
    "torch>=2.6,<2.14",
    "megatron-core>=0.16.0,<0.17",
    "triton>=3.2,<3.10",
    "numpy>=1.26,<3",
    "sentencepiece>=0.2,<0.3",
    "sympy>=1.13,<1.15",
    "math-verify>=0.7,<0.10",
    "wandb>=0.19,<0.32",
    "transformers>=4.56,<5.24",
    "safetensors>=0.4,<1",
    "pyyaml>=6,<7",
    "tqdm>=4.66,<5",
    "httpx>=0.27,<1",
    "matplotlib>=3.8,<4",
    "sacrebleu>=2.4,<3",  # Agent0's repetition penalty: BLEU distance between proposed questions
]

extras_require = {
    # GPU clusters only: both build or pull CUDA and cannot install on CPU hosts.
    # NVIDIA Apex is optional and built from source (see README); never the PyPI "apex".
    "gpu": [
        "transformer-engine[pytorch]>=2.4,<2.10",
        "vllm>=0.10,<0.13",
    ],
    "test": [
        "pytest>=8,<10",
        "pytest-timeout>=2.3,<3",
        "transformers[serving]>=4.56,<5.24",
        "pyarrow>=15",
    ],
}

setup(
    name="megatron-sz",
    version="0.1.0",
    description="Megatron-Core backend for Socratic-Zero-style co-evolution of solver, teacher and generator",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data=package_data,
    include_package_data=False,
    install_requires=install_requires,
    extras_require=extras_require,
    entry_points={"console_scripts": ["megatron-sz=megatron_sz.cli:main"]},
)
