#!/usr/bin/env bash
# The GPU check of issue 24, in stages: each stage is its own command under its own timeout and writes its result
# file as it goes, so a failure or a timeout in one stage keeps the earlier stages' files and the later stages still
# run; the script exits non-zero at the end naming the failed stages. On one H100/H200 it takes under 9 minutes
# (the timeouts below add up to 535 s; give the device call 600).
#
#   1 env    versions, device, memory, which packages import                       (bench_gpu.py env)
#   2 tests  the gpu-marked pytest tests                                            (bench_gpu.py tests)
#   3 gptq   3.9B shape, first 2 blocks, 512 x 2048 tokens, Spectra recipe: quantlm exact (fp32) and fast (bf16
#            forwards, TF32 Hessians): predicted vs measured peak, allocated and reserved, time per block
#   4 train  the trainer's tokens/s and MFU, 99M preset, seq 2048, bf16 autocast
#   5 peers  the reference GPTQ (written from the paper, run as the original code) and llm-compressor's GPTQ on the
#            same blocks and tokens; a peer that does not import is written as skipped, with the reason
#
#   bash bench/gpu_check.sh                   # on the GPU machine
#   bash bench/gpu_check.sh --dry-run         # every stage on the CPU with tiny shapes (tests run it), ~1 minute
#   bash bench/gpu_check.sh --skip 4,5        # stages by number or name
#   bash bench/gpu_check.sh --blocks 3        # blocks of the 3.9B shape in stages 3 and 5
#
# A first run on a lent device: here `bash bench/gpu_wheels.sh` (fills .whl/), then the device tool's
# run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600); copy the files it returns into bench/results/
# and commit them (they name the device, the versions, the commit and the date).
#
# Files (in $OUT when set: the device tool's folder, which returns at most 8 files; else bench/results/), TAG being
# gpu_check or gpu_check_dry: TAG.N-NAME.json per stage, TAG.log (every stage's output), TAG.md (the stage table,
# then the result tables). Timeouts: TIMEOUT_ENV, TIMEOUT_TESTS, TIMEOUT_GPTQ, TIMEOUT_TRAIN, TIMEOUT_PEERS (seconds).
# The interpreter is $PYTHON, else python3 (the device image has no 'python'). Nothing replaces the image's torch:
# wheels in .whl/ (bench/gpu_wheels.sh fetches llm-compressor's and quantlm's missing ones) are installed with
# --no-deps into a temporary --target folder put on PYTHONPATH, torch/nvidia/triton wheels refused; without them a
# missing package is named in stage 1 and the peer that needs it is skipped.
set -uo pipefail  # no -e: a failed stage never stops the ones after it
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
dest="${OUT:-bench/results}"
mkdir -p "$dest"
tag=gpu_check
dry=()
skip=","
blocks=()
while (($#)); do
  case "$1" in
    --dry-run) tag=gpu_check_dry; dry=(--dry-run) ;;
    --skip) shift; skip=",${1:-},"; [[ -n "${1:-}" ]] || { echo "--skip needs stages, e.g. 4,5" >&2; exit 2; } ;;
    --blocks) shift; blocks=(--blocks "${1:?--blocks needs a number}") ;;
    *) echo "unknown argument: $1 (use --dry-run, --skip N[,N], --blocks N)" >&2; exit 2 ;;
  esac
  shift
done
log="$dest/$tag.log"
md="$dest/$tag.md"
: > "$log"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
site=""
cleanup() { [[ -n "$site" ]] && rm -rf "$site"; }
trap cleanup EXIT
have_timeout=1
command -v timeout > /dev/null 2>&1 || have_timeout=0

rows=()
failed=()
write_md() {
  {
    echo "# bench/gpu_check.sh${dry:+ --dry-run}: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo
    echo "| stage | status | seconds | timeout |"
    echo "|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
  } > "$md.tmp" && mv "$md.tmp" "$md"
}

# run_stage NUM NAME TIMEOUT CMD...: the command under its timeout, its output appended to the log
run_stage() {
  local num=$1 name=$2 limit=$3
  shift 3
  if [[ "$skip" == *",$num,"* || "$skip" == *",$name,"* ]]; then
    rows+=("| $num $name | skipped (--skip) | | |")
    write_md
    return
  fi
  echo "=== stage $num $name: $* (timeout ${limit} s) at $(date -u '+%H:%M:%S')" >> "$log"
  local t0=$SECONDS rc
  if ((have_timeout)); then
    timeout --kill-after=15 "$limit" "$@" >> "$log" 2>&1
  else
    "$@" >> "$log" 2>&1
  fi
  rc=$?
  local dt=$((SECONDS - t0)) status=ok
  if ((rc == 124 || rc == 137)); then
    status="TIMEOUT (rc $rc)"
  elif ((rc != 0)); then
    status="FAILED (rc $rc)"
  fi
  ((rc == 0)) || failed+=("$num-$name")
  echo "=== stage $num $name: $status in ${dt} s" >> "$log"
  rows+=("| $num $name | $status | $dt | $limit |")
  write_md
}

stage_file() { echo "$dest/$tag.$1.json"; }

# 1: the shell's view of the machine (never stops the check), then the interpreter's
{
  echo "=== probe $(date -u '+%Y-%m-%d %H:%M:%S UTC') commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader 2>&1 || echo "no nvidia-smi"
  lscpu 2>/dev/null | grep -E 'Model name|^CPU\(s\)' || echo "no lscpu"
  free -g 2>/dev/null | head -2 || echo "no free"
  uptime 2>/dev/null || echo "no uptime"
  df -h "${TMPDIR:-/tmp}" 2>/dev/null | tail -1 || true
  ((have_timeout)) || echo "no timeout binary: stages run without their timeouts"
  "$PY" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1 || true
} >> "$log" 2>&1
if ((${#dry[@]} == 0)) && compgen -G ".whl/*.whl" > /dev/null; then
  wheels=()
  for w in .whl/*.whl; do
    case "$(basename "$w")" in
      torch-*|torchvision-*|torchaudio-*|triton-*|nvidia_*|nvidia-*) echo "refused $w: never replace the image's torch" >> "$log" ;;
      *) wheels+=("$w") ;;
    esac
  done
  site=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-site.XXXXXX")
  if ((${#wheels[@]})) && "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
      "${wheels[@]}" >> "$log" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:$site"
    echo "installed beside the image's packages (--target $site): ${wheels[*]}" >> "$log"
  else
    echo "the wheels in .whl/ did not install (see above): stages go on with the image's packages" >> "$log"
  fi
fi
run_stage 1 env "${TIMEOUT_ENV:-30}" "$PY" bench/bench_gpu.py env "${dry[@]}" --json "$(stage_file 1-env)"
run_stage 2 tests "${TIMEOUT_TESTS:-100}" "$PY" bench/bench_gpu.py tests "${dry[@]}" --json "$(stage_file 2-tests)" \
  --timeout $(( ${TIMEOUT_TESTS:-100} - 5 ))
run_stage 3 gptq "${TIMEOUT_GPTQ:-180}" "$PY" bench/bench_gpu.py gptq "${dry[@]}" "${blocks[@]}" \
  --json "$(stage_file 3-gptq)"
run_stage 4 train "${TIMEOUT_TRAIN:-75}" "$PY" bench/bench_gpu.py train "${dry[@]}" --json "$(stage_file 4-train)"
run_stage 5 peers "${TIMEOUT_PEERS:-150}" "$PY" bench/bench_gpu.py peers "${dry[@]}" "${blocks[@]}" \
  --json "$(stage_file 5-peers)" --budget $(( ${TIMEOUT_PEERS:-150} - 10 ))

write_md
{
  echo
  "$PY" bench/bench_gpu.py report "$dest" "$tag" 2>> "$log" || echo "(the result tables could not be written: see $tag.log)"
  if ((${#failed[@]})); then echo; echo "FAILED stages: ${failed[*]}"; fi
} >> "$md"
cat "$md"
if ((${#failed[@]})); then
  echo "gpu_check: FAILED stages: ${failed[*]} (their output: $log)" >&2
  exit 1
fi
