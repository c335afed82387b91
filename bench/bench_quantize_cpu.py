"""Quantize the Spectra 99M shape at 4 bits (group 128) with 32 x 512 calibration tokens on the CPU:
quantlm next to GPTQModel and llm-compressor on the same weights and the same token windows.

Each tool runs in its own child process (peers in their own virtualenvs, so their pins never meet
quantlm's), reporting wall time of the quantization call, total process time and peak RSS. Every output
is then read back (GPTQ v1 or compressed-tensors layout) and scored with the SAME per-layer Hessians,
collected from the float model on the calibration windows: error = tr((W - Q) H (W - Q)^T), and relative
error = error / tr(W H W^T). Round-to-nearest (quantlm --rtn) is the floor every GPTQ should beat.

The per-layer score uses the float model's Hessians, which favours a tool whose Hessians are closer to float:
llm-compressor calibrates every linear of a decoder layer from the layer's (quantized-path) input in one pass,
so its o_proj/gate/up/down Hessians see float q/k/v/attention outputs, while true-sequential GPTQ (quantlm's
and GPTQModel's default) gives each group the outputs of the groups already quantized. So
``quantlm-layerwise`` runs quantlm in llm-compressor's mode (``true_sequential: false``), and two more scores
judge every tool alike: the *output* error, the relative squared error of the final hidden states (after the
last norm) against the float model on held-out WikiText-2 windows that no tool calibrated on, and the
*own-path* error, each tool's layers scored with the Hessians of its own quantized model's activations.
``--rescore`` recomputes every score from the outputs already in --work, without re-running the tools.

Usage: python bench/bench_quantize_cpu.py [--work DIR] [--gptqmodel-python PY] [--llmcompressor-python PY]
Results: DIR/results.json and a markdown table on stdout (copied into bench/quantize_cpu.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from quantlm.architectures import LLAMA  # noqa: E402
from quantlm.calibration import calibration_tokens  # noqa: E402
from quantlm.formats.compressed_tensors import COMPRESSED_TENSORS  # noqa: E402
from quantlm.formats.loader import read_state  # noqa: E402
from quantlm.formats.packing import unpack_bits  # noqa: E402
from quantlm.formats.registry import Layout  # noqa: E402
from quantlm.gptq.hessian import HessianAccumulator  # noqa: E402
from quantlm.gptq.solver import reconstruction_error  # noqa: E402
from quantlm.specs import get_preset  # noqa: E402

BITS = 4


def build_model(work: Path, seed: int) -> Path:
    """The floatlm-99m shape, random init (seeded), fp32, with a BPE tokenizer trained on the shipped corpus."""
    from transformers import LlamaForCausalLM

    from quantlm.tokenizer import train_bpe_tokenizer

    model_dir = work / "floatlm-99m-random"
    if (model_dir / "config.json").is_file():
        return model_dir
    torch.manual_seed(seed)
    model = LlamaForCausalLM(get_preset("floatlm-99m").to_hf_config())
    model.save_pretrained(model_dir)
    from quantlm.paths import data_dir

    text = (data_dir() / "corpus" / "austen-persuasion.txt").read_text(encoding="utf-8")
    train_bpe_tokenizer([text], vocab_size=8192, out_dir=model_dir)
    return model_dir


@torch.no_grad()
def linear_hessians(model, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """H = 2/n X^T X of every block linear's input over the windows (linears sharing an input share one H)."""
    accs, handles = {}, []
    for i, block in enumerate(model.get_submodule(LLAMA.layers_path)):
        for group in LLAMA.sequential:
            lin = block.get_submodule(group[0])
            acc = HessianAccumulator(lin.in_features, "cpu")
            for name in group:
                accs[f"{LLAMA.layers_path}.{i}.{name}"] = acc
            handles.append(lin.register_forward_pre_hook(lambda _m, a, acc=acc: acc.add(a[0].float())))
    try:
        for b in range(0, tokens.shape[0], 4):
            model(input_ids=tokens[b : b + 4], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: acc.H for n, acc in accs.items()}


def float_hessians(model_dir: Path, tokens: torch.Tensor) -> tuple[dict, dict]:
    from quantlm.hf_checkpoint import load_causal_lm

    model = load_causal_lm(model_dir)
    H = linear_hessians(model, tokens)
    return H, {n: model.get_submodule(n).weight.detach().float().clone() for n in H}


def dequantized_weights(out_dir: Path, fmt: str, names) -> dict[str, torch.Tensor]:
    tensors = read_state(out_dir)
    out = {}
    for name in names:
        if fmt == "gptq":
            qweight, qzeros, scales = (tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales"))
            n_in = tensors[f"{name}.g_idx"].numel()
            n_out = scales.shape[1]
            g = tensors[f"{name}.g_idx"].long()  # general g_idx: whatever the tool wrote
            q = unpack_bits(qweight, BITS, n_in, dim=0).T.float()
            zeros = unpack_bits(qzeros, BITS, n_out, dim=1).T.float() + 1
            s = scales.T.float()
            out[name] = (q - zeros[:, g]) * s[:, g]
        else:
            o, i = (int(v) for v in tensors[f"{name}.weight_shape"].tolist())
            groups = tensors[f"{name}.weight_scale"].shape[1]
            layout = Layout("quantlm", "compressed-tensors", bits=BITS, group_size=-1 if groups == 1 else i // groups,
                            sym=f"{name}.weight_zero_point" not in tensors)
            lin = COMPRESSED_TENSORS.decode(tensors.__getitem__, name, o, i, layout, "column")
            if f"{name}.weight_g_idx" in tensors:  # a peer's act-order export: whatever g_idx it wrote
                lin = dataclasses.replace(lin, g_idx=tensors[f"{name}.weight_g_idx"])
            out[name] = lin.dequantize()
    return out


@torch.no_grad()
def end_to_end_scores(model_dir: Path, tokens: torch.Tensor, heldout: torch.Tensor, W: dict[str, torch.Tensor],
                      quantized: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict]:
    """Per tool, with its dequantized weights in the float model:
    ``output_error``: relative squared error of the final hidden states vs the float model on held-out windows;
    ``own_path_error``: sum of tr((W-Q) H_q (W-Q)^T) with H_q from the quantized model's own activations on the
    calibration windows - the objective a true-sequential GPTQ minimises, block by block."""
    from quantlm.hf_checkpoint import load_causal_lm

    model = load_causal_lm(model_dir)

    def hidden() -> torch.Tensor:
        return torch.cat([model.model(input_ids=heldout[b : b + 4], use_cache=False).last_hidden_state
                          for b in range(0, heldout.shape[0], 4)])

    ref = hidden()
    scores = {}
    for tool, Q in quantized.items():
        for n, q in Q.items():
            model.get_submodule(n).weight.copy_(q)
        out = float((hidden() - ref).double().pow(2).sum() / ref.double().pow(2).sum())
        Hq = linear_hessians(model, tokens)
        scores[tool] = {"output_error": out,
                        "own_path_error": sum(reconstruction_error(W[n], Q[n], Hq[n]) for n in Q)}
        for n in Q:
            model.get_submodule(n).weight.copy_(W[n])
    return scores


def heldout_windows(tokenizer, n: int, seqlen: int) -> torch.Tensor:
    """The first n windows of seqlen tokens of WikiText-2 test (no tool calibrates on it)."""
    from quantlm.eval.datasets import load_text_source

    ids = tokenizer(load_text_source("wikitext2").text, return_tensors="pt").input_ids[0]
    if ids.numel() < n * seqlen:
        raise SystemExit(f"WikiText-2 has only {ids.numel()} tokens, fewer than {n} x {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def run_child(python: str, script: str, args: list[str], cwd: Path, env_extra: dict | None = None,
              timeout: int = 1800):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    t0 = time.perf_counter()
    # cwd: the work dir, since GPTQModel writes a logs/ folder into its working directory
    p = subprocess.run([python, str(REPO / "bench" / script), *args], env=env, capture_output=True, text=True,
                       timeout=timeout, cwd=cwd)
    wall = time.perf_counter() - t0
    return p.returncode, wall, (p.stdout + p.stderr)[-3000:]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/quantlm-bench")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gptqmodel-python", default="/work/venvs/interop/bin/python")
    ap.add_argument("--llmcompressor-python", default="/work/venvs/llmc/bin/python")
    ap.add_argument("--tools", default="quantlm,quantlm-layerwise,quantlm-rtn,gptqmodel,llm-compressor")
    ap.add_argument("--heldout", type=int, default=16, help="held-out WikiText-2 windows for the output error")
    ap.add_argument("--rescore", action="store_true",
                    help="score the outputs already in --work (result-TOOL.json, results.json) without re-running tools")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(work, args.seed)
    from quantlm.hf_checkpoint import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    tokens = calibration_tokens(tokenizer, None, args.nsamples, args.seqlen, seed=args.seed)
    tokens_path = work / "tokens.pt"
    torch.save(tokens, tokens_path)
    H, W = float_hessians(model_dir, tokens)
    names = list(H)

    tools = {
        "quantlm": (sys.executable, "_run_quantlm.py", [], {}),
        "quantlm-layerwise": (sys.executable, "_run_quantlm.py", ["--layerwise"], {}),
        "quantlm-rtn": (sys.executable, "_run_quantlm.py", ["--rtn"], {}),
        # issue 13: bf16 storage of the block inputs/outputs, and bf16 forwards (Hessians and solves stay fp32)
        "quantlm-bf16-storage": (sys.executable, "_run_quantlm.py",
                                 ["--activation-dtype", "bfloat16", "--tool", "quantlm-bf16-storage"], {}),
        "quantlm-bf16-forward": (sys.executable, "_run_quantlm.py",
                                 ["--forward-dtype", "bfloat16", "--tool", "quantlm-bf16-forward"], {}),
        "gptqmodel": (args.gptqmodel_python, "_peer_gptqmodel.py", [], {"GPTQMODEL_CPU_WORKERS": "2"}),
        "llm-compressor": (args.llmcompressor_python, "_peer_llmcompressor.py", [], {}),
    }
    results, dequantized = {}, {}
    for tool in args.tools.split(","):
        python, script, extra, env = tools[tool]
        if not Path(python).exists():
            results[tool] = {"tool": tool, "error": f"{python} not found (peer not installed)"}
            continue
        out_dir, res_path = work / f"out-{tool}", work / f"result-{tool}.json"
        if args.rescore:
            rc, log = 0, ""
            wall = json.load(open(work / "results.json"))["results"][tool]["process_wall_s"]
        else:
            shutil.rmtree(out_dir, ignore_errors=True)
            res_path.unlink(missing_ok=True)
            rc, wall, log = run_child(python, script, [str(model_dir), str(tokens_path), str(out_dir),
                                                      str(res_path), *extra], work, env)
        if rc != 0 or not res_path.is_file():
            results[tool] = {"tool": tool, "error": f"exit {rc}", "log_tail": log}
            print(f"{tool}: FAILED (exit {rc})\n{log}", file=sys.stderr)
            continue
        r = json.load(open(res_path))
        r["process_wall_s"] = wall
        Q = dequantized_weights(Path(r["out_dir"]), r["format"], names)
        per_layer = {}
        for n in names:
            err = reconstruction_error(W[n], Q[n], H[n])
            ref = float(((W[n] @ H[n]) * W[n]).double().sum())
            per_layer[n] = {"error": err, "relative": err / ref}
        dequantized[tool] = Q
        r["per_layer"] = per_layer
        r["total_error"] = sum(v["error"] for v in per_layer.values())
        r["mean_relative_error"] = sum(v["relative"] for v in per_layer.values()) / len(per_layer)
        results[tool] = r
        print(f"{tool}: quantize {r['quantize_s']:.1f}s, process {wall:.1f}s, peak RSS {r['peak_rss_mb']:.0f} MB, "
              f"total error {r['total_error']:.4g}, mean relative {r['mean_relative_error']:.4g}", file=sys.stderr)

    heldout = heldout_windows(tokenizer, args.heldout, args.seqlen)
    for tool, score in end_to_end_scores(model_dir, tokens, heldout, W, dequantized).items():
        results[tool].update(score)
        print(f"{tool}: output relative error {score['output_error']:.4g}, own-path error "
              f"{score['own_path_error']:.4g}", file=sys.stderr)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor(),
            "loadavg_after": os.getloadavg(), "nsamples": args.nsamples, "seqlen": args.seqlen,
            "heldout": f"{args.heldout} x {args.seqlen} tokens of WikiText-2 test",
            "model": f"floatlm-99m shape, random init seed {args.seed}, fp32"}
    if args.rescore:  # the timings and their conditions are the original run's
        meta = {**json.load(open(work / "results.json"))["meta"], "rescored": meta["date"]}
    json.dump({"meta": meta, "results": results}, open(work / "results.json", "w"), indent=1)
    print(markdown(meta, results, names))


def markdown(meta, results, names) -> str:
    lines = [f"Run {meta['date']}, torch {meta['torch']}, {meta['threads']} threads, "
             f"{meta['nsamples']} x {meta['seqlen']} tokens, load average after {meta['loadavg_after']}", "",
             "| tool | version | quantize call (s) | process (s) | peak RSS (MB) | total error | mean rel. error "
             "| output rel. error | own-path error |", "|---|---|---|---|---|---|---|---|---|"]
    for tool, r in results.items():
        if "error" in r and "quantize_s" not in r:
            lines.append(f"| {tool} | - | failed: {r['error']} | | | | | | |")
            continue
        lines.append(f"| {tool} | {r['version']} | {r['quantize_s']:.1f} | {r['process_wall_s']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['total_error']:.4g} | {r['mean_relative_error']:.4g} | "
                     f"{r.get('output_error', float('nan')):.4g} | {r.get('own_path_error', float('nan')):.4g} |")
    ok = [t for t, r in results.items() if "per_layer" in r]
    lines += ["", "Relative error per linear (mean over the 16 blocks):", "",
              "| linear | " + " | ".join(ok) + " |", "|---|" + "---|" * len(ok)]
    for lin in LLAMA.linears:
        row = [sum(results[t]["per_layer"][n]["relative"] for n in names if n.endswith(lin)) / 16 for t in ok]
        lines.append(f"| {lin} | " + " | ".join(f"{v:.4g}" for v in row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
