#!/usr/bin/env bash
# Wheels the GPU device image lacks, fetched HERE (the device reaches no registry) into .whl/ (git-ignored), for
# bench/gpu_check.sh to install there with --no-deps into a temporary --target folder beside the image's torch 2.11.0
# and transformers 5.17.0 (never replacing them). The image (Python 3.12) has accelerate, psutil, numpy, pandas,
# pyarrow, huggingface-hub, nvidia-ml-py, requests, pyyaml, tqdm, safetensors, tokenizers; it lacks llm-compressor
# and what it needs (compressed-tensors, loguru, pydantic, datasets) and quantlm's gguf. Versions: llm-compressor
# 0.14.0.1 is the release that accepts transformers <= 5.17.0 and torch 2.10-2.14; it pins compressed-tensors 0.19.0.
# Checked on the CPU with torch 2.11.0 + transformers 5.17.0 (bench/compat.md). About 5 MB; carry it with
#   run(command="bash bench/gpu_check.sh ...", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION="${GPU_PY_VERSION:-3.12}"
mkdir -p .whl
pins=(llmcompressor==0.14.0.1 compressed-tensors==0.19.0 loguru==0.8.0 pydantic==2.14.4 pydantic-core==2.50.5
      annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 datasets==5.2.0 dill==0.4.1
      multiprocess==0.70.19 gguf==0.19.0)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl "${pins[@]}"
ls -l .whl
du -sh .whl
