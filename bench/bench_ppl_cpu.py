"""Issue-3 perplexity criterion, end to end through the quantlm CLI, on a small FloatLM trained for the purpose.

1. ``quantlm train recipes/floatlm-micro.yaml`` with a longer budget (default 300 steps x 8192 tokens of 256,
   ~2.5M tokens of the shipped Gutenberg corpus; about 8 minutes on one CPU thread), so the blocks matter.
2. ``quantlm quantize`` at 8 bits (per channel) and 4 and 3 bits (group 128), GPTQ (calibration seeds 0 and 1)
   and round-to-nearest (``--rtn``), with the shipped C4 calibration sample (default 128 x 256 tokens).
3. ``quantlm eval --ppl wikitext2,<held-out Gutenberg text> --window 256`` on the float model and every
   ``unpacked`` export; one JSON record each under WORK/records.
4. Prints a markdown table and writes WORK/ppl.json; states which criteria hold:
   8-bit within 1% of float, 4-bit GPTQ < 4-bit RTN, 3-bit GPTQ clearly (>= 2%) < 3-bit RTN, for every seed
   and corpus, plus the fraction of RTN's perplexity increase that GPTQ leaves.

``--corpus`` trains on other text than the shipped Gutenberg books (e.g. Gutenberg + C4 documents that the
calibration sample does not contain, so WikiText-2 is less far out of domain).

Every step is skipped when its output already exists, so an interrupted run resumes.

Usage: python bench/bench_ppl_cpu.py [--work /work/runs/ppl] [--steps 300] [--seeds 0,1]
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
VARIANTS = ((8, -1), (4, 128), (3, 128))
CLEARLY = 0.02  # "clearly better": at least 2% lower perplexity


def sh(args: list[str], env: dict) -> str:
    print("$ " + " ".join(args), file=sys.stderr, flush=True)
    t0 = time.time()
    out = subprocess.run(args, cwd=REPO, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    print(f"  ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    return out


def quantlm(*args: str) -> list[str]:
    return [sys.executable, "-m", "quantlm", *args]


def write_heldout(run: Path, out: Path) -> Path:
    """The trainer's held-out split (last 5% of the corpus tokens) as text, for `quantlm eval --ppl FILE`."""
    if not out.is_file():
        sys.path.insert(0, str(REPO))
        from quantlm import recipes
        from quantlm.train.data import heldout_text
        from quantlm.train.recipe import TrainRecipe

        out.write_text(heldout_text(recipes.load(run / "recipe.yaml", expect=TrainRecipe)), encoding="utf-8")
    return out


def evaluate(model: Path, name: str, corpora: str, window: int, records: Path, cache: Path, env: dict) -> dict:
    if not cache.is_file():
        rec = json.loads(sh(quantlm("eval", str(model), "--ppl", corpora, "--window", str(window),
                                    "--ppl-batch-size", "8", "--results", str(records), "--format", "json"), env))
        cache.write_text(json.dumps(rec, indent=1, default=str))
    rec = json.loads(cache.read_text())
    return {k: m["ppl"] for k, m in rec["metrics"].items() if "ppl" in m}


def layer_error(report: Path) -> float:
    """Sum over modules of trace((W-Q) H (W-Q)^T) from a quantize report.json (H from the calibration inputs)."""
    return float(json.loads(report.read_text())["total_error"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/quantlm-ppl", help="run folder (outside the checkout)")
    ap.add_argument("--recipe", default="recipes/floatlm-micro.yaml")
    ap.add_argument("--corpus", default="", help="training corpus override, YAML list (default: the recipe's)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--seeds", default="0,1", help="GPTQ calibration seeds")
    ap.add_argument("--window", type=int, default=256, help="perplexity window")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))

    run = work / "float"
    if not (run / "final" / "config.json").is_file() and not (run / "hf" / "config.json").is_file():
        sh(quantlm("train", args.recipe, "--out", str(run), "--steps", str(args.steps), "--seq_len",
                   str(args.seq_len), "--batch_tokens", str(args.batch_tokens), "--micro_batch", "16",
                   "--warmup_steps", str(max(1, args.steps // 10)), "--checkpoint_interval", str(args.steps),
                   "--eval_tokens", "65536", "--threads", str(args.threads),
                   *(["--corpus", args.corpus] if args.corpus else [])), env)
    model = next(p for p in (run / "final", run / "hf", run) if (p / "config.json").is_file())
    heldout = write_heldout(run, work / "heldout.txt")
    corpora = f"wikitext2,{heldout}"
    records, evals = work / "records", work / "evals"
    evals.mkdir(exist_ok=True)

    rows: dict[str, dict] = {"float": evaluate(model, "float", corpora, args.window, records,
                                               evals / "float.json", env)}
    seeds = [int(s) for s in args.seeds.split(",")]
    for bits, gs in VARIANTS:
        for method, seed in [("gptq", s) for s in seeds] + [("rtn", 0)]:
            name = f"{bits}bit-{method}" + (f"-s{seed}" if method == "gptq" else "")
            out = work / name
            if not (out / "report.json").is_file():
                sh(quantlm("quantize", str(model), "--bits", str(bits), "--group-size", str(gs),
                           "--nsamples", str(args.nsamples), "--seqlen", str(args.calib_seqlen), "--seed",
                           str(seed), "--format", "unpacked", "--out", str(out), "--no-progress",
                           *(["--rtn"] if method == "rtn" else [])), env)
            rows[name] = evaluate(out / "unpacked", name, corpora, args.window, records, evals / f"{name}.json",
                                  env)
            rows[name]["layer_error"] = layer_error(out / "report.json")

    corpus_keys = list(rows["float"])
    print("| model | " + " | ".join(f"{k} ppl | vs float" for k in corpus_keys) + " | sum of layer errors |")
    print("|---|" + "---|---|" * len(corpus_keys) + "---|")
    for name, r in rows.items():
        cells = [f"{r[k]:.3f} | {100 * (r[k] / rows['float'][k] - 1):+.2f}%" for k in corpus_keys]
        loss = r.get("layer_error")
        print(f"| {name} | " + " | ".join(cells) + f" | {'' if loss is None else f'{loss:.4g}'} |")

    verdict = {}
    for k in corpus_keys:
        f = rows["float"][k]
        g = {b: [rows[f"{b}bit-gptq-s{s}"][k] for s in seeds] for b, _ in VARIANTS}
        verdict[k] = {
            "8bit_within_1pct": all(abs(v / f - 1) <= 0.01 for v in g[8] + [rows["8bit-rtn"][k]]),
            "4bit_gptq_beats_rtn": all(v < rows["4bit-rtn"][k] for v in g[4]),
            "3bit_gptq_clearly_beats_rtn": all(v <= (1 - CLEARLY) * rows["3bit-rtn"][k] for v in g[3]),
            # how much of RTN's perplexity increase over float GPTQ leaves (1 = none removed, 0 = all)
            "gap_ratio_gptq_over_rtn": {b: [round((v - f) / (rows[f"{b}bit-rtn"][k] - f), 3)
                                            for v in g[b]] for b in (4, 3)},
        }
    print("\n" + json.dumps(verdict, indent=1))
    (work / "ppl.json").write_text(json.dumps({"args": vars(args), "model": str(model), "ppl": rows,
                                               "criteria": verdict}, indent=1))
    return 0 if all(all(x for x in v.values() if isinstance(x, bool)) for v in verdict.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
