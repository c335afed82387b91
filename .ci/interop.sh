#!/usr/bin/env bash
# Interop tests: load quantlm's gptq and compressed-tensors exports with the real libraries
# (transformers + optimum + GPTQModel, transformers + compressed-tensors) in a SEPARATE virtualenv,
# so their pins never touch the main environment. Usage: bash .ci/interop.sh
# INTEROP_VENV picks the venv folder (default .venv-interop in the repo, git-ignored); it is reused
# when present, so later runs only re-check the pins.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${INTEROP_VENV:-.venv-interop}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
PHASE="${INTEROP_PHASE:-all}"   # install | test | all
if [ "$PHASE" != test ]; then
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  # torch first and alone (CPU wheel from the machine's disk), then the pins, which must not replace it
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q -r requirements-interop.txt torch==2.13.0
  "$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
fi
if [ "$PHASE" != install ]; then
  export GPTQMODEL_CPU_WORKERS=2   # GPTQModel on a 2-core machine
  PYTHONPATH=. "$VENV/bin/python" -m pytest -q -p no:cacheprovider -m interop tests/test_interop.py
fi
