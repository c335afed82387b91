"""GPU check stages (bench/gpu_check.sh runs each as its own command with its own timeout).

    python bench/bench_gpu.py env   --json F   # (1) versions, device, memory, which packages import
    python bench/bench_gpu.py tests --json F   # (2) the gpu-marked pytest tests (counts, failures)
    python bench/bench_gpu.py gptq  --json F   # (3) 3.9B shape, first --blocks blocks, Spectra recipe: exact, fast
    python bench/bench_gpu.py train --json F   # (4) the trainer's tokens/s and MFU, 99M preset, bf16 autocast
    python bench/bench_gpu.py peers --json F   # (5) the reference GPTQ and llm-compressor on the same blocks/tokens
    python bench/bench_gpu.py report DIR TAG   # the markdown tables of whatever stage files DIR holds

Every stage takes ``--dry-run`` (the same code on the CPU with tiny shapes, seconds: tests run the whole shell
script that way) and writes its --json file as it goes (rewritten after every job), so a stage killed by its
timeout keeps what finished.

The GPTQ setup (issue 13): random init (seeded) of ``get_preset(...).to_hf_config(num_hidden_layers=blocks)`` as
``transformers.LlamaForCausalLM`` (the 3.9B shape's first blocks), 512 x 2048 random token windows, 4-bit, group
128, symmetric, act-order with static groups, damp 0.01, true-sequential. Every job of stages 3 and 5 gets the same
weights and the same windows (the model is rebuilt from the seed). Per job: wall time, time per block, peak host
RSS, predicted vs measured device peak, both what tensors use (``max_memory_allocated``) and what the caching
allocator holds (``max_memory_reserved``), and layer error = sum over the linears of tr((W - Q) H (W - Q)^T) with H
the FLOAT model's Hessian of the linear's input on the calibration windows (the same H for every job; computed
with TF32 products), and each tool's own-path error (its layers scored on the inputs it saw).

quantlm exact: fp32 forwards and Hessians. quantlm fast: bf16 forwards (hidden states stored in bf16, the default
for bf16 forwards) and TF32 Hessian products. Reference (bench/gptq_reference.py, written from the paper, run as the
original code runs: fp16 model, one sequence per forward, one Hessian per linear). llm-compressor's GPTQModifier
(W4A16, act-order static, damp 0.01) in a child process, when it imports (bench/gpu_wheels.sh fetches wheels that
gpu_check.sh installs beside the image's torch); otherwise the row says it was skipped and why.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
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

RECIPE = dict(bits=4, group_size=128, sym=True, act_order=True, static_groups=True, damp=0.01, true_sequential=True)
STAGES = [("1", "env"), ("2", "tests"), ("3", "gptq"), ("4", "train"), ("5", "peers")]
# what quantlm and the peers import beyond torch (the device image lacks some: gpu_wheels.sh)
PACKAGES = ["transformers", "safetensors", "tokenizers", "yaml", "tqdm", "numpy", "scipy", "pandas", "matplotlib",
            "datasets", "gguf", "pytest", "accelerate", "llmcompressor", "compressed_tensors", "pydantic", "loguru"]


# ------------------------------------------------------------------------------------------------ shared

class Stage:
    """One stage's JSON file: {"stage", "env", "args", "rows", "seconds"}, rewritten after every row."""

    def __init__(self, name: str, args):
        self.path = Path(args.json) if args.json else None
        self.t0 = time.perf_counter()
        self.out = {"stage": name, "dry_run": bool(getattr(args, "dry_run", False)), "args": vars(args), "rows": []}

    def add(self, row: dict) -> None:
        self.out["rows"].append(row)
        print(json.dumps(row, default=str), flush=True)
        self.write()

    def write(self, **extra) -> None:
        self.out.update(extra)
        self.out["seconds"] = time.perf_counter() - self.t0
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.out, indent=1, default=str) + "\n")
            tmp.replace(self.path)


def compute_device(dry_run: bool) -> torch.device:
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: run with --dry-run on the CPU")
    return torch.device("cuda")


def gptq_recipe(tf32: bool = False):
    """The GPTQ settings of every quantlm job here (TF32 Hessian products for the fast one)."""
    from quantlm.gptq.settings import GPTQSettings

    names = {f.name for f in dataclasses.fields(GPTQSettings)}
    return GPTQSettings(**{k: v for k, v in RECIPE.items() if k in names}, hessian_tf32=tf32)


def shape_args(args) -> tuple[str, int, int, int]:
    """(preset, blocks, nsamples, seqlen): the 3.9B shape's first blocks at the Spectra recipe, or tiny (dry run)."""
    if args.dry_run:
        return "floatlm-micro", 1, 4, 32
    return args.preset, args.blocks, args.nsamples, args.seqlen


def build(preset: str, layers: int, seed: int, device: torch.device):
    """Random-init model of ``preset`` cut to ``layers`` blocks, initialised on ``device`` (fast), returned on the
    CPU; the same seed gives the same weights in every stage."""
    from transformers import LlamaForCausalLM

    from quantlm.specs import get_preset

    config = get_preset(preset).to_hf_config(num_hidden_layers=layers)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to("cpu").eval()


def random_tokens(model, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def float_hessians(model, tokens, device, batch: int) -> dict[str, torch.Tensor]:
    """H of every block linear's input in the float model (groups sharing an input share one H), on the CPU."""
    from quantlm.architectures import LLAMA
    from quantlm.gptq.hessian import HessianAccumulator, tf32_matmul

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
    out: dict = {}
    for k, acc in accs.items():
        if id(acc) not in out:
            out[id(acc)] = acc.H.cpu()
        out[k] = out[id(acc)]
    return {k: v for k, v in out.items() if isinstance(k, str)}


@torch.no_grad()
def layer_error(base, dequantized: dict[str, torch.Tensor], H: dict[str, torch.Tensor], device=None) -> float:
    """sum over the linears of tr((W - Q) H (W - Q)^T), the products in full fp32 on ``device`` (the GPU's seconds,
    not the CPU's minutes, at the 3.9B shape)."""
    from quantlm.gptq.hessian import tf32_matmul

    device = device or torch.device("cpu")
    total = 0.0
    with tf32_matmul(False):
        for name, Q in dequantized.items():
            W = base.get_submodule(name).weight.detach().to(device, torch.float32)
            D = W - Q.to(device, torch.float32)
            total += float(((D @ H[name].to(device)) * D).double().sum())
    return total


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fresh(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


# ------------------------------------------------------------------------------------------------ stage 1

def stage_env(args) -> None:
    stage = Stage("env", args)
    device = torch.device("cpu") if args.dry_run or not torch.cuda.is_available() else torch.device("cuda")
    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "python": platform.python_version(),
           "executable": sys.executable, "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
           "device": str(device), "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "loadavg": os.getloadavg()}
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        env.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda, gpu_memory_bytes=props.total_memory,
                   gpu_free_bytes=int(free), gpu_total_bytes=int(total),
                   multiprocessors=props.multi_processor_count, bf16=torch.cuda.is_bf16_supported())
        try:
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            env["nvidia_smi"] = f"not run: {e}"
    try:
        with open("/proc/meminfo") as fh:
            info = dict(line.split(":", 1) for line in fh)
        env["host_memory_total"] = info["MemTotal"].strip()
        env["host_memory_available"] = info["MemAvailable"].strip()
    except (OSError, KeyError, ValueError):
        pass
    packages = {}
    for name in PACKAGES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError) as e:
            spec, packages[name] = None, f"error: {e}"
        if spec is None:
            packages.setdefault(name, None)
            continue
        try:
            mod = __import__(name)
            packages[name] = str(getattr(mod, "__version__", "?"))
        except Exception as e:  # noqa: BLE001 - a broken install is a finding, not a crash of the probe
            packages[name] = f"import fails: {type(e).__name__}: {str(e)[:200]}"
    env["packages"] = packages
    stage.write(env=env)
    print(json.dumps(env, default=str))


# ------------------------------------------------------------------------------------------------ stage 2

def gpu_test_files() -> list[str]:
    """The test files holding gpu-marked tests."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if "mark.gpu" in p.read_text(encoding="utf-8"))


def stage_tests(args) -> None:
    import xml.etree.ElementTree as ET

    stage = Stage("tests", args)
    files = gpu_test_files()
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", f"--junitxml={xml}",
               *files]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-4000:]
        except subprocess.TimeoutExpired as e:
            rc, tail = "timeout", str(e.stdout or "")[-4000:]
        tests = []
        if xml.is_file():
            for case in ET.parse(xml).getroot().iter("testcase"):
                outcome = "passed"
                for child in case:
                    if child.tag in ("failure", "error"):
                        outcome = child.tag
                    elif child.tag == "skipped":
                        outcome = "skipped"
                tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                              "seconds": float(case.get("time") or 0)})
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failure", "error", "skipped")}
    stage.out["rows"] = tests
    stage.write(files=files, returncode=rc, counts=counts, seconds_pytest=time.perf_counter() - t0, output_tail=tail)
    print(json.dumps({"returncode": rc, **counts}))
    if rc not in (0, 5):  # 5: nothing collected
        raise SystemExit(f"gpu tests failed (pytest exit {rc}): {counts}")


# ------------------------------------------------------------------------------------------------ stage 3

def job_quantlm(base, tokens, device, H, settings, label: str, tf32: bool) -> dict:
    from quantlm.architectures import LLAMA
    from quantlm.gptq.pipeline import quantize_blocks

    model = copy.deepcopy(base)
    _fresh(device)
    t0 = time.perf_counter()
    run = quantize_blocks(model, LLAMA, tokens, gptq_recipe(tf32), device=device, progress=False, memory=settings)
    _sync(device)
    wall = time.perf_counter() - t0
    deq = {n: r.dequantize() for n, r in run.results.items()}
    plan, m = run.plan or {}, run.measured
    row = {"job": label, "blocks": len(base.model.layers), "seconds": wall, "block_seconds": m.get("block_seconds"),
           "solve_s": sum(x.seconds for x in run.modules),
           "hidden_states": m.get("hidden_states"), "activation_dtype": m.get("activation_dtype"),
           "batch_size": m.get("batch_size"), "replay_cache_bytes": plan.get("replay_cache_bytes"),
           "predicted_host_peak_bytes": plan.get("predicted_peak_bytes"), "host_peak_bytes": m.get("pipeline_peak_bytes"),
           "predicted_device_allocated_bytes": plan.get("predicted_device_allocated_bytes"),
           "device_peak_bytes": m.get("device_peak_bytes"),
           "predicted_device_reserved_bytes": plan.get("predicted_device_peak_bytes"),
           "device_reserved_peak_bytes": m.get("device_reserved_peak_bytes"),
           "device_plan": plan.get("device_bytes"), "working_sets": plan.get("working_sets"),
           "layer_error": layer_error(base, deq, H, device), "own_path_error": sum(x.error for x in run.modules),
           "settings": {**dataclasses.asdict(settings), "hessian_tf32": tf32}}
    row["allocated_predicted_over_measured"] = _ratio(row["predicted_device_allocated_bytes"], row["device_peak_bytes"])
    row["reserved_predicted_over_measured"] = _ratio(row["predicted_device_reserved_bytes"],
                                                     row["device_reserved_peak_bytes"])
    row["host_predicted_over_measured"] = _ratio(row["predicted_host_peak_bytes"], row["host_peak_bytes"])
    del model, run, deq
    return row


def _blocks_and_hessians(stage, args, device):
    """The stage's shape (first blocks of the preset, random windows) and its float Hessians, written as its setup;
    stages 3 and 5 build the same ones from the same seed."""
    preset, blocks, nsamples, seqlen = shape_args(args)
    t0 = time.perf_counter()
    base = build(preset, blocks, args.seed, device)
    tokens = random_tokens(base, nsamples, seqlen, args.seed)
    H = float_hessians(base, tokens, device, batch=8)
    stage.write(setup={"preset": preset, "blocks": blocks, "nsamples": nsamples, "seqlen": seqlen,
                       "build_and_float_hessians_s": time.perf_counter() - t0})
    return preset, base, tokens, H


def stage_gptq(args) -> None:
    from quantlm.gptq.memory import MemorySettings

    stage = Stage("gptq", args)
    device = compute_device(args.dry_run)
    preset, base, tokens, H = _blocks_and_hessians(stage, args, device)
    jobs = {"exact": (MemorySettings(), False, "quantlm exact (fp32)"),
            "fast": (MemorySettings(forward_dtype="bfloat16"), True, "quantlm fast (bf16 fwd, tf32 H)")}
    for key in args.jobs:
        settings, tf32, label = jobs[key]
        stage.add({"shape": preset, **job_quantlm(base, tokens, device, H, settings, label, tf32)})


# ------------------------------------------------------------------------------------------------ stage 4

def stage_train(args) -> None:
    stage = Stage("train", args)
    device = compute_device(args.dry_run)
    steps = 2 if args.dry_run else args.steps
    with tempfile.TemporaryDirectory() as tmp:
        js = Path(tmp) / "train.json"
        cmd = [sys.executable, str(REPO / "bench" / "bench_train.py"), "--recipe",
               str(REPO / "quantlm" / "resources" / "recipes" / "floatlm-tiny.yaml"),
               "--steps", str(steps), "--skip", str(min(5, steps - 1)), "--json", str(js)]
        sets = ({"model": "floatlm-micro", "seq_len": "32", "batch_tokens": "128", "micro_batch": "4", "threads": "1",
                 "eval_tokens": "256"}
                if args.dry_run else
                {"model": "floatlm-99m", "seq_len": "2048", "batch_tokens": str(2048 * args.micro_batch),
                 "micro_batch": str(args.micro_batch), "threads": "0", "precision": "auto"})
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        t0 = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            stage.add({"job": "train", "error": proc.stderr[-3000:]})
            raise SystemExit("the trainer failed")
        rows = json.loads(js.read_text())["rows"]
    r = rows[0]
    stage.add({"job": "train", "device": str(device), "model": r["model"], "seq_len": r["seq_len"],
               "batch_tokens": r["batch_tokens"], "steps_timed": r["steps_timed"], "tokens_per_s": r["tokens_per_s"],
               "mfu": r.get("mfu"), "loss_first": r["loss_first"], "loss_last": r["loss_last"],
               "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
               "seconds": time.perf_counter() - t0})


# ------------------------------------------------------------------------------------------------ stage 5

def job_reference(base, tokens, device, H, dtype) -> dict:
    import gptq_reference

    from quantlm.gptq.memory import PeakSampler

    model = copy.deepcopy(base)
    _fresh(device)
    with PeakSampler() as sampler:
        t0 = time.perf_counter()
        rep = gptq_reference.quantize_model(model, tokens, device, dtype=dtype, **{
            k: RECIPE[k] for k in ("bits", "group_size", "sym", "act_order", "static_groups")},
            percdamp=RECIPE["damp"])
        _sync(device)
        wall = time.perf_counter() - t0
    row = {"job": f"reference GPTQ ({str(dtype).replace('torch.', '')})", "blocks": len(base.model.layers),
           "seconds": wall, "host_peak_bytes": sampler.peak_bytes,
           "layer_error": layer_error(base, rep["quantized"], H, device),
           "own_path_error": sum(m["error"] for m in rep["modules"].values())}
    if device.type == "cuda":
        row["device_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
        row["device_reserved_peak_bytes"] = int(torch.cuda.max_memory_reserved(device))
    del model, rep
    return row


def placeholder_tokenizer(vocab: int):
    """A tokenizer of ``vocab`` ids (the windows are token ids already; llm-compressor only needs one to exist)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0")


def job_llmcompressor(base, tokens, device, H, timeout: float) -> dict:
    """llm-compressor's GPTQModifier in a child process on the same weights and windows; its fake-quantized weights
    come back and are scored with the same H."""
    label = "llm-compressor GPTQ"
    missing = [m for m in ("llmcompressor", "compressed_tensors", "datasets") if importlib.util.find_spec(m) is None]
    if missing:
        return {"job": label, "skipped": f"not importable here: {', '.join(missing)} (carry the wheels of "
                                         "bench/gpu_wheels.sh as .whl; gpu_check.sh installs them beside torch)"}
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, tok_path = Path(tmp) / "model", Path(tmp) / "tokens.pt"
        result, weights = Path(tmp) / "result.json", Path(tmp) / "weights.safetensors"
        base.save_pretrained(model_dir)
        placeholder_tokenizer(base.config.vocab_size).save_pretrained(model_dir)  # oneshot asks for a processor
        torch.save(tokens, tok_path)
        cmd = [sys.executable, str(REPO / "bench" / "_peer_llmcompressor.py"), str(model_dir), str(tok_path),
               str(Path(tmp) / "out"), str(result), "--dump-weights", str(weights)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "bench"), os.environ.get("PYTHONPATH", "")])}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=max(10.0, timeout))
        except subprocess.TimeoutExpired:
            return {"job": label, "error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0:
            return {"job": label, "error": proc.stderr[-3000:]}
        info = json.loads(result.read_text())
        deq = load_file(weights)
    return {"job": f"{label} {info.get('version')}", "blocks": len(base.model.layers), "seconds": info["quantize_s"],
            "device_peak_bytes": info.get("device_peak_bytes"),
            "device_reserved_peak_bytes": info.get("device_reserved_peak_bytes"),
            "host_peak_bytes": int(info["peak_rss_mb"] * 2**20) if info.get("peak_rss_mb") else None,
            "layer_error": layer_error(base, deq, H, device), "own_path_error": None, "device": info.get("device")}


def stage_peers(args) -> None:
    stage = Stage("peers", args)
    device = compute_device(args.dry_run)
    t_stage = time.perf_counter()
    preset, base, tokens, H = _blocks_and_hessians(stage, args, device)
    for peer in args.peers:
        if peer == "reference":
            row = job_reference(base, tokens, device, H, torch.float32 if args.dry_run else torch.float16)
        elif peer == "llm-compressor":
            row = job_llmcompressor(base, tokens, device, H, args.budget - (time.perf_counter() - t_stage) - 10)
        else:
            row = {"job": peer, "skipped": "unknown peer"}
        stage.add({"shape": preset, **row})


# ------------------------------------------------------------------------------------------------ report

def _gb(x) -> str:
    return f"{x / 1e9:.2f}" if x else "-"


def _num(x, fmt=".5g") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else "-"


def report(folder: Path, tag: str) -> str:
    """Markdown of the stage files ``{tag}.N-name.json`` in ``folder`` (missing stages are named)."""
    lines = []
    data = {}
    for num, name in STAGES:
        p = folder / f"{tag}.{num}-{name}.json"
        try:
            data[name] = json.loads(p.read_text())
        except (OSError, ValueError):
            lines.append(f"- stage {num} ({name}): no result file")
    env = data.get("env", {}).get("env", {})
    if env:
        pk = env.get("packages", {})
        lines.append(f"- {env.get('date')} commit {env.get('commit')}: {env.get('gpu', 'cpu')} "
                     f"({_gb(env.get('gpu_memory_bytes'))} GB), python {env.get('python')}, torch {env.get('torch')} "
                     f"(CUDA {env.get('cuda')}), transformers {pk.get('transformers')}, llmcompressor "
                     f"{pk.get('llmcompressor')}")
    t = data.get("tests")
    if t:
        c = t.get("counts", {})
        lines.append(f"- gpu tests: {c.get('passed', 0)} passed, {c.get('failure', 0) + c.get('error', 0)} failed, "
                     f"{c.get('skipped', 0)} skipped (pytest exit {t.get('returncode')})")
        lines += [f"  - FAILED {r['test']}" for r in t.get("rows", []) if r["outcome"] in ("failure", "error")]
    rows = [r for s in ("gptq", "peers") for r in data.get(s, {}).get("rows", [])]
    if rows:
        lines += ["", "| shape | job | blocks | wall (s) | s/block | GPU alloc pred/meas (GB) | GPU reserved pred/meas "
                  "(GB) | host peak (GB) | layer error | own-path error |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "skipped" in r or "error" in r:
                lines.append(f"| {r.get('shape', '')} | {r['job']} | | | | | | | "
                             f"{'skipped: ' + r['skipped'] if 'skipped' in r else 'FAILED: ' + r['error'][-200:]} | |"
                             .replace("\n", " "))
                continue
            bs = r.get("block_seconds") or []
            per = sum(bs) / len(bs) if bs else r["seconds"] / max(1, r.get("blocks") or 1)
            lines.append(
                f"| {r['shape']} | {r['job']} | {r['blocks']} | {r['seconds']:.1f} | {per:.1f} | "
                f"{_gb(r.get('predicted_device_allocated_bytes'))} / {_gb(r.get('device_peak_bytes'))} | "
                f"{_gb(r.get('predicted_device_reserved_bytes'))} / {_gb(r.get('device_reserved_peak_bytes'))} | "
                f"{_gb(r.get('host_peak_bytes'))} | {_num(r.get('layer_error'))} | {_num(r.get('own_path_error'))} |")
    for r in data.get("train", {}).get("rows", []):
        if "error" in r:
            lines.append(f"\ntrainer: FAILED: {r['error'][-300:]}")
        else:
            lines.append(f"\ntrainer ({r['model']}, seq {r['seq_len']}, {r['batch_tokens']} tokens/step, "
                         f"{r['precision']}): {r['tokens_per_s']:.0f} tokens/s, MFU {r['mfu']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="stage", required=True)
    parsers = {name: sub.add_parser(name) for _, name in STAGES}
    for p in parsers.values():
        p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, seconds")
        p.add_argument("--json", default="", help="the stage's result file (rewritten as it goes)")
        p.add_argument("--seed", type=int, default=0)
    for name in ("gptq", "peers"):
        p = parsers[name]
        p.add_argument("--preset", default="floatlm-3.9b")
        p.add_argument("--blocks", type=int, default=2, help="first blocks of the shape (same in stages 3 and 5)")
        p.add_argument("--nsamples", type=int, default=512)
        p.add_argument("--seqlen", type=int, default=2048)
    parsers["gptq"].add_argument("--jobs", nargs="+", default=["fast", "exact"], choices=["exact", "fast"],
                                 help="fast first: it is the shorter, so a timeout in exact keeps it")
    parsers["peers"].add_argument("--peers", nargs="+", default=["reference", "llm-compressor"])
    parsers["peers"].add_argument("--budget", type=float, default=140.0, help="seconds the whole stage may take")
    parsers["tests"].add_argument("--timeout", type=float, default=110.0)
    parsers["train"].add_argument("--steps", type=int, default=15)
    parsers["train"].add_argument("--micro-batch", type=int, default=16)
    rep = sub.add_parser("report")
    rep.add_argument("folder")
    rep.add_argument("tag")
    args = ap.parse_args()
    if args.stage == "report":
        print(report(Path(args.folder), args.tag))
        return
    {"env": stage_env, "tests": stage_tests, "gptq": stage_gptq, "train": stage_train,
     "peers": stage_peers}[args.stage](args)


if __name__ == "__main__":
    main()
