#!/usr/bin/env bash
# llama.cpp interop: quantlm's GGUF exports loaded and run by llama.cpp itself (llama-cpp-python), in a
# SEPARATE virtualenv, so the llama.cpp build never touches the main environment. Usage: bash .ci/llamacpp.sh
#   LLAMACPP_VENV        the venv folder (default .venv-llamacpp in the repo, git-ignored); reused when present.
#   QUANTLM_WHEEL_CACHE  where the llama-cpp-python wheel is kept (default ~/.cache/quantlm-wheels).
#   LLAMACPP_PHASE       install | test | all (default all).
# llama-cpp-python is an sdist that compiles llama.cpp with cmake (about 10 minutes on a loaded 2-core
# machine, measured: 10m01s wall, 12m53s CPU). It is built once into the wheel cache with `pip wheel` and
# reused; the build targets the building machine's CPU (GGML_NATIVE), so keep one cache per machine.
# --no-cache-dir because pip's own wheel cache ignores CMAKE_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LLAMACPP_VENV:-.venv-llamacpp}"
CACHE="${QUANTLM_WHEEL_CACHE:-$HOME/.cache/quantlm-wheels}"
VERSION=0.3.36
PHASE="${LLAMACPP_PHASE:-all}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ "$PHASE" != test ]; then
  mkdir -p "$CACHE"
  shopt -s nullglob
  wheels=("$CACHE"/llama_cpp_python-"$VERSION"-*.whl)
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "llamacpp: no llama-cpp-python $VERSION wheel in $CACHE; building it once (minutes)" >&2
    start=$SECONDS
    python3 -m pip wheel --no-deps --no-cache-dir "llama-cpp-python==$VERSION" -w "$CACHE"
    echo "llamacpp: wheel built in $((SECONDS - start)) s" >&2
    wheels=("$CACHE"/llama_cpp_python-"$VERSION"-*.whl)
  fi
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  # torch first and alone (CPU wheel from the machine's disk), then the rest, which must not replace it
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q -e . torch==2.13.0 gguf==0.19.0 transformers==5.24.0 tokenizers==0.23.3 pytest \
    sentencepiece protobuf "${wheels[0]}"  # sentencepiece + protobuf: the SentencePiece tokenizer test
  "$VENV/bin/python" -c "import torch, llama_cpp; assert torch.__version__.startswith('2.13.0'), torch.__version__"
fi
if [ "$PHASE" != install ]; then
  # one thread and passive OpenMP waits: spinning threads collapse throughput on a shared 2-core machine
  OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. "$VENV/bin/python" -m pytest -q -p no:cacheprovider -m interop \
    tests/test_llamacpp.py tests/test_llamacpp_families.py
fi
