"""Memory settings of the GPTQ pipeline, the memory plan made before any compute, and peak measurement.

``MemorySettings`` is the one place for what changes memory and speed but not the recipe's meaning:
where the hidden states between blocks live (device, host, disk) and in which dtype, the dtype of the
block forwards, TF32 for the Hessian products, the batch of calibration windows per forward, and the
replay cache. ``plan_memory`` turns a model's ``config.json`` fields and these settings into predicted
bytes (pure arithmetic: no model, no torch tensors), picks the storage mode for ``offload="auto"``, and
says whether it fits; ``check_plan`` fails with the numbers and the options that would fit.

The model of peak memory (host, for the CPU path) is

    baseline + weights + results + hidden-state buffers + replay cache + max(forward, solve)

with every term exact arithmetic except the baseline and the two working sets, whose constants below
were fitted to measured peak RSS (``bench/bench_memory.py``, ``bench/quantize_memory.md``):
- forward: the live tensors of one block forward on one batch of b windows x T tokens, in units of
  b*T*hidden and b*T*intermediate values of the forward dtype, plus the fp32 copy the Hessian hook makes;
- solve: the Hessian accumulator and the solver's copies, in units of in^2 and rows*in fp32 values of the
  largest group (LLaMA: down_proj's in = intermediate, or gate/up's stacked rows).
Results (codes uint8, scales/zeros fp32) are counted for the whole model: they are all alive at the end.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from quantlm.architectures import ARCHITECTURES, BlockMap, block_dims
from quantlm.dtypes import FLOAT_BYTES
from quantlm.errors import QuantlmError
from quantlm.gptq.allocator import MMAP_THRESHOLD_MAX
from quantlm.recipes import doc
from quantlm.specs import spec_from_config

GB = 1e9
DTYPE_BYTES = FLOAT_BYTES

# ---- fitted constants (bench/quantize_memory.md, "memory model"); bytes unless stated -----------------
# Process baseline of a quantize run on the CPU: interpreter, torch, transformers, the model object
# without its weights (~405 MB when the pipeline starts), plus what the run itself adds besides the modelled
# terms (oneDNN primitive caches, thread pools, allocator arenas: BASELINE_GROWTH, the fitted difference).
BASELINE_CPU = 481e6
BASELINE_GROWTH = 73e6
# On a GPU the CUDA runtime and libraries add host memory (not measured on this project's machines yet:
# a conservative guess that bench/gpu_check.sh records next to the measured value).
BASELINE_CUDA_EXTRA = 2.5e9
# Forward working set per token of a batch: K_FWD values of width hidden + intermediate in the forward dtype
# (norm, attention and MLP temporaries, and the allocator's slack: tensors below glibc's 32 MB mmap threshold
# stay in the heap); plus the Hessian hook's fp32 copy of the widest input and its [in, in] accumulator.
# One constant for d + f because every Spectra shape has f ~ 2.5-3 d, so separate ones are not identifiable.
K_FWD = 0.955
# Solve working set: K_SOLVE_H fp32 matrices [in, in] (the group's H and the solver's copies: permuted H,
# Cholesky factor, its inverse) and K_SOLVE_W fp32 matrices [rows, in] (stacked W, its transpose, codes, errors);
# measured on the solver alone for down_proj and gate/up of the 3.9B shape (bench/quantize_memory.md).
K_SOLVE_H = 4.0
K_SOLVE_W = 4.2
# Allocator slack per quantized block, as a fraction of the block's fp32 weights: after malloc_trim the
# per-block growth measured 0.89x (99M), 1.1-1.37x (390M, noisy) and 0.98x (1.1B) of weights + results.
K_BLOCK_SLACK = 0.05
# The same without trimming (runs far from the memory limit, see TRIM_FRACTION): freed temporaries stay
# resident, per block and about one working set's worth in all. Least squares over the 99M (2 and 16 blocks,
# 32 x 512) and 390M (2 and 24 blocks, 16 x 1024) runs of bench/quantize_memory.md: predicted/measured
# 0.97-1.01.
K_BLOCK_SLACK_UNTRIMMED = 0.12
K_HEAP_WORKING_SET = 0.68
# The allocator's free pages are handed back to the OS (malloc_trim after each group and block) only when the
# plan's peak is above this share of the available memory: every trim makes the next allocations fault their
# pages in again (99M shape, 32 x 512 tokens: 3.1M minor faults and 11.9 s of system time with the trims,
# 0.56M and 2.7 s without; quantize call 42 -> 33 s), which costs more than it saves where memory is ample.
TRIM_FRACTION = 0.5
# Activations above allocator.MMAP_THRESHOLD_MAX are mmap-served (and fault their pages in every time),
# unless allocator.large_tensors_in_heap is on. 1 block of the 99M shape at 512 x 2048 tokens, batch 8 (84 MB
# MLP activations): 289 s with 43M minor faults -> 197 s with 2.8M (bench/quantize_memory.md).
# Large tensors in the heap (allocator.py): freed chunks between replay records and results are reused
# in whatever order the passes free and allocate them, so the peak rises above the mmap-served one by up to
# this share of the replay cache plus the working set (Spectra recipe, batch 8 x 2048: 390M shape 0.54 for a
# process that ran blocks 2-14, 0.46 for one that ran 15-24; 99M 0.47 over all 16 blocks; 0.16 for 8 blocks at
# 64 x 2048, 0.06-0.10 for 1-2 blocks; bench/quantize_memory.md): the largest measured, so shorter runs are
# over-predicted. The excess comes from passes whose replay records do not all fit (each records its first
# batch, then drops it); where every pass's records fit (the 99M shape at 64 x 2048: GPTQ 3.19 GB measured over
# 8 blocks against 3.31 planned without the excess) no excess is added. On an Intel VM the full 99M run's excess was
# 0.84 (predicted / measured 0.923); 0.54 keeps every measured run within 10% (0.46-0.65 would), and heap mode is
# only chosen below half the machine's memory, so the under-prediction cannot exhaust it.
K_HEAP_FRAGMENTS = 0.54
# GPU memory PyTorch's caching allocator holds (max_memory_reserved) beyond what tensors use (max_memory_allocated):
# blocks are rounded up to 2 MB and cached segments get split between the sizes that come and go from pass to pass.
# Counted as this share of the device's working set and replay records (the tensors that come and go); the
# hidden-state buffers and the block's weights are allocated whole and reused block after block. Not yet measured
# on a GPU (bench/gpu_check.sh records the plan's reserved bytes next to max_memory_reserved): a cautious guess.
K_CUDA_RESERVED = 0.25
# Safety margin: a plan fits when its predicted peak is at most this fraction of what is available.
FIT_FRACTION = 0.95
# Share of a GPU's memory left after the plan that the auto replay cache may take.
GPU_REPLAY_SHARE = 0.5


@dataclass(frozen=True)
class MemorySettings:
    """Where calibration activations live and in which precision the block forwards run (GPTQ pipeline)."""

    activation_dtype: Literal["auto", "float32", "bfloat16", "float16"] = doc(
        "dtype of the stored hidden states between blocks (block inputs/outputs); auto: the forward dtype (fp32 "
        "forwards store fp32, half-precision forwards their own dtype: the same numbers in half the memory); "
        "Hessians and solves stay fp32", "auto")
    offload: Literal["auto", "none", "host", "disk"] = doc(
        "where the hidden states between blocks live: auto (the first that fits of device, host, disk), "
        "none (on the compute device), host (CPU memory, pinned for a GPU), disk (files, resumable)", "auto")
    offload_dir: str = doc(
        "folder for disk-offloaded hidden states and the resume state; empty: <tmp>/quantlm-offload/<run>", "")
    resume: bool = doc("with disk offload, continue a killed run at the block it was in", True)
    forward_dtype: Literal["float32", "bfloat16", "float16"] = doc(
        "dtype of the block forwards (bf16 is fast on CPUs with AVX512-BF16/AMX and on GPUs); "
        "Hessians and solves stay fp32, codes come from fp32 weights", "float32")
    batch_size: int = doc("calibration windows per forward; 0: 8 on the CPU, up to 16 that fit on a GPU", 0)
    replay_cache_gb: float = doc(
        "memory for submodule outputs replayed between a block's passes; -1: up to 4 on the CPU, "
        "what is left of the GPU's memory on a GPU; 0 recomputes", -1.0)
    max_memory_gb: float = doc("host memory the plan may use; 0: what the machine has available", 0.0)
    keep_weights: bool = doc(
        "write the dequantized weights back into the model (it stays usable); off: release each quantized "
        "linear's weight after its block (the results hold the codes; the writers need only those), which "
        "saves the codes' worth of memory at the peak", True)

    @property
    def storage_dtype(self) -> str:
        """The dtype the hidden states are stored in: ``activation_dtype``, or the forward dtype for ``auto``. With
        half-precision forwards that is lossless: every block reads its inputs in the forward dtype, and a stored
        fp32 copy would be rounded to it the same way on the next read."""
        return self.forward_dtype if self.activation_dtype == "auto" else self.activation_dtype

    def __post_init__(self):
        if self.batch_size < 0:
            raise QuantlmError(f"batch_size={self.batch_size}: use a positive number of windows, or 0 for auto")
        if self.replay_cache_gb < 0 and self.replay_cache_gb != -1:
            raise QuantlmError(f"replay_cache_gb={self.replay_cache_gb}: use GB >= 0, or -1 for auto")
        if self.max_memory_gb < 0:
            raise QuantlmError(f"max_memory_gb={self.max_memory_gb}: use GB > 0, or 0 for what is available")


# ---------------------------------------------------------------------------------------------- shapes

def model_shape(config: dict) -> dict:
    """The fields of an HF ``config.json`` the plan needs, read once by ``specs.spec_from_config``."""
    spec = spec_from_config(config, "config.json")
    return {"model_type": spec.model_type, "hidden": spec.hidden_size, "intermediate": spec.intermediate_size,
            "layers": spec.num_hidden_layers, "heads": spec.num_attention_heads, "kv_heads": spec.kv_heads,
            "head_dim": spec.head_dim, "vocab": spec.vocab_size, "tied": spec.tie_word_embeddings}


def _block_map(shape: dict) -> BlockMap:
    return ARCHITECTURES[shape.get("model_type", "llama")].block_map


def linear_shapes(shape: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each block linear, keyed by block-relative path (the shape rules of the block map)."""
    return _block_map(shape).linear_shapes(_dims(shape))


def _dims(shape: dict) -> dict[str, int]:
    return block_dims(shape["hidden"], shape["intermediate"], shape["heads"], shape["kv_heads"], shape["head_dim"])


def _groups(shape: dict) -> list[tuple[int, int]]:
    """(stacked rows, in) of the true-sequential groups (one shared solve each)."""
    s = linear_shapes(shape)
    return [(sum(s[path][0] for path in group), s[group[0]][1]) for group in _block_map(shape).sequential]


def param_count(shape: dict) -> tuple[int, int]:
    """(parameters of the whole model, parameters of one block)."""
    block = sum(o * i for o, i in linear_shapes(shape).values()) + sum(_block_map(shape).norm_shapes(
        _dims(shape)).values())
    outside = shape["vocab"] * shape["hidden"] * (1 if shape["tied"] else 2) + shape["hidden"]
    return shape["layers"] * block + outside, block


def result_bytes(shape: dict, group_size: int, rtn: bool = False) -> int:
    """Bytes of the solver results of the whole model: codes uint8, scale and zero fp32 per group, g_idx
    int32, per-row loss float64 (GPTQ only)."""
    total = 0
    for out, inp in linear_shapes(shape).values():
        groups = 1 if group_size == -1 else inp // group_size
        total += out * inp + 2 * out * groups * 4 + inp * 4 + (0 if rtn else out * 8)
    return total * shape["layers"]


def replay_bytes(shape: dict, tokens: int, fbytes: int, cap: float, true_sequential: bool = True,
                 batch_tokens: int = 0) -> int:
    """Peak bytes of the replay cache of ``block_passes`` for a LLaMA block, as its all-or-nothing rule
    decides per pass (records kept only if all batches fit in ``cap``; a pass whose records do not fit still
    records its first batch, ``batch_tokens`` tokens, before dropping them): the first block (tails not yet
    learned) and the later ones (attention and MLP finished around o_proj's / down_proj's input)."""
    if not true_sequential or cap <= 0:
        return 0
    d, f = shape["hidden"], shape["intermediate"]
    kvw = shape["kv_heads"] * shape["head_dim"]
    q = shape["heads"] * shape["head_dim"]
    per = tokens * fbytes
    peak = 0

    def step(held: int, new: int) -> int:
        """held + new if the pass's records fit (kept), else held (the first batch's records a transient)."""
        nonlocal peak
        if (held + new) * per <= cap:
            peak = max(peak, (held + new) * per)
            return held + new
        peak = max(peak, held * per + new * batch_tokens * fbytes)
        return held

    # first block: the pass for o records q,k,v; the pass for gate the attention (its records replace q,k,v);
    # the pass for down gate and up
    held = step(0, q + 2 * kvw)
    with_attn = step(held, d)
    attn = with_attn != held
    held = d if attn else held
    step(held, 2 * f if attn else d + 2 * f)
    # later blocks: o_proj's input (tail of the attention), then down_proj's input (tail of the MLP)
    held = step(0, d)
    step(held, f)
    return int(peak)


# ------------------------------------------------------------------------------------------ machine

def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: VmHWM (Linux; not inherited across fork + exec, unlike
    ``ru_maxrss``), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_host_bytes() -> int:
    """Memory this process could reach: MemAvailable plus its own RSS, capped by a cgroup limit."""
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            avail = 0
    total = avail + rss_bytes()
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < 1 << 60:
            used = 0
            for cur in ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):
                try:
                    used = int(Path(cur).read_text().strip())
                    break
                except (OSError, ValueError):
                    continue
            total = min(total, int(raw) - used + rss_bytes())
        break
    return total


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX on this CPU (bf16 products then run at least as fast as fp32 through oneDNN)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_offload_dir(key: str) -> Path:
    """``<tmp>/quantlm-offload/<key>``: one folder per run (the key covers the output, the recipe and the tokens)."""
    return Path(tempfile.gettempdir()) / "quantlm-offload" / key[:16]


# --------------------------------------------------------------------------------------------- plan

def pinned_bytes(nbytes: int) -> int:
    """Host memory a pinned buffer of ``nbytes`` takes: PyTorch's pinned (CUDA host) allocator rounds every request
    up to the next power of two (the 3.9B shape's two 12.9 GB fp32 hidden-state buffers pin 17.2 GB each)."""
    return 1 << max(0, int(nbytes) - 1).bit_length() if nbytes > 0 else 0


def _device_type(device) -> str:
    return str(device).split(":")[0]


def plan_memory(config: dict, nsamples: int, seqlen: int, settings: MemorySettings | None = None, bits: int = 4,
                group_size: int = 128, device: str = "cpu", available_bytes: int | None = None, *,
                weights_dtype: str = "float32", true_sequential: bool = True, rtn: bool = False,
                baseline_bytes: float | None = None, device_available_bytes: int | None = None,
                disk_available_bytes: int | None = None, offload_dir: str | None = None) -> dict:
    """The memory plan of quantizing a model described by ``config`` (its ``config.json`` as a dict).

    Pure arithmetic: nothing is allocated. ``available_bytes``: host memory the run may use (default:
    ``settings.max_memory_gb``, else what the machine has now); ``device_available_bytes``: free GPU
    memory (default: asked from torch when ``device`` is CUDA). ``weights_dtype``: the dtype the model is
    loaded in (a bf16 checkpoint may be loaded as bf16: the pipeline upcasts one block at a time).
    ``baseline_bytes``: the process's memory besides the model when the pipeline starts (default: the
    fitted constant; the pipeline passes its measured RSS minus the weights, and BASELINE_GROWTH is added). Returns a JSON-able dict: the shape, every
    component in bytes, the chosen ``hidden_states`` location (device / host / disk), batch size and
    replay cache, ``predicted_peak_bytes`` (host) and ``predicted_device_peak_bytes`` (GPU runs),
    ``fits`` and, when it does not, ``fixes``: settings that would fit.
    """
    settings = settings or MemorySettings()
    if nsamples <= 0 or seqlen <= 0:
        raise QuantlmError("nsamples and seqlen must be positive")
    dev = _device_type(device)
    shape = model_shape(config)
    if available_bytes is None:
        available_bytes = int(settings.max_memory_gb * GB) if settings.max_memory_gb > 0 else available_host_bytes()
    if dev == "cuda" and device_available_bytes is None:
        device_available_bytes = _cuda_free_bytes(device)
    fixed = dict(shape=shape, nsamples=nsamples, seqlen=seqlen, bits=bits, group_size=group_size, dev=dev,
                 weights_dtype=weights_dtype, true_sequential=true_sequential, rtn=rtn,
                 baseline_bytes=baseline_bytes, available=int(available_bytes),
                 device_available=device_available_bytes, disk_available=disk_available_bytes,
                 offload_dir=offload_dir)
    plan = _first_fit(settings, fixed)
    if not plan["fits"] and settings.offload == "auto" and settings.keep_weights:
        # the last resort of auto: release each block's quantized weights once its codes are kept (the
        # results are the same; the model is left without its block linears' weights)
        released = _first_fit(dataclasses.replace(settings, keep_weights=False), fixed)
        if released["fits"]:
            released["warning"] = ((released.get("warning") + " ") if released.get("warning") else "") + (
                "nothing fits while keeping the quantized weights in the model: each block's weights are "
                "released once its codes are kept (--no-keep-weights; the outputs are the same)")
            plan = released
    plan["settings"] = dataclasses.asdict(settings)
    if not plan["fits"]:
        plan["fixes"] = _fixes(settings, fixed)
    return plan


def _first_fit(settings: MemorySettings, fixed: dict) -> dict:
    """The first candidate of ``_candidates`` that fits, else the last one tried."""
    plan = None
    for candidate in _candidates(settings, fixed["dev"], fixed["nsamples"]):
        plan = _plan_one(settings, *candidate, **fixed)
        if plan["fits"]:
            break
    return plan


def plan_for_checkpoint(model_dir: str | os.PathLike, nsamples: int, seqlen: int,
                        settings: MemorySettings | None = None, bits: int = 4, group_size: int = 128,
                        device: str = "cpu", **kw) -> dict:
    """``plan_memory`` from a checkpoint folder's ``config.json`` alone (no weights needed: a plan can be made
    before downloading them); ``kw`` as ``plan_memory`` (e.g. ``weights_dtype``, ``available_bytes``)."""
    import json

    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise QuantlmError(f"{path} not found; a memory plan needs the model's config.json") from None
    except ValueError as e:
        raise QuantlmError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise QuantlmError(f"{path} is not a config (a JSON object); pass a Hugging Face checkpoint directory")
    spec_from_config(config, str(path))  # an impossible shape is refused naming the file, before any arithmetic
    return plan_memory(config, nsamples, seqlen, settings, bits, group_size, device, **kw)


def _candidates(settings: MemorySettings, dev: str, nsamples: int):
    """(hidden-state location, batch size, replay cap or None for auto) in the order auto tries them."""
    if settings.offload == "auto":
        places = ["device", "host", "disk"] if dev == "cuda" else ["host", "disk"]
    elif settings.offload == "none":
        places = ["device" if dev == "cuda" else "host"]
    else:
        places = [settings.offload]
    if settings.batch_size:
        sizes = [settings.batch_size]
    else:
        sizes = [16, 8, 4, 2, 1] if dev == "cuda" else [8, 4, 2, 1]
    sizes = sorted({min(b, nsamples) for b in sizes}, reverse=True)
    caps = [None] if settings.replay_cache_gb == -1 else [settings.replay_cache_gb * GB]
    # the largest batch first in every place, then smaller batches (disk before smaller batches: on a CPU
    # the file I/O of a block costs seconds, a smaller batch only memory); replay shrinks inside _plan_one
    for b in sizes:
        for place in places:
            for cap in caps:
                yield place, b, cap


def _cuda_free_bytes(device) -> int | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    except (ImportError, RuntimeError):
        return None


def _plan_one(settings: MemorySettings, place: str, batch: int, cap: float | None, *, shape, nsamples, seqlen,
              bits, group_size, dev, weights_dtype, true_sequential, rtn, baseline_bytes, available,
              device_available, disk_available, offload_dir) -> dict:
    d, f = shape["hidden"], shape["intermediate"]
    sbytes = DTYPE_BYTES[settings.storage_dtype]
    fbytes = DTYPE_BYTES[settings.forward_dtype]
    wbytes = DTYPE_BYTES.get(weights_dtype, 4)
    tokens = nsamples * seqlen
    n_params, block_params = param_count(shape)
    buffers = 2 * tokens * d * sbytes
    groups = _groups(shape)
    widest_in = max(i for _, i in groups)
    solve = max(K_SOLVE_H * i * i * 4 + K_SOLVE_W * r * i * 4 for r, i in groups)
    bt = batch * seqlen
    forward = bt * K_FWD * (d + f) * fbytes + bt * widest_in * 4 + widest_in * widest_in * 4
    if place == "disk":
        forward += 2 * bt * d * sbytes  # staging of one read and one write
    # block copies: an upcast (weights stored in half precision) and/or a forward-dtype copy
    block_copy = (block_params * 4 if wbytes != 4 else 0) + (block_params * fbytes if fbytes != 4 else 0)
    on_gpu = dev == "cuda"
    if cap is None:  # auto replay cache
        if on_gpu and device_available is not None:
            dev_fixed = block_params * (4 + (fbytes if fbytes != 4 else 0)) + (buffers if place == "device" else 0)
            # half of what is left once the working set and the allocator's share of it and of the records are
            # counted (the GPU working sets are not measured yet)
            room = (FIT_FRACTION * device_available - dev_fixed) / (1 + K_CUDA_RESERVED) - max(forward, solve)
            cap = max(0.0, GPU_REPLAY_SHARE * room)
        else:
            cap = 0.0 if on_gpu else 4 * 2**30
    if replay_bytes(shape, tokens, fbytes, cap, true_sequential) == 0:
        cap = 0.0  # no pass's records would ever be kept: recording its first batch would only cost memory
    replay = replay_bytes(shape, tokens, fbytes, cap, true_sequential, bt)
    weights = n_params * wbytes
    results = result_bytes(shape, group_size, rtn)
    slack = int(K_BLOCK_SLACK * block_params * 4 * shape["layers"])
    base = BASELINE_CPU if baseline_bytes is None else float(baseline_bytes) + BASELINE_GROWTH
    if on_gpu and baseline_bytes is None:
        base += BASELINE_CUDA_EXTRA
    host = {"baseline": base, "weights": weights, "results": results, "allocator_slack": slack, "tokens": tokens * 8,
            "hidden_buffers": (pinned_bytes(buffers // 2) * 2 if on_gpu else buffers) if place == "host" else 0,
            "replay_cache": 0 if on_gpu else replay,
            "working_set": 0 if on_gpu else max(forward, solve) + block_copy}
    if on_gpu:
        host["working_set"] = 2 * bt * d * sbytes if place != "device" else 0  # staging
    host_peak = int(sum(host.values()))
    # a batch's widest fp32 activations above glibc's mmap threshold: serve them from the heap (allocator.py),
    # where memory is ample (its peak depends on the allocation order: K_HEAP_FRAGMENTS), and trim after each
    # group, which then costs a small share of a group's compute
    large = not on_gpu and bt * max(d, f) * 4 > MMAP_THRESHOLD_MAX
    drops = replay > replay_bytes(shape, tokens, fbytes, cap, true_sequential)  # some pass records, then drops
    fragments = int(K_HEAP_FRAGMENTS * (replay + max(forward, solve))) if drops else 0
    heap = large and host_peak + fragments <= TRIM_FRACTION * available
    if heap:
        host["heap_fragments"] = fragments
        host_peak += fragments
    trim = heap or host_peak > TRIM_FRACTION * available
    if not trim:
        untrimmed = int(K_BLOCK_SLACK_UNTRIMMED * block_params * 4 * shape["layers"]
                        + K_HEAP_WORKING_SET * max(forward, solve))
        host_peak += untrimmed - slack
        host["allocator_slack"] = slack = untrimmed
    if not settings.keep_weights:  # block i holds the weights of blocks >= i and the results of blocks < i
        outside = weights - shape["layers"] * block_params * wbytes
        at_end = base + outside + results + slack + tokens * 8
        host_peak = int(max(host_peak - results - slack, at_end))
    plan = {
        "shape": shape, "nsamples": nsamples, "seqlen": seqlen, "tokens": tokens, "bits": bits,
        "group_size": group_size, "device": dev, "weights_dtype": weights_dtype,
        "activation_dtype": settings.storage_dtype, "forward_dtype": settings.forward_dtype,
        "hidden_states": place, "batch_size": batch, "replay_cache_bytes": int(cap),
        "keep_weights": settings.keep_weights,
        "bytes": {k: int(v) for k, v in host.items()},
        "working_sets": {"forward": int(forward), "solve": int(solve), "block_copy": int(block_copy)},
        "predicted_peak_bytes": host_peak,
        "available_bytes": int(available),
        "trim_allocator": bool(trim), "large_tensors_in_heap": bool(heap),
    }
    fits = host_peak <= FIT_FRACTION * available
    if on_gpu:
        devb = {"block_weights": block_params * 4 + (block_params * fbytes if fbytes != 4 else 0),
                "hidden_buffers": buffers if place == "device" else 0, "replay_cache": replay,
                "working_set": max(forward, solve)}
        devb["allocator_reserve"] = K_CUDA_RESERVED * (replay + max(forward, solve))
        plan["device_bytes"] = devb = {k: int(v) for k, v in devb.items()}
        # what the tensors use (max_memory_allocated), and what the allocator holds for them (max_memory_reserved)
        plan["predicted_device_allocated_bytes"] = sum(v for k, v in devb.items() if k != "allocator_reserve")
        plan["predicted_device_peak_bytes"] = sum(devb.values())
        plan["device_available_bytes"] = device_available
        if device_available is not None:
            fits = fits and plan["predicted_device_peak_bytes"] <= FIT_FRACTION * device_available
    if place == "disk":
        disk = buffers + results
        where = Path(offload_dir or settings.offload_dir or tempfile.gettempdir())
        if disk_available is None:
            disk_available = disk_free_bytes(where)
        plan["disk_bytes"] = int(disk)
        plan["disk_available_bytes"] = disk_available
        plan["offload_dir"] = str(where)
        if disk_available is not None:
            fits = fits and disk <= disk_available
    plan["fits"] = bool(fits)
    if settings.forward_dtype == "bfloat16" and dev == "cpu" and not cpu_has_native_bf16():
        plan["warning"] = ("forward_dtype bfloat16 on a CPU without AVX512-BF16/AMX: bf16 products are emulated "
                           "and run several times slower than fp32")
    return plan


def disk_free_bytes(path: Path) -> int | None:
    """Free bytes on the file system ``path`` is (or would be created) on; None where it cannot be asked."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return int(shutil.disk_usage(p).free)
    except OSError:
        return None


def _fixes(settings: MemorySettings, fixed: dict) -> list[dict]:
    """Settings changes (as CLI-style options) that would make the plan fit, each with its predicted peak."""
    trials = []
    if settings.offload not in ("disk",):
        trials.append({"offload": "disk"})
    if settings.storage_dtype == "float32":
        trials.append({"activation_dtype": "bfloat16"})
        if settings.offload != "disk":
            trials.append({"offload": "disk", "activation_dtype": "bfloat16"})
    for b in (2, 1):
        if not settings.batch_size or settings.batch_size > b:
            trials.append({"offload": "disk", "batch_size": b})
    if settings.replay_cache_gb != 0:
        trials.append({"offload": "disk", "batch_size": 1, "replay_cache_gb": 0.0})
    if settings.keep_weights:
        trials.append({"offload": "disk", "keep_weights": False})
    if fixed["weights_dtype"] == "float32":
        trials.append({"offload": "disk", "weights_dtype": "bfloat16"})
    out = []
    for change in trials:
        fx = dict(fixed)
        if "weights_dtype" in change:
            fx["weights_dtype"] = change["weights_dtype"]
        s = dataclasses.replace(settings, **{k: v for k, v in change.items() if k != "weights_dtype"})
        p = _first_fit(s, fx)
        if p["fits"]:
            out.append({"change": change, "predicted_peak_bytes": p["predicted_peak_bytes"]})
        if len(out) >= 3:
            break
    return out


def _option(key: str, value) -> str:
    if key == "weights_dtype":
        return f"load the checkpoint in {value} (lossless for a {value} checkpoint)"
    flag = key.replace("_", "-")
    if isinstance(value, bool):  # the CLI's --x / --no-x
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def _gb(x) -> str:
    return f"{x / GB:.1f} GB"


def size_text(x) -> str:
    """Bytes for a message: GB, or MB below a tenth of a GB (0.0 GB would read as nothing)."""
    return f"{x / GB:.2f} GB" if x >= GB / 10 else f"{x / 1e6:.1f} MB"


def check_plan(plan: dict) -> None:
    """Raise ``QuantlmError`` when ``plan`` does not fit, with its numbers and the options that would."""
    if plan["fits"]:
        return
    host_fits = plan["predicted_peak_bytes"] <= FIT_FRACTION * plan["available_bytes"]
    device_fits = plan.get("predicted_device_peak_bytes") is None or plan.get("device_available_bytes") is None \
        or plan["predicted_device_peak_bytes"] <= FIT_FRACTION * plan["device_available_bytes"]
    disk, disk_free = plan.get("disk_bytes"), plan.get("disk_available_bytes")
    if host_fits and device_fits and disk is not None and disk_free is not None and disk > disk_free:
        # only the disk is short: more memory would not help
        raise QuantlmError(f"--offload-dir {plan.get('offload_dir')} has {size_text(disk_free)} free, and the "
                           f"disk-offloaded hidden states need about {size_text(disk)}; free space there or choose "
                           "another --offload-dir")
    b = plan["bytes"]
    parts = ", ".join(f"{k.replace('_', ' ')} {_gb(v)}" for k, v in b.items() if v)
    lines = [f"quantizing needs about {_gb(plan['predicted_peak_bytes'])} of host memory ({parts}; hidden "
             f"states: {plan['hidden_states']}, {plan['activation_dtype']}, batch {plan['batch_size']}) but "
             f"{_gb(plan['available_bytes'])} are available"]
    if plan.get("predicted_device_peak_bytes") is not None and plan.get("device_available_bytes") is not None:
        lines.append(f"GPU: needs {_gb(plan['predicted_device_peak_bytes'])} of "
                     f"{_gb(plan['device_available_bytes'])} free")
    if plan.get("disk_bytes") is not None and plan.get("disk_available_bytes") is not None \
            and plan["disk_bytes"] > plan["disk_available_bytes"]:
        lines.append(f"disk offload needs {size_text(plan['disk_bytes'])} in {plan.get('offload_dir')} but "
                     f"{size_text(plan['disk_available_bytes'])} are free; choose another --offload-dir")
    fixes = plan.get("fixes") or []
    if fixes:
        opts = "; or ".join(" ".join(_option(k, v) for k, v in fx["change"].items())
                            + f" (about {_gb(fx['predicted_peak_bytes'])})" for fx in fixes)
        lines.append(f"use {opts}")
    else:
        lines.append("no setting fits: use a machine with more memory (or --max-memory-gb if the limit is wrong)")
    raise QuantlmError("; ".join(lines))


# ----------------------------------------------------------------------------------------- measure

class PeakSampler:
    """Peak RSS while the block runs: VmHWM when it rose during the block (exact), else the highest RSS
    sampled every ``interval`` seconds by a thread (the process's earlier peak was higher)."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self._stop = threading.Event()
        self._max = 0
        self.hwm_before = self.hwm_after = self.rss_before = 0
        self.peak_bytes = 0

    def _run(self):
        while not self._stop.wait(self.interval):
            self._max = max(self._max, rss_bytes())

    def __enter__(self):
        self.hwm_before = peak_rss_bytes()
        self._max = self.rss_before = rss_bytes()
        self._thread = threading.Thread(target=self._run, name="quantlm-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.hwm_after = peak_rss_bytes()
        self._max = max(self._max, rss_bytes())
        self.peak_bytes = self.hwm_after if self.hwm_after > self.hwm_before else self._max
        return False


def ratio(predicted: float, measured: float) -> float:
    return predicted / measured if measured else math.nan
