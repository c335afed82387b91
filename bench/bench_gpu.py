"""GPU check (bench/gpu_check.sh runs this): quantlm's GPTQ pipeline on the Spectra 99M and 3.9B shapes next to
a reference GPTQ written from the paper (bench/gptq_reference.py), plus the trainer's tokens/s and MFU.

Setup (issue 13): random init (seeded) of ``get_preset(...).to_hf_config()`` as ``transformers.LlamaForCausalLM``,
512 x 2048 random token windows, 4-bit, group 128, symmetric, act-order with static groups, damp 0.01,
true-sequential. Every job gets the same weights and the same windows. Per job: wall time of the quantization
call, peak GPU memory (``torch.cuda.max_memory_allocated``, reset per job), peak host RSS during the job,
and layer error = sum over the linears of tr((W - Q) H (W - Q)^T) with H the FLOAT model's Hessian of the
linear's input on the calibration windows (the same H for every job; computed once with TF32 products),
and each tool's own-path error (its layers scored on the inputs it saw).

Jobs:
  99M  : quantlm exact (fp32 forwards and Hessians), quantlm fast (bf16 forwards, TF32 Hessians), reference
         (the paper's code path: fp16 model, one sequence per forward, one Hessian per linear); all 16 blocks.
  3.9B : the first --blocks-39b blocks (default 2) for all three, so the reference fits the time budget (the
         original takes ~18.7 s per block on an H100: the full model is ~560 s; scale by 30 / blocks), then
         quantlm fast on all 30 blocks (wall time and memory of the whole model).
  train: bench/bench_train.py on the 99M preset, seq 2048, bf16 autocast: tokens/s and MFU.

``--dry-run``: the same code on the CPU with tiny shapes in seconds (floatlm-micro for both shapes, 4 x 32
tokens, 2 trainer steps): keeps this script from rotting where no GPU is (tests run it).
Writes --json (rewritten after every job, so a timeout keeps what finished) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import gptq_reference  # noqa: E402

from quantlm.architectures import LLAMA  # noqa: E402
from quantlm.gptq.hessian import HessianAccumulator, tf32_matmul  # noqa: E402
from quantlm.gptq.memory import MemorySettings, PeakSampler  # noqa: E402
from quantlm.gptq.pipeline import quantize_blocks  # noqa: E402
from quantlm.specs import get_preset  # noqa: E402

RECIPE = dict(bits=4, group_size=128, sym=True, act_order=True, static_groups=True, damp=0.01, true_sequential=True)


def gptq_recipe(tf32: bool = False):
    """The GPTQ settings of every quantlm job here (TF32 Hessian products for the fast one)."""
    from quantlm.gptq.settings import GPTQSettings

    names = {f.name for f in dataclasses.fields(GPTQSettings)}
    return GPTQSettings(**{k: v for k, v in RECIPE.items() if k in names}, hessian_tf32=tf32)


def build(preset: str, layers: int | None, seed: int, device: torch.device):
    """Random-init model of ``preset`` (``layers`` blocks), initialised on ``device`` (fast), returned on the CPU."""
    from transformers import LlamaForCausalLM

    over = {"num_hidden_layers": layers} if layers else {}
    config = get_preset(preset).to_hf_config(**over)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to("cpu").eval()


def first_blocks(model, k: int):
    """A copy of ``model`` cut to its first ``k`` blocks (same weights)."""
    layers = model.model.layers
    if k >= len(layers):
        return copy.deepcopy(model)
    model.model.layers = torch.nn.ModuleList(list(layers)[:k])
    try:
        sub = copy.deepcopy(model)
    finally:
        model.model.layers = layers
    sub.config.num_hidden_layers = k
    return sub


@torch.no_grad()
def float_hessians(model, tokens, device, batch: int) -> dict[str, torch.Tensor]:
    """H of every block linear's input in the float model (groups sharing an input share one H), on the CPU."""
    accs, handles = {}, []
    model.to(device)
    for i, block in enumerate(model.model.layers):
        for group in LLAMA.sequential:
            lin = block.get_submodule(group[0])
            acc = HessianAccumulator(lin.in_features, device, allow_tf32=True)
            for name in group:
                accs[f"{LLAMA.layers_path}.{i}.{name}"] = acc
            handles.append(lin.register_forward_pre_hook(lambda _m, a, acc=acc: acc.add(a[0])))
    try:
        with tf32_matmul(device.type == "cuda"):
            for s in range(0, tokens.shape[0], batch):
                model.model(input_ids=tokens[s:s + batch].to(device))
    finally:
        for h in handles:
            h.remove()
        model.to("cpu")
    out = {}
    for k, acc in accs.items():
        if id(acc) not in out:
            out[id(acc)] = acc.H.cpu()
        out[k] = out[id(acc)]
    return {k: v for k, v in out.items() if isinstance(k, str)}


def layer_error(base, dequantized: dict[str, torch.Tensor], H: dict[str, torch.Tensor]) -> float:
    total = 0.0
    for name, Q in dequantized.items():
        W = base.get_submodule(name).weight.detach().float()
        D = W - Q.float()
        total += float(((D @ H[name]) * D).double().sum())
    return total


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def job_quantlm(base, tokens, device, H, settings: MemorySettings, label: str, in_place: bool = False) -> dict:
    model = base if in_place else copy.deepcopy(base)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _sync(device)
    t0 = time.perf_counter()
    tf32 = "tf32" in label
    run = quantize_blocks(model, LLAMA, tokens, gptq_recipe(tf32), device=device, progress=False, memory=settings)
    _sync(device)
    wall = time.perf_counter() - t0
    deq = {n: r.dequantize() for n, r in run.results.items()} if H is not None else {}
    out = {"job": label, "blocks": len(base.model.layers), "seconds": wall,
           "host_peak_bytes": run.measured.get("pipeline_peak_bytes"),
           "device_peak_bytes": run.measured.get("device_peak_bytes"),
           "predicted_host_peak_bytes": run.plan and run.plan["predicted_peak_bytes"],
           "predicted_device_peak_bytes": run.plan and run.plan.get("predicted_device_peak_bytes"),
           "hidden_states": run.measured.get("hidden_states"), "batch_size": run.measured.get("batch_size"),
           "layer_error": layer_error(base, deq, H) if H is not None else None,
           "own_path_error": sum(m.error for m in run.modules), "solve_s": sum(m.seconds for m in run.modules),
           "settings": {**dataclasses.asdict(settings), "hessian_tf32": tf32}}
    del model, run, deq
    return out


def job_reference(base, tokens, device, H, dtype) -> dict:
    model = copy.deepcopy(base)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    with PeakSampler() as sampler:
        t0 = time.perf_counter()
        rep = gptq_reference.quantize_model(model, tokens, device, dtype=dtype, **{
            k: RECIPE[k] for k in ("bits", "group_size", "sym", "act_order", "static_groups")},
            percdamp=RECIPE["damp"])
        _sync(device)
        wall = time.perf_counter() - t0
    out = {"job": f"reference ({str(dtype).replace('torch.', '')})", "blocks": len(base.model.layers),
           "seconds": wall, "host_peak_bytes": sampler.peak_bytes,
           "device_peak_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
           "layer_error": layer_error(base, rep["quantized"], H) if H is not None else None,
           "own_path_error": sum(m["error"] for m in rep["modules"].values())}
    del model, rep
    return out


def job_train(args, device) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        js = Path(tmp) / "train.json"
        cmd = [sys.executable, str(REPO / "bench" / "bench_train.py"), "--recipe", "recipes/floatlm-tiny.yaml",
               "--steps", str(args.train_steps), "--skip", str(min(5, args.train_steps - 1)), "--json", str(js)]
        sets = ({"model": "floatlm-micro", "seq_len": "32", "batch_tokens": "128", "micro_batch": "4", "threads": "1",
                 "eval_tokens": "256"}
                if args.dry_run else
                {"model": "floatlm-99m", "seq_len": "2048", "batch_tokens": str(2048 * args.train_micro_batch),
                 "micro_batch": str(args.train_micro_batch), "threads": "0", "precision": "auto"})
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        if proc.returncode != 0:
            return {"job": "train", "error": proc.stderr[-2000:]}
        rows = json.loads(js.read_text())["rows"]
    r = rows[0]
    return {"job": "train", "model": r["model"], "seq_len": r["seq_len"], "batch_tokens": r["batch_tokens"],
            "tokens_per_s": r["tokens_per_s"], "mfu": r.get("mfu"), "seconds": time.perf_counter() - t0}


def environment(device) -> dict:
    import transformers

    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "device": str(device),
           "cpu_threads": torch.get_num_threads(), "loadavg": os.getloadavg()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
        try:
            env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                                "--format=csv,noheader"], capture_output=True, text=True,
                                               timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True).stdout.strip()
    except OSError:
        pass
    return env


def markdown(rows: list[dict]) -> str:
    lines = ["| shape | job | blocks | wall (s) | peak GPU (GB) | peak host (GB) | layer error | own-path error |",
             "|---|---|---|---|---|---|---|---|"]

    def gb(x):
        return f"{x / 1e9:.2f}" if x else "-"

    for r in rows:
        if r["job"] == "train":
            continue
        le = f"{r['layer_error']:.5g}" if r.get("layer_error") is not None else "-"
        lines.append(f"| {r['shape']} | {r['job']} | {r['blocks']} | {r['seconds']:.1f} | {gb(r.get('device_peak_bytes'))} "
                     f"| {gb(r.get('host_peak_bytes'))} | {le} | {r['own_path_error']:.5g} |")
    for r in rows:
        if r["job"] == "train":
            if "error" in r:
                lines.append(f"\ntrainer: FAILED: {r['error'][-300:]}")
            else:
                lines.append(f"\ntrainer ({r['model']}, seq {r['seq_len']}, {r['batch_tokens']} tokens/step): "
                             f"{r['tokens_per_s']:.0f} tokens/s, MFU {r['mfu']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, seconds")
    ap.add_argument("--nsamples", type=int, default=512)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--blocks-39b", type=int, default=2, help="blocks of the 3.9B shape for the side-by-side jobs")
    ap.add_argument("--skip", nargs="*", default=[], help="parts to skip: 99m 39b 39b-full reference train")
    ap.add_argument("--train-steps", type=int, default=15)
    ap.add_argument("--train-micro-batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.dry_run:
        device = torch.device("cpu")
        shapes = {"99m": ("floatlm-micro", None), "39b": ("floatlm-micro", None)}
        args.nsamples, args.seqlen, args.train_steps = 4, 32, 2
        args.blocks_39b = 1
        ref_dtype = torch.float32
        fast = MemorySettings(forward_dtype="bfloat16")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU visible: run with --dry-run on the CPU")
        device = torch.device("cuda")
        shapes = {"99m": ("floatlm-99m", None), "39b": ("floatlm-3.9b", None)}
        ref_dtype = torch.float16
        fast = MemorySettings(forward_dtype="bfloat16")  # + TF32 Hessians: the GPTQ settings of the "tf32" jobs
    exact = MemorySettings()
    out = {"env": environment(device), "args": vars(args), "rows": []}
    rows = out["rows"]

    def record(shape, r):
        r["shape"] = shape
        rows.append(r)
        print(json.dumps(r), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(out, indent=1) + "\n")

    def gptq_jobs(preset, model, tokens):
        """quantlm exact and fast, and the reference GPTQ, on the same weights, tokens and scoring Hessians."""
        H = float_hessians(model, tokens, device, batch=8)
        record(preset, job_quantlm(model, tokens, device, H, exact, "quantlm exact (fp32)"))
        record(preset, job_quantlm(model, tokens, device, H, fast, "quantlm fast (bf16 fwd, tf32 H)"))
        if "reference" not in args.skip:
            record(preset, job_reference(model, tokens, device, H, ref_dtype))

    def random_tokens(model):
        return torch.randint(0, model.config.vocab_size, (args.nsamples, args.seqlen),
                             generator=torch.Generator().manual_seed(args.seed))

    t_all = time.perf_counter()
    if "99m" not in args.skip:
        preset, _ = shapes["99m"]
        base = build(preset, None, args.seed, device)
        gptq_jobs(preset, base, random_tokens(base))
        del base
    if "39b" not in args.skip:
        preset, _ = shapes["39b"]
        full = build(preset, None, args.seed, device)
        tokens = random_tokens(full)
        gptq_jobs(preset, first_blocks(full, args.blocks_39b), tokens)
        if "39b-full" not in args.skip:
            r = job_quantlm(full, tokens, device, None, fast, "quantlm fast (bf16 fwd, tf32 H), whole model",
                            in_place=True)
            record(preset, r)
        del full
    if "train" not in args.skip:
        record(shapes["99m"][0], job_train(args, device))
    out["seconds"] = time.perf_counter() - t_all
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(markdown(rows))
    print(f"\ntotal {out['seconds']:.0f} s on {out['env'].get('gpu', 'cpu')}")


if __name__ == "__main__":
    main()
