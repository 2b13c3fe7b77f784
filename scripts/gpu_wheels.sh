#!/usr/bin/env bash
# Download the wheels `make gpu-check` installs on the GPU machine, which has no network.
#
#   scripts/gpu_wheels.sh [DIR]        (default DIR: gpu_wheels/ in the repository root)
#
# That machine (Python 3.12, torch 2.11 + CUDA, transformers, accelerate, peft) lacks
# deepspeed, bitsandbytes, pytest and omegaconf. This fetches them and what they need
# beyond torch/transformers, for CPython 3.12 on manylinux x86_64, without installing
# anything here. DeepSpeed has no wheel: its sdist is installed there with
# DS_BUILD_OPS=0 --no-build-isolation (hence setuptools and wheel in the list).
#
# gpu_wheels/ is in .gitignore so the wheels (about 50 MB) are never committed; the
# device run names it explicitly (the device tool's carry=["gpu_wheels"], 64 MiB per
# call in all, working tree included).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-gpu_wheels}"
PIP="${PIP:-.venv/bin/python -m pip}"
mkdir -p "$DIR"
BIN=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
     --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
     -d "$DIR")
# Compiled wheels, pinned to the versions this repository is tested with.
$PIP download "${BIN[@]}" bitsandbytes==0.50.2 msgpack==1.2.4 ninja==1.13.2 pydantic-core==2.50.5
# Pure-python wheels (typing-extensions: pydantic needs >= 4.16, newer than some images carry).
$PIP download "${BIN[@]}" einops==0.8.2 hjson==3.1.0 py-cpuinfo==9.0.0 pydantic==2.14.4 \
    annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 omegaconf==2.4.0 \
    pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 setuptools==84.2.1 wheel==0.48.0
# DeepSpeed: source only.
$PIP download --no-deps --no-binary=:all: deepspeed==0.19.8 -d "$DIR"
ls -la "$DIR"
du -sh "$DIR"
