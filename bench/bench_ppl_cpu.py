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

Usage: python bench/bench_ppl_cpu.py [--work /work/runs/ppl] [--steps 300] [--seeds 0,1] [--variants 8:-1,4:128,3:128]
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
VARIANTS = ((8, -1), (4, 128), (3, 128))  # the Spectra QuantLM recipes (recipes/quantlm-*bit.yaml)


def variant_label(bits: int, group_size: int) -> str:
    if (bits, group_size) in VARIANTS:
        return f"{bits}bit"
    return f"{bits}bit-" + ("pc" if group_size == -1 else f"g{group_size}")
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


def temperature_scan(model: Path, corpora: list[str], window: int, windows: int = 120,
                     temps=(0.9, 1.0, 1.1, 1.2)) -> dict:
    """Perplexity of the float model with its logits divided by T, on the first ``windows`` windows of each
    corpus. A model that is calibrated on a corpus has its minimum near T = 1; an over-confident one (out of
    domain) improves with T > 1, and then quantization noise can *lower* its perplexity there."""
    sys.path.insert(0, str(REPO))
    import torch

    from quantlm.eval.datasets import load_text_source
    from quantlm.hf_checkpoint import load_causal_lm, load_tokenizer

    lm, tok = load_causal_lm(model), load_tokenizer(model)
    out = {}
    for name in corpora:
        ids = tok(load_text_source(name).text, return_tensors="pt").input_ids[0]
        n = min(windows, ids.numel() // window)
        batch = ids[: n * window].view(n, window)
        nll = {t: 0.0 for t in temps}
        with torch.no_grad():
            for b in range(0, n, 8):
                x = batch[b : b + 8]
                logits = lm(input_ids=x, use_cache=False).logits[:, :-1].float()
                for t in temps:
                    nll[t] += float(torch.nn.functional.cross_entropy(
                        (logits / t).reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
        out[Path(name).stem] = {str(t): round(float(torch.tensor(v / (n * (window - 1))).exp()), 3)
                                for t, v in nll.items()}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/quantlm-ppl", help="run folder (outside the checkout)")
    ap.add_argument("--recipe", default=str(REPO / "quantlm" / "resources" / "recipes" / "floatlm-micro.yaml"))
    ap.add_argument("--corpus", default="", help="training corpus override, YAML list (default: the recipe's)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--calib", default="", help="calibration text for quantize --calib (default: the shipped C4 sample)")
    ap.add_argument("--seeds", default="0,1", help="GPTQ calibration seeds")
    ap.add_argument("--variants", default=",".join(f"{b}:{g}" for b, g in VARIANTS),
                    help="bits:group_size list (group -1 = per channel; labelled '-pc' outside the recipes)")
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
    variants = [tuple(int(x) for x in v.split(":")) for v in args.variants.split(",")]
    for bits, gs in variants:
        for method, seed in [("gptq", s) for s in seeds] + [("rtn", 0)]:
            name = f"{variant_label(bits, gs)}-{method}" + (f"-s{seed}" if method == "gptq" else "")
            out = work / name
            if not (out / "report.json").is_file():
                sh(quantlm("quantize", str(model), "--bits", str(bits), "--group-size", str(gs),
                           "--nsamples", str(args.nsamples), "--seqlen", str(args.calib_seqlen), "--seed",
                           str(seed), "--format", "unpacked", "--out", str(out), "--no-progress",
                           *(["--calib", args.calib] if args.calib else []),
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
        verdict[k] = {}
        for bits, gs in variants:
            label = variant_label(bits, gs)
            gptq, rtn = [rows[f"{label}-gptq-s{s}"][k] for s in seeds], rows[f"{label}-rtn"][k]
            v = {"gptq_beats_rtn": all(x < rtn for x in gptq),
                 "gptq_clearly_beats_rtn": all(x <= (1 - CLEARLY) * rtn for x in gptq),
                 # how much of RTN's perplexity increase over float GPTQ leaves (1 = none removed, 0 = all)
                 "gap_ratio_gptq_over_rtn": [round((x - f) / (rtn - f), 3) for x in gptq]}
            if bits == 8:
                v["within_1pct"] = all(abs(x / f - 1) <= 0.01 for x in [*gptq, rtn])
            verdict[k][label] = v
    temps = temperature_scan(model, ["wikitext2", str(heldout)], args.window)
    print("\nfloat model, ppl with logits / T (first 120 windows):", json.dumps(temps))
    print("\n" + json.dumps(verdict, indent=1))
    (work / "ppl.json").write_text(json.dumps({"args": vars(args), "model": str(model), "ppl": rows,
                                               "criteria": verdict, "temperature_scan": temps}, indent=1))
    # the criteria: 8-bit within 1%, 4-bit GPTQ < RTN, 3-bit GPTQ clearly < RTN (recipe variants)
    needed = {"8bit": "within_1pct", "4bit": "gptq_beats_rtn", "3bit": "gptq_clearly_beats_rtn"}
    return 0 if all(verdict[k][lab][c] for k in verdict for lab, c in needed.items() if lab in verdict[k]) else 1


if __name__ == "__main__":
    sys.exit(main())
