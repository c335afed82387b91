"""Why quantlm for GGUF: GPTQ 4-bit codes in Q4_0 against llama.cpp's own round-to-nearest Q4_0, in llama.cpp.

The same FloatLM (trained for the purpose: ``python -m quantlm train floatlm-tiny --steps 500
--batch-tokens 4096 ...``), the same file size (Q4_0: 4.5 bits per block-linear weight), two ways to fill it:
* ``quantlm quantize --bits 4 --group-size 32 --formats gguf``: GPTQ (symmetric, act-order with static groups)
  calibrated on the training part of the corpus, codes and fp16 scales written into Q4_0 bit for bit;
* ``quantlm export --format gguf --type Q4_0``: gguf-py's ``quants.quantize(Q4_0)`` of the F16 weights, the
  round-to-nearest that llama.cpp's own converter applies (its scale maps each block's largest weight to -8).
Also: F16 (the reference) and quantlm's RTN through the GPTQ pipeline (``--rtn``). Each file is scored by
llama.cpp itself on the held-out 5% of the training corpus (never seen in training or calibration), in
non-overlapping windows of the training length; the differences are paired per token, with standard errors.

Usage (main env for the files, the llama.cpp env for the scores; each step is skipped when its output exists):
  python bench/bench_gguf_gptq.py --model RUN/final --recipe quantlm/resources/recipes/floatlm-tiny.yaml --work WORK \\
      [--seeds 0,1,2] [--nsamples 128] [--seqlen 128] [--python .venv-llamacpp/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def sh(args, env) -> None:
    print("$ " + " ".join(map(str, args)), file=sys.stderr, flush=True)
    t0 = time.time()
    subprocess.run([str(a) for a in args], cwd=REPO, env=env, check=True)
    print(f"  ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)


def texts(recipe_path: str, work: Path, window: int) -> tuple[Path, Path]:
    """WORK/calib.txt (the training part of the corpus, as text) and WORK/heldout.json (held-out windows of ids)."""
    calib, heldout = work / "calib.txt", work / "heldout.json"
    if calib.is_file() and heldout.is_file():
        return calib, heldout
    sys.path.insert(0, str(REPO))
    import numpy as np

    from quantlm import recipes
    from quantlm.train.data import load_or_train_tokenizer, load_token_corpus
    from quantlm.train.recipe import TrainRecipe

    recipe = recipes.load(recipe_path, expect=TrainRecipe)
    corpus = load_token_corpus(recipe)
    tok = load_or_train_tokenizer(recipe)
    train_ids = np.asarray(corpus.tokens[: corpus.heldout_start], dtype=np.int64)
    calib.write_text(tok.decode(train_ids.tolist()), encoding="utf-8")
    held = np.asarray(corpus.tokens[corpus.heldout_start:], dtype=np.int64)
    n = len(held) // window
    heldout.write_text(json.dumps(held[: n * window].reshape(n, window).tolist()))
    return calib, heldout


def measure(work: Path, threads: int) -> None:
    """In the llama.cpp env: per-token NLL of every GGUF under WORK (WORK/nll.json)."""
    sys.path.insert(0, str(REPO))
    import numpy as np

    from quantlm.deploy import token_nll

    windows = json.loads((work / "heldout.json").read_text())
    files = json.loads((work / "files.json").read_text())
    nll = {}
    for name, path in files.items():
        t0 = time.time()
        nll[name] = token_nll(path, windows, threads=threads).tolist()
        print(f"{name}: mean NLL {np.mean(nll[name]):.5f} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    (work / "nll.json").write_text(json.dumps(nll))


def summarize(work: Path) -> dict:
    import numpy as np

    nll = {k: np.asarray(v) for k, v in json.loads((work / "nll.json").read_text()).items()}
    files = json.loads((work / "files.json").read_text())
    rtn = nll["rtn-llamacpp"]
    rows = []
    for name, v in nll.items():
        d = v - rtn
        rows.append({"model": name, "tokens": len(v), "mean_nll": float(v.mean()), "ppl": float(np.exp(v.mean())),
                     "vs_llamacpp_rtn": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d))),
                     "bytes": Path(files[name]).stat().st_size})
    print("| GGUF | file bytes | held-out tokens | mean NLL | perplexity | NLL - llama.cpp RTN Q4_0 (paired, +- 1 SE) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['bytes']:,} | {r['tokens']:,} | {r['mean_nll']:.5f} | {r['ppl']:.3f} | "
              f"{r['vs_llamacpp_rtn']:+.5f} +- {r['se']:.5f} |")
    result = {"rows": rows}
    (work / "summary.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="trained FloatLM checkpoint directory")
    ap.add_argument("--recipe", required=True, help="its train recipe (held-out split and calibration text)")
    ap.add_argument("--work", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=128, help="calibration window (and held-out window) length")
    ap.add_argument("--python", default=str(REPO / ".venv-llamacpp" / "bin" / "python"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the llama.cpp step
    args = ap.parse_args()
    work = Path(args.work)
    if args.measure:
        measure(work, args.threads)
        return 0
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    q = [sys.executable, "-m", "quantlm"]
    calib, _ = texts(args.recipe, work, args.seqlen)
    files = {}
    for name, extra in (("f16", []), ("rtn-llamacpp", ["--type", "Q4_0"])):
        out = work / name
        if not (out / "model.gguf").is_file():
            sh([*q, "export", args.model, "--format", "gguf", "--out", out, *extra], env)
        files[name] = str(out / "model.gguf")
    runs = [(f"gptq-s{s}", ["--seed", s]) for s in args.seeds.split(",")] + [("rtn-quantlm", ["--rtn"])]
    for name, extra in runs:
        out = work / name
        if not (out / "gguf" / "model.gguf").is_file():
            sh([*q, "quantize", args.model, "--bits", 4, "--group-size", args.group_size, "--calib", calib,
                "--nsamples", args.nsamples, "--seqlen", args.seqlen, "--formats", "gguf", "--out", out,
                "--no-progress", *extra], env)
        files[name] = str(out / "gguf" / "model.gguf")
    (work / "files.json").write_text(json.dumps(files, indent=1))
    if not (work / "nll.json").is_file():
        sh([args.python, __file__, "--model", args.model, "--recipe", args.recipe, "--work", work, "--measure",
            "--threads", args.threads], {**env, "OMP_WAIT_POLICY": "PASSIVE"})
    summarize(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
