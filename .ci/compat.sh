#!/usr/bin/env bash
# Compatibility with the GPU device image's versions (issue 24): torch 2.11.0 and transformers 5.17.0, on the CPU.
# Not run by .ci/run (the install is ~4 GB: PyPI's torch 2.11.0 wheel brings its CUDA 13 libraries, which sit unused
# on the CPU; the PyTorch CPU index is not reachable from these machines). Run it by hand after touching the
# calibration capture, the block passes, the pipeline or the eval path:
#
#   bash .ci/compat.sh                 # venv in .venv-compat (git-ignored, reused), then the tests below
#   COMPAT_VENV=/tmp/v bash .ci/compat.sh
#   COMPAT_TORCH=2.11.0 COMPAT_TRANSFORMERS=5.17.0 bash .ci/compat.sh   # the defaults
#   COMPAT_PHASE=install|test|all      # default all
#
# quantlm itself is installed from the work tree with --no-deps (editable), its other requirements under a constraint
# file that pins the two versions, so nothing replaces them; the script checks the versions before testing. The
# tests: the pipeline, block passes, memory plan, solver, methods, calibration, perplexity and the quantize CLI
# (the capture of the first block's keyword arguments and the decoder layer's call are transformers-dependent).
# Outcome of the last run: bench/compat.md.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${COMPAT_VENV:-.venv-compat}"
TORCH="${COMPAT_TORCH:-2.11.0}"
TRANSFORMERS="${COMPAT_TRANSFORMERS:-5.17.0}"
PHASE="${COMPAT_PHASE:-all}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
PY="$VENV/bin/python"
if [ "$PHASE" != test ]; then
  [ -x "$PY" ] || python3 -m venv "$VENV"
  pins=$(mktemp)
  trap 'rm -f "$pins"' EXIT
  printf 'torch==%s\ntransformers==%s\n' "$TORCH" "$TRANSFORMERS" > "$pins"
  # torch alone first (from PyPI; its CUDA libraries come along), then everything else under the pins
  "$PY" -m pip install -q "torch==$TORCH"
  "$PY" -m pip install -q -c "$pins" "transformers==$TRANSFORMERS" safetensors tokenizers datasets pandas pyyaml \
    tqdm matplotlib scipy gguf pytest
  "$PY" -m pip install -q --no-deps -e .
fi
"$PY" - "$TORCH" "$TRANSFORMERS" <<'EOF'
import sys

import torch
import transformers

want = dict(torch=sys.argv[1], transformers=sys.argv[2])
have = dict(torch=torch.__version__.split("+")[0], transformers=transformers.__version__)
bad = [f"{k} {have[k]} (wanted {v})" for k, v in want.items() if have[k] != v]
if bad:
    sys.exit("compat: wrong versions in the venv: " + ", ".join(bad))
print(f"compat: python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")
EOF
if [ "$PHASE" != install ]; then
  # PYTHONPATH: the work tree's package wins over any other install; OMP: a 2-core machine
  PYTHONPATH="$PWD" OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" "$PY" -m pytest -q -p no:cacheprovider \
    -m "not slow and not gpu and not interop" \
    tests/test_pipeline.py tests/test_block_passes.py tests/test_memory.py tests/test_gptq_solver.py \
    tests/test_methods.py tests/test_calibration.py tests/test_eval_perplexity.py tests/test_cli_quantize.py \
    ${COMPAT_EXTRA_TESTS:-}
fi
