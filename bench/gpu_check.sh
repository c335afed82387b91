#!/usr/bin/env bash
# GPU check of issue 13 (one H100/H200, under 8 minutes): GPTQ of the Spectra 99M and 3.9B shapes
# (random init, 512 x 2048 random windows, 4-bit g128, act-order + static groups, true-sequential) with
# quantlm exact (fp32) and fast (bf16 forwards, TF32 Hessians) next to a reference GPTQ written from the paper
# (bench/gptq_reference.py: fp16 model, one sequence per forward, one Hessian per linear), on the same weights
# and windows; wall time, peak GPU and host memory, layer error; then trainer tokens/s and MFU (99M preset).
#
#   bash bench/gpu_check.sh              # on the GPU machine: writes bench/results/gpu_check.{json,md}
#   bash bench/gpu_check.sh --dry-run    # the same code on the CPU with tiny shapes (tests run it)
#
# Extra arguments go to bench/bench_gpu.py (e.g. --blocks-39b 3, --skip train). Output lands in $OUT when set
# (the device tool's folder), else in bench/results/. The interpreter is $PYTHON, else python3 (the device image
# documents python3); the environment probe never stops the check (a missing tool is written as such).
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${OUT:-bench/results}"
mkdir -p "$dest"
tag="gpu_check"
for a in "$@"; do [[ "$a" == "--dry-run" ]] && tag="gpu_check_dry"; done
{
  echo "# $(date -u '+%Y-%m-%d %H:%M:%S UTC') $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  lscpu | grep -E 'Model name|^CPU\(s\)' || true
  free -g | head -2 || true
  uptime || echo "no uptime"
  "${PYTHON:-python3}" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__)" || true
} > "$dest/$tag.env.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"${PYTHON:-python3}" bench/bench_gpu.py --json "$dest/$tag.json" "$@" | tee "$dest/$tag.md"
