"""Peak memory and wall time of quantlm's GPTQ pipeline, predicted (``plan_memory``) next to measured.

Subcommands:
  one     one quantization in THIS process (run it in a fresh process: VmHWM is the process's peak);
          random-init Spectra shape (``--preset``, ``--layers`` to cut the number of blocks), random token
          windows, 4-bit g128 act-order true-sequential; prints one JSON line (plan, measured, times, load).
  sweep   runs a list of ``one`` configurations, each in its own child process, appending to ``--out``.
  fit     least-squares fit of the memory model's constants (baseline, forward working set) from sweep
          results; prints the constants and predicted/measured per run.
  table   markdown table of sweep results.
  plans   predicted peak of the full Spectra recipe for every Spectra shape and storage mode (no compute).
  speed   same-process, interleaved wall time of fp32 / bf16 storage / bf16 forwards (ratios to fp32).
  errors  the effect of the storage and forward dtypes on layer error and output error: the same weights
          and calibration windows (shipped C4 sample) quantized with each setting, scored with the SAME
          float-model Hessians (layer error = sum over linears of tr((W - Q) H (W - Q)^T)) and on held-out
          WikiText-2 test windows (relative squared error of the final hidden states against the float
          model), over several seeds (seed = random init and calibration windows). "fp32, other windows"
          is fp32 calibrated on different windows (seed + 100), scored with the same Hessians: the size of
          the calibration-seed noise that the dtype effects are compared with.

Examples (bench/quantize_memory.md has the ones that were run):
  python bench/bench_memory.py one --preset floatlm-99m --layers 2 --nsamples 512 --seqlen 2048
  python bench/bench_memory.py sweep --grid fit --out /tmp/mem/fit.jsonl
  python bench/bench_memory.py fit /tmp/mem/fit.jsonl
  python bench/bench_memory.py errors --seeds 0 1 2 --nsamples 64 --seqlen 512
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GRIDS = {
    # small and fast: to fit the baseline and the forward working-set constants
    "fit": [
        dict(preset="floatlm-99m", layers=1, nsamples=16, seqlen=512, batch_size=1),
        dict(preset="floatlm-99m", layers=1, nsamples=16, seqlen=512, batch_size=8),
        dict(preset="floatlm-99m", layers=1, nsamples=32, seqlen=2048, batch_size=4),
        dict(preset="floatlm-99m", layers=2, nsamples=32, seqlen=2048, batch_size=8),
        dict(preset="floatlm-390m", layers=1, nsamples=16, seqlen=2048, batch_size=8),
        dict(preset="floatlm-390m", layers=1, nsamples=16, seqlen=2048, batch_size=2),
        dict(preset="floatlm-1.1b", layers=1, nsamples=8, seqlen=2048, batch_size=4),
        dict(preset="floatlm-3.9b", layers=1, nsamples=8, seqlen=2048, batch_size=2),
    ],
    # the Spectra recipe (512 x 2048) on reduced blocks: every storage dtype and offload mode
    "spectra-99m": [
        dict(preset="floatlm-99m", layers=L, nsamples=512, seqlen=2048, activation_dtype=a, offload=o)
        for a, o, L in [("float32", "host", 2), ("bfloat16", "host", 1), ("float16", "host", 1), ("float32", "disk", 1),
                        ("bfloat16", "disk", 2)]
    ],
    # the Spectra recipe again with the final code (reruns of two of the above)
    "spectra-99m-final": [
        dict(preset="floatlm-99m", layers=2, nsamples=512, seqlen=2048, activation_dtype="bfloat16", offload="disk"),
        dict(preset="floatlm-99m", layers=1, nsamples=512, seqlen=2048, activation_dtype="float32", offload="host"),
    ],
    # released weights (keep_weights off) next to kept ones, many blocks so that the codes matter
    "release": [
        dict(preset="floatlm-390m", layers=12, nsamples=8, seqlen=1024, keep_weights=k) for k in (1, 0)
    ],
    # the per-block extrapolation: the same run with a few blocks and with all of them (fewer tokens)
    "blocks": [
        dict(preset="floatlm-99m", layers=2, nsamples=32, seqlen=512),
        dict(preset="floatlm-99m", layers=16, nsamples=32, seqlen=512),
        dict(preset="floatlm-390m", layers=2, nsamples=16, seqlen=1024),
        dict(preset="floatlm-390m", layers=24, nsamples=16, seqlen=1024),
    ],
    # the Spectra recipe in full on the 99M shape (all 16 blocks), after large_tensors_in_heap
    "spectra-99m-full": [
        dict(preset="floatlm-99m", layers=16, nsamples=512, seqlen=2048, activation_dtype="float32", offload="host"),
    ],
    "spectra-390m": [
        dict(preset="floatlm-390m", layers=1, nsamples=512, seqlen=2048, activation_dtype="bfloat16", offload="host"),
    ],
    # the large shapes on one block, fewer windows (a 3.9B block at 512 x 2048 is hours on 2 cores): checks the
    # per-batch and solve terms where they are largest; the buffers are exact arithmetic checked above
    "big": [
        dict(preset="floatlm-1.1b", layers=1, nsamples=64, seqlen=2048, activation_dtype="bfloat16", offload="disk"),
        dict(preset="floatlm-3.9b", layers=1, nsamples=16, seqlen=2048, activation_dtype="bfloat16", offload="disk"),
        dict(preset="floatlm-3.9b", layers=1, nsamples=16, seqlen=2048, activation_dtype="bfloat16", offload="disk",
             weights_dtype="bfloat16"),
    ],
}


def _env() -> dict:
    import torch
    import transformers

    return {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "cpu": _cpu_name()}


def _cpu_name() -> str:
    from quantlm.deploy import cpu_name

    return cpu_name()


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _settings(args):
    from quantlm.gptq.memory import MemorySettings

    return MemorySettings(activation_dtype=args.activation_dtype, offload=args.offload, offload_dir=args.offload_dir,
                          forward_dtype=args.forward_dtype, batch_size=args.batch_size,
                          replay_cache_gb=args.replay_cache_gb, keep_weights=bool(args.keep_weights))


def gptq_recipe(bits: int = 4, group_size: int = 128, **kw):
    """The GPTQ settings the pipeline reads (bits, group size, ...)."""
    from quantlm.gptq.settings import GPTQSettings

    names = {f.name for f in dataclasses.fields(GPTQSettings)}
    return GPTQSettings(bits=bits, group_size=group_size, **{k: v for k, v in kw.items() if k in names})


def cmd_one(args) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    from quantlm.architectures import LLAMA
    from quantlm.gptq.memory import peak_rss_bytes, plan_memory, rss_bytes
    from quantlm.gptq.pipeline import quantize_blocks
    from quantlm.specs import get_preset

    load0 = os.getloadavg()
    settings = _settings(args)
    config = get_preset(args.preset).to_hf_config(num_hidden_layers=args.layers)
    dry = plan_memory(config.to_dict(), args.nsamples, args.seqlen, settings, 4, 128, "cpu",
                      weights_dtype=args.weights_dtype)
    rss_imports = rss_bytes()
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = LlamaForCausalLM(config)
    if args.weights_dtype != "float32":
        for p in model.parameters():
            p.data = p.data.to(getattr(torch, args.weights_dtype))
    t_build = time.perf_counter() - t0
    rss_model = rss_bytes()
    tokens = torch.randint(0, config.vocab_size, (args.nsamples, args.seqlen),
                           generator=torch.Generator().manual_seed(args.seed))
    t1 = time.perf_counter()
    if args.progress:  # long runs: a bar per block and the pipeline's plan / resume lines on stderr
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run = quantize_blocks(model, LLAMA, tokens, gptq_recipe(), progress=args.progress, memory=settings)
    wall = time.perf_counter() - t1
    out = {
        "config": {k: getattr(args, k) for k in ("preset", "layers", "nsamples", "seqlen", "activation_dtype",
                                                 "offload", "forward_dtype", "batch_size", "replay_cache_gb",
                                                 "weights_dtype", "keep_weights", "seed")},
        "dry_plan": dry, "plan": run.plan, "measured": run.measured,
        "measured_peak_bytes": peak_rss_bytes(), "rss_after_imports": rss_imports, "rss_after_model": rss_model,
        "quantize_s": wall, "build_s": t_build, "solve_s": sum(m.seconds for m in run.modules),
        "total_error": sum(m.error for m in run.modules), "blocks": args.layers,
        "loadavg_start": load0, "loadavg_end": os.getloadavg(), "env": _env(), "commit": _git_commit(),
    }
    print(json.dumps(out))
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(out) + "\n")
    return out


def cmd_sweep(args) -> None:
    configs = GRIDS[args.grid]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for cfg in configs:
        cmd = [sys.executable, str(Path(__file__).resolve()), "one", "--json", str(out)]
        for k, v in cfg.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        for k, v in (("offload_dir", args.offload_dir),):
            if v:
                cmd += [f"--{k.replace('_', '-')}", v]
        print("+", " ".join(cmd[2:]), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], flush=True)
            continue
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {time.perf_counter() - t0:.0f} s: measured {rec['measured_peak_bytes'] / 1e9:.3f} GB, "
              f"predicted (dry) {rec['dry_plan']['predicted_peak_bytes'] / 1e9:.3f} GB, "
              f"(in-run) {rec['plan']['predicted_peak_bytes'] / 1e9:.3f} GB, quantize {rec['quantize_s']:.1f} s, "
              f"load {rec['loadavg_start'][0]:.1f}-{rec['loadavg_end'][0]:.1f}", flush=True)


def _load(paths) -> list[dict]:
    recs = []
    for p in paths:
        recs += [json.loads(line) for line in Path(p).read_text().splitlines() if line.strip()]
    return recs


def replan(rec: dict, available: int = 10**13) -> dict:
    """The dry-run plan of a recorded run, recomputed with the current constants (same location and batch).
    Runs recorded before the pipeline trimmed only near the limit (no ``trim_allocator`` in their plan)
    trimmed always: they are replanned with a limit that turns trimming on (1.6x their measured peak)."""
    if "trim_allocator" not in rec["dry_plan"]:
        available = int(1.6 * rec["measured_peak_bytes"])
    from quantlm.gptq.memory import MemorySettings, plan_memory
    from quantlm.specs import get_preset

    c, p = rec["config"], rec["dry_plan"]
    settings = MemorySettings(activation_dtype=c["activation_dtype"], offload=p["hidden_states"],
                              forward_dtype=c["forward_dtype"], batch_size=p["batch_size"],
                              replay_cache_gb=c["replay_cache_gb"], keep_weights=bool(c.get("keep_weights", 1)))
    config = get_preset(c["preset"]).to_hf_config(num_hidden_layers=c["layers"]).to_dict()
    return plan_memory(config, c["nsamples"], c["seqlen"], settings, 4, 128, "cpu", available_bytes=available,
                       weights_dtype=c.get("weights_dtype", "float32"), disk_available_bytes=10**13)


def cmd_fit(args) -> None:
    """Fit BASELINE_CPU and K_FWD (forward-bound runs) from measured peaks; the exact terms and the solve
    working set (measured on the solver alone, bench/quantize_memory.md) are subtracted first."""
    import numpy as np

    from quantlm.gptq import memory as M

    recs = _load(args.results)
    rows, ys = [], []
    for r in recs:
        p = replan(r)
        b, s = p["bytes"], p["shape"]
        d, f = s["hidden"], s["intermediate"]
        fbytes = M.DTYPE_BYTES[p["forward_dtype"]]
        bt = p["batch_size"] * p["seqlen"]
        exact = (b["weights"] + b["results"] + b.get("allocator_slack", 0) + b["tokens"] + b["hidden_buffers"]
                 + b["replay_cache"])
        ws = p["working_sets"]
        if ws["solve"] > ws["forward"]:
            continue  # solve-bound: says nothing about the forward constant
        widest = max(d, f)
        fixed = bt * widest * 4 + widest * widest * 4 + ws["block_copy"]
        if p["hidden_states"] == "disk":
            fixed += 2 * bt * d * M.DTYPE_BYTES[p["activation_dtype"]]
        rows.append([1.0, bt * (d + f) * fbytes])
        ys.append(r["measured_peak_bytes"] - exact - fixed)
    coef, *_ = np.linalg.lstsq(np.array(rows), np.array(ys), rcond=None)
    print(f"fitted ({len(ys)} forward-bound runs): BASELINE_CPU = {coef[0]:.4g}  K_FWD = {coef[1]:.3f}")
    print(f"in memory.py:            BASELINE_CPU = {M.BASELINE_CPU:.4g}  K_FWD = {M.K_FWD}")
    if args.apply:
        M.BASELINE_CPU, M.K_FWD = float(coef[0]), float(coef[1])
    cmd_table(args)


def cmd_table(args) -> None:
    recs = _load(args.results)
    print("| shape | blocks | windows x tokens | batch | storage | hidden states | forward | measured peak (GB) "
          "| predicted (GB) | predicted / measured | in-run prediction (GB) | quantize (s) | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in recs:
        c, q = r["config"], r["plan"]
        p = replan(r)
        m = r["measured_peak_bytes"]
        print(f"| {c['preset']} | {c['layers']} | {c['nsamples']} x {c['seqlen']} | {p['batch_size']} | "
              f"{c['activation_dtype']} | {p['hidden_states']} | {c['forward_dtype']} | {m / 1e9:.3f} | "
              f"{p['predicted_peak_bytes'] / 1e9:.3f} | {p['predicted_peak_bytes'] / m:.3f} | "
              f"{q['predicted_peak_bytes'] / 1e9:.3f} | {r['quantize_s']:.1f} | "
              f"{r['loadavg_start'][0]:.1f}-{r['loadavg_end'][0]:.1f} |")


# ------------------------------------------------------------------------------------------ errors

def _tokenizer(work: Path, vocab: int):
    """A BPE (at most 8192 tokens, as bench/quantize_cpu.md) trained on the shipped corpus, cached in ``work``."""
    from quantlm.hf_checkpoint import load_tokenizer
    from quantlm.tokenizer import train_bpe_tokenizer

    vocab = min(8192, vocab)
    tok_dir = work / f"tokenizer-{vocab}"
    if not (tok_dir / "tokenizer.json").is_file():
        from quantlm.paths import data_dir

        text = (data_dir() / "corpus" / "austen-persuasion.txt").read_text(encoding="utf-8")
        train_bpe_tokenizer([text], vocab_size=vocab, out_dir=tok_dir)
    return load_tokenizer(tok_dir)


def _float_hessians(model, tokens) -> dict:
    from bench_quantize_cpu import linear_hessians  # beside this script: the one Hessian loop of the benches

    return linear_hessians(model, tokens)


def _final_hidden(model, tokens, batch: int = 8):
    import torch

    with torch.no_grad():
        return torch.cat([model.model(input_ids=tokens[s:s + batch]).last_hidden_state
                          for s in range(0, tokens.shape[0], batch)])


def cmd_errors(args) -> None:
    import torch
    from transformers import LlamaForCausalLM

    from quantlm.architectures import LLAMA
    from quantlm.calibration import calibration_tokens
    from quantlm.gptq.memory import MemorySettings
    from quantlm.gptq.pipeline import quantize_blocks
    from quantlm.gptq.solver import reconstruction_error
    from quantlm.specs import get_preset

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(work, get_preset(args.preset).to_hf_config().vocab_size)
    variants = {
        "fp32": MemorySettings(),
        "bf16 storage": MemorySettings(activation_dtype="bfloat16"),
        "fp16 storage": MemorySettings(activation_dtype="float16"),
        "bf16 forward": MemorySettings(forward_dtype="bfloat16", activation_dtype="float32"),
        "bf16 forward+storage": MemorySettings(forward_dtype="bfloat16", activation_dtype="bfloat16"),
    }
    variants["fp32, other windows"] = MemorySettings()  # the calibration-seed noise: same weights, new windows
    if args.variants:
        variants = {k: v for k, v in variants.items() if k in args.variants}
    from quantlm.eval.datasets import load_text_source

    held_ids = tok(load_text_source("wikitext2").text, return_tensors="pt").input_ids[0]
    out = {"env": _env(), "commit": _git_commit(), "args": vars(args), "loadavg_start": os.getloadavg(), "runs": []}
    for seed in args.seeds:
        config = get_preset(args.preset).to_hf_config(num_hidden_layers=args.layers) if args.layers else \
            get_preset(args.preset).to_hf_config()
        torch.manual_seed(seed)
        base = LlamaForCausalLM(config).eval()
        calib = calibration_tokens(tok, None, args.nsamples, args.seqlen, seed)
        heldout = held_ids[: args.heldout * args.seqlen].view(args.heldout, args.seqlen)  # WikiText-2 test
        H = _float_hessians(base, calib)
        ref = _final_hidden(base, heldout)
        for name, settings in variants.items():
            model = copy.deepcopy(base)
            windows = calib if name != "fp32, other windows" else calibration_tokens(
                tok, None, args.nsamples, args.seqlen, 100 + seed)
            t0 = time.perf_counter()
            run = quantize_blocks(model, LLAMA, windows, gptq_recipe(), progress=False, memory=settings)
            secs = time.perf_counter() - t0
            layer = sum(reconstruction_error(base.get_submodule(n).weight.detach(), r.dequantize(), H[n])
                        for n, r in run.results.items())
            hid = _final_hidden(model, heldout)
            output = float((hid - ref).double().pow(2).sum() / ref.double().pow(2).sum())
            rec = {"seed": seed, "variant": name, "layer_error": layer, "own_path_error":
                   sum(m.error for m in run.modules), "output_error": output, "quantize_s": secs,
                   "loadavg": os.getloadavg()[0]}
            out["runs"].append(rec)
            print(json.dumps(rec), flush=True)
            del model
    out["loadavg_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


def cmd_plans(args) -> None:
    """Predicted peak host memory of the full Spectra recipe (512 x 2048, 4-bit g128) for every Spectra shape,
    per storage mode (CPU, batch 8 unless the budget forces a smaller one), and what ``offload=auto`` picks
    within ``--budget-gb``."""
    from quantlm.gptq.memory import MemorySettings, plan_memory
    from quantlm.specs import SPECTRA_PRESETS

    budget = int(args.budget_gb * 2**30)
    modes = [("fp32, host", dict(offload="host"), "float32"), ("bf16, host", dict(offload="host",
             activation_dtype="bfloat16"), "float32"), ("fp32, disk", dict(offload="disk"), "float32"),
             ("bf16, disk", dict(offload="disk", activation_dtype="bfloat16"), "float32"),
             ("bf16, disk, bf16 weights", dict(offload="disk", activation_dtype="bfloat16"), "bfloat16"),
             ("fp32, disk, weights released", dict(offload="disk", keep_weights=False), "float32")]
    print("| shape | " + " | ".join(m[0] for m in modes) + f" | auto within {args.budget_gb:g} GiB |")
    print("|---|" + "---|" * (len(modes) + 1))
    for name, spec in SPECTRA_PRESETS.items():
        if not name.startswith("floatlm-"):
            continue
        config = spec.to_hf_config().to_dict()
        cells = []
        for _label, kw, wd in modes:
            p = plan_memory(config, 512, 2048, MemorySettings(batch_size=8, **kw), 4, 128, "cpu",
                            available_bytes=budget, disk_available_bytes=10**13, weights_dtype=wd)  # trims as there
            cells.append(f"{p['predicted_peak_bytes'] / 1e9:.1f}")
        auto = plan_memory(config, 512, 2048, MemorySettings(), 4, 128, "cpu", available_bytes=budget,
                           disk_available_bytes=10**13)
        pick = (f"{auto['hidden_states']}, batch {auto['batch_size']}: {auto['predicted_peak_bytes'] / 1e9:.1f} GB"
                if auto["fits"] else "does not fit: " + ", ".join(
                    " ".join(f"{k}={v}" for k, v in fx["change"].items()) for fx in auto.get("fixes", [])))
        print(f"| {name} | " + " | ".join(cells) + f" | {pick} |")


def cmd_speed(args) -> None:
    """Wall time of the quantize call with each forward/storage setting, interleaved (A B A B ...) in one
    process on the same weights and windows, so load changes hit every setting alike; ratios to fp32."""
    import statistics

    import torch
    from transformers import LlamaForCausalLM

    from quantlm.architectures import LLAMA
    from quantlm.calibration import calibration_tokens
    from quantlm.gptq.memory import MemorySettings
    from quantlm.gptq.pipeline import quantize_blocks
    from quantlm.specs import get_preset

    variants = {"fp32": MemorySettings(), "bf16 storage": MemorySettings(activation_dtype="bfloat16"),
                "bf16 forward": MemorySettings(forward_dtype="bfloat16", activation_dtype="float32")}
    config = get_preset(args.preset).to_hf_config(**({"num_hidden_layers": args.layers} if args.layers else {}))
    torch.manual_seed(args.seed)
    base = LlamaForCausalLM(config).eval()
    tok = _tokenizer(Path(args.work), config.vocab_size)
    calib = calibration_tokens(tok, None, args.nsamples, args.seqlen, args.seed)
    times: dict[str, list[float]] = {k: [] for k in variants}
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for name, settings in variants.items():
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            quantize_blocks(model, LLAMA, calib, gptq_recipe(), progress=False, memory=settings)
            times[name].append(time.perf_counter() - t0)
            loads.append(os.getloadavg()[0])
            print(json.dumps({"variant": name, "seconds": times[name][-1], "loadavg": loads[-1]}), flush=True)
    ref = statistics.median(times["fp32"])
    out = {"env": _env(), "commit": _git_commit(), "args": vars(args), "loadavg": loads,
           "median_s": {k: statistics.median(v) for k, v in times.items()},
           "ratio_to_fp32": {k: statistics.median(v) / ref for k, v in times.items()}, "times": times}
    print(json.dumps(out["ratio_to_fp32"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    one = sub.add_parser("one")
    one.add_argument("--preset", default="floatlm-99m")
    one.add_argument("--layers", type=int, default=2)
    one.add_argument("--nsamples", type=int, default=512)
    one.add_argument("--seqlen", type=int, default=2048)
    one.add_argument("--activation-dtype", default="float32")
    one.add_argument("--offload", default="auto")
    one.add_argument("--offload-dir", default="")
    one.add_argument("--forward-dtype", default="float32")
    one.add_argument("--batch-size", type=int, default=0)
    one.add_argument("--replay-cache-gb", type=float, default=-1.0)
    one.add_argument("--weights-dtype", default="float32")
    one.add_argument("--keep-weights", type=int, default=1, help="0: release quantized weights")
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--json", default="")
    one.add_argument("--progress", action="store_true", help="progress bars and the pipeline's log on stderr")
    sw = sub.add_parser("sweep")
    sw.add_argument("--grid", choices=sorted(GRIDS), required=True)
    sw.add_argument("--out", required=True)
    sw.add_argument("--offload-dir", default="")
    for name in ("fit", "table"):
        p = sub.add_parser(name)
        p.add_argument("results", nargs="+")
        p.add_argument("--apply", action="store_true", help="fit: show the table with the fitted constants")
    er = sub.add_parser("errors")
    er.add_argument("--preset", default="floatlm-99m")
    er.add_argument("--layers", type=int, default=0, help="0: all blocks of the preset")
    er.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    er.add_argument("--nsamples", type=int, default=64)
    er.add_argument("--seqlen", type=int, default=512)
    er.add_argument("--heldout", type=int, default=16)
    er.add_argument("--variants", nargs="*", default=None)
    er.add_argument("--work", default="/tmp/quantlm-bench-memory")
    er.add_argument("--json", default="")
    pl = sub.add_parser("plans")
    pl.add_argument("--budget-gb", type=float, default=24.0)
    sp = sub.add_parser("speed")
    sp.add_argument("--preset", default="floatlm-99m")
    sp.add_argument("--layers", type=int, default=4)
    sp.add_argument("--nsamples", type=int, default=32)
    sp.add_argument("--seqlen", type=int, default=512)
    sp.add_argument("--repeats", type=int, default=2)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--work", default="/tmp/quantlm-bench-memory")
    sp.add_argument("--json", default="")
    args = ap.parse_args()
    {"plans": cmd_plans, "speed": cmd_speed, "one": cmd_one, "sweep": cmd_sweep, "fit": cmd_fit, "table": cmd_table, "errors": cmd_errors}[args.cmd](args)


if __name__ == "__main__":
    main()
