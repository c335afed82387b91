#!/usr/bin/env bash
# CI: quantlm as a user gets it from a wheel. Build the wheel, install it into a fresh virtualenv, and from a
# directory outside the checkout run `quantlm size`, `quantlm suite --dry-run` (the shipped manifest) and a tiny
# `quantlm quantize` with the shipped calibration sample; then check that nothing was written outside that
# working directory (not into the checkout, the install, $HOME or anywhere else under the scratch root).
#
#   bash .ci/wheel.sh            # KEEP=1 keeps the scratch root (its path is printed)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
export PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python3}

ROOT=$(mktemp -d "${TMPDIR:-/tmp}/quantlm-wheel.XXXXXX")
cleanup() { if [ "${KEEP:-0}" = 1 ]; then echo "wheel: kept $ROOT"; else rm -rf "$ROOT"; fi; }
trap cleanup EXIT
DIST=$ROOT/dist VENV=$ROOT/venv WORK=$ROOT/work FAKEHOME=$ROOT/home
mkdir -p "$DIST" "$WORK" "$FAKEHOME"

echo "wheel: building (from a copy of the work tree, so the build's own scratch stays out of the checkout)"
mkdir -p "$ROOT/src"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$ROOT/src"
"$PY" -m pip wheel -q --no-deps "$ROOT/src" -w "$DIST"
WHEEL=$(ls "$DIST"/quantlm-*.whl)
"$PY" - "$WHEEL" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["quantlm/resources/recipes/suite-tiny.yaml", "quantlm/resources/calibration/c4_sample.jsonl",
        "quantlm/resources/data/corpus/austen-emma.txt", "quantlm/resources/data/eval/wikitext2/wiki.test.raw"]
missing = [n for n in need if n not in names]
assert not missing, f"the wheel lacks {missing}"
print(f"wheel: {len(names)} files, shipped data included")
EOF

echo "wheel: installing into a fresh virtualenv"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q torch==2.13.0      # CPU build from the machine's disk; unpinned pulls CUDA
"$VENV/bin/python" -m pip install -q "$WHEEL"
QL=$VENV/bin/quantlm

# Snapshot of what must not change, taken after the install.
CHECKOUT_BEFORE=$(git -C "$REPO" status --porcelain --ignored | sort)
STAMP=$ROOT/.stamp
touch "$STAMP"
sleep 1

cd "$WORK"
export HOME=$FAKEHOME HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLCONFIGDIR=$WORK/.mpl
export TMPDIR=$WORK/.tmp && mkdir -p "$TMPDIR"

echo "wheel: quantlm size"
"$QL" size floatlm-99m quantlm-99m-4bit trilm-99m >size.txt
grep -q "trilm-99m" size.txt

echo "wheel: quantlm suite --dry-run (the shipped tiny manifest)"
"$QL" suite --dry-run >plan.txt
grep -q "quantize/quantlm-micro-4bit-s0" plan.txt

echo "wheel: a tiny quantize with the shipped calibration"
"$VENV/bin/python" - <<'EOF'
import shutil
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from quantlm.paths import data_dir
from quantlm.tokenizer import train_bpe_tokenizer

text = (data_dir() / "corpus" / "austen-persuasion.txt").read_text(encoding="utf-8")[:100_000]
train_bpe_tokenizer([text], vocab_size=512, out_dir="tiny")
torch.manual_seed(0)
config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
LlamaForCausalLM(config).save_pretrained("tiny")
EOF
"$QL" quantize tiny --bits 4 --group-size 32 --nsamples 4 --seqlen 32 --out q4 --no-progress >quantize.txt
grep -q "c4_sample.jsonl" q4/report.json
test -f q4/unpacked/model.safetensors
"$QL" size q4/unpacked >/dev/null

echo "wheel: nothing written outside $WORK"
cd "$REPO"
OUTSIDE=$(find "$ROOT" -newer "$STAMP" -not -path "$WORK" -not -path "$WORK/*" -print)
if [ -n "$OUTSIDE" ]; then
  echo "wheel: FAILED: written outside the working directory:" >&2
  echo "$OUTSIDE" | head -20 >&2
  exit 1
fi
if [ "$(git -C "$REPO" status --porcelain --ignored | sort)" != "$CHECKOUT_BEFORE" ]; then
  echo "wheel: FAILED: the checkout changed:" >&2
  diff <(echo "$CHECKOUT_BEFORE") <(git -C "$REPO" status --porcelain --ignored | sort) >&2 || true
  exit 1
fi
echo "wheel: 1 passed, 0 failed"
