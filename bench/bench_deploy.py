"""bench/deploy_cpu.md: the Spectra 99M shape in llama.cpp on this CPU, every GGUF type quantlm writes, one run.

1. The 99M FloatLM and TriLM shapes (``floatlm-99m`` / ``trilm-99m`` presets: hidden 512, GLU 1280, 16 blocks,
   vocab 50304), randomly initialised (speed and memory do not depend on the values), saved as HF checkpoints
   with a 4096-token byte-level BPE trained on the shipped corpus (the GGUF vocabulary is padded to 50304).
2. Through the CLI: ``quantlm export --format gguf`` (F16; TriLM TQ1_0 and TQ2_0) and
   ``quantlm quantize --formats gguf`` (GPTQ 8-bit per channel -> Q8_0, 4-bit group 128 -> Q4_0, 3-bit per
   channel -> Q3_K; the shipped C4 calibration sample, 16 x 256 tokens: enough for the codes' layout).
3. ``quantlm bench`` on the six files in one run (n_threads=1), in the interpreter that has llama_cpp.
4. Writes WORK/bench.json (the records) and bench/results/deploy_cpu.json (records + lscpu, versions, load).

Every step is skipped when its output exists. Usage:
  python bench/bench_deploy.py [--work /tmp/quantlm-deploy] [--python .venv-llamacpp/bin/python]
      [--prompt-tokens 128] [--decode-tokens 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUANT = {"Q8_0": (8, -1), "Q4_0": (4, 128), "Q3_K": (3, -1)}  # type -> (bits, group size) of the GPTQ code


def sh(args: list[str], env: dict) -> str:
    print("$ " + " ".join(str(a) for a in args), file=sys.stderr, flush=True)
    t0 = time.time()
    out = subprocess.run([str(a) for a in args], cwd=REPO, env=env, check=True, stdout=subprocess.PIPE,
                         text=True).stdout
    print(f"  ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    return out


def make_models(work: Path) -> tuple[Path, Path]:
    """Random-init 99M FloatLM and TriLM checkpoints (fp16) with a BPE tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    sys.path.insert(0, str(REPO))
    from quantlm.models.trilm import build_trilm, export_unpacked
    from quantlm.paths import data_dir
    from quantlm.specs import get_preset
    from quantlm.tokenizer import train_bpe_tokenizer

    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        text = "".join(p.read_text(encoding="utf-8") for p in sorted((data_dir() / "corpus").glob("*.txt")))
        train_bpe_tokenizer([text], vocab_size=4096, out_dir=tok_dir)
    float_dir, tri_dir = work / "floatlm-99m", work / "trilm-99m"
    torch.manual_seed(0)
    if not (float_dir / "config.json").is_file():
        LlamaForCausalLM(get_preset("floatlm-99m").to_hf_config()).to(torch.float16).save_pretrained(float_dir)
    if not (tri_dir / "config.json").is_file():
        export_unpacked(build_trilm(get_preset("trilm-99m")), tri_dir)
    for d in (float_dir, tri_dir):
        for f in tok_dir.iterdir():
            shutil.copy(f, d / f.name)
    return float_dir, tri_dir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/quantlm-deploy")
    ap.add_argument("--python", default=str(REPO / ".venv-llamacpp" / "bin" / "python"),
                    help="interpreter with llama_cpp (bash .ci/llamacpp.sh builds it)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prepare", action="store_true", help="only write the six GGUF files (measure later)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    quantlm = [sys.executable, "-m", "quantlm"]

    float_dir, tri_dir = make_models(work)
    files = {}
    for name, src, extra in (("F16", float_dir, []), ("TQ1_0", tri_dir, []), ("TQ2_0", tri_dir, ["--type", "TQ2_0"])):
        out = work / f"gguf-{name}"
        if not (out / "model.gguf").is_file():
            sh([*quantlm, "export", src, "--format", "gguf", "--out", out, *extra], env)
        files[name] = out / "model.gguf"
    for name, (bits, group) in QUANT.items():
        out = work / f"q-{name}"
        if not (out / "gguf" / "model.gguf").is_file():
            sh([*quantlm, "quantize", float_dir, "--bits", bits, "--group-size", group, "--nsamples", 16, "--seqlen",
                256, "--formats", "gguf", "--out", out, "--no-progress"], env)
        files[name] = out / "gguf" / "model.gguf"
    order = ["F16", "Q8_0", "Q4_0", "Q3_K", "TQ2_0", "TQ1_0"]
    for name in order:  # the file holds the type it was made for
        head = json.loads(sh([*quantlm, "size", files[name], "--format", "json", "--convention", "exact"], env))[0]
        assert name in head["layout"], (name, head["layout"])
    if args.prepare:
        return 0

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    load_before = os.getloadavg()
    out = sh([args.python, "-m", "quantlm", "bench", *[files[n] for n in order], "--threads", args.threads,
              "--prompt-tokens", args.prompt_tokens, "--decode-tokens", args.decode_tokens, "--repeats", args.repeats,
              "--format", "json", "--no-progress"], env)
    load_after = os.getloadavg()
    records = json.loads(out)
    for name, r in zip(order, records, strict=True):
        r["type"] = name
    (work / "bench.json").write_text(json.dumps(records, indent=1))
    import platform

    versions = subprocess.run([args.python, "-c", "import json, llama_cpp, gguf, torch, transformers; print(json.dumps("
                               "{'llama_cpp': llama_cpp.__version__, 'torch': torch.__version__, 'transformers': "
                               "transformers.__version__, 'python': __import__('platform').python_version()}))"],
                              capture_output=True, text=True, env={**env, "PYTHONPATH": ""}).stdout
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": commit.strip(), "host": platform.node(),
              "lscpu": lscpu, "versions": versions.strip(), "load_avg_before": load_before,
              "load_avg_after": load_after, "records": records}
    dest = REPO / "bench" / "results" / "deploy_cpu.json"
    dest.write_text(json.dumps(result, indent=1) + "\n")
    f16 = next(r for r in records if r["type"] == "F16")
    print("| type | GGUF bytes | bits/weight (file) | block linears bits/weight | decode tok/s | x F16 | prompt tok/s "
          "| peak RSS MB |\n|---|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['type']} | {r['gguf_bytes']:,} | {r['bits_per_weight']:.3f} | {r['linear_bits_per_weight']:.4f} "
              f"| {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / f16['decode_tok_s']:.2f} | {r['prompt_tok_s']:.0f} "
              f"| {r['rss_mb']:.0f} |")
    print(f"load average before {load_before}, after {load_after}; wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
