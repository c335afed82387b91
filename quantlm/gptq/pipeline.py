"""Layer-sequential GPTQ over a Hugging Face causal LM whose blocks a ``BlockMap`` describes.

1. Run the calibration windows through the model up to the first block and keep its inputs (hidden
   states plus the keyword arguments the block is called with: rotary position embeddings, mask, ...).
2. Per block, on the compute device: for each sequential group (LLaMA: [q,k,v] -> [o] -> [gate,up] ->
   [down]) run the block forward just far enough to see the group's input (the forward stops there), with
   the earlier groups already quantized in place (true-sequential), accumulate one Hessian for the group,
   then quantize each of its linears. Finally recompute the block's outputs with all its weights quantized:
   they are the next block's inputs. Each pass replays the outputs of the submodules an earlier pass
   already finished (``block_passes``), so a block costs about one forward, not ~2.7 (the first block
   about one forward plus one attention, while the passes learn where submodules end in a linear).
Only one block is on the compute device at a time; the rest of the model stays on the CPU. On the CPU the
block linears and Hessian products run through oneDNN (``cpu_linear``) and the solves on one thread.

Memory (``memory.MemorySettings``): a plan is made and checked before any compute (``memory.plan_memory``:
it fails with the numbers and the fixes when the run would not fit); the hidden states between blocks
live on the device, in (pinned) host memory or on disk, in fp32, bf16 or fp16 (``offload.HiddenStates``);
the block forwards may run in bf16 while the Hessians and solves stay fp32 (an fp32 master copy of each
block linear gives the solver its weights). A disk-offloaded run is resumable at block granularity
(``offload.RunState``). The result carries the plan and the measured peak memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from quantlm.errors import QuantlmError
from quantlm.gptq.allocator import large_tensors_in_heap, release_free_memory
from quantlm.gptq.block_passes import BlockPasses, StopForward, map_tensors, to_device
from quantlm.gptq.cpu_linear import onednn_linears
from quantlm.gptq.hessian import HessianAccumulator
from quantlm.gptq.memory import (
    MemorySettings,
    PeakSampler,
    check_plan,
    default_offload_dir,
    peak_rss_bytes,
    plan_memory,
    rss_bytes,
)
from quantlm.gptq.offload import DTYPES, HiddenStates, RunState, batches_of, run_fingerprint
from quantlm.gptq.settings import GPTQSettings
from quantlm.gptq.solver import GPTQResult, gptq_quantize_shared, reconstruction_error, rtn_quantize
from quantlm.models.blocks import BlockMap
from quantlm.quantized import check_group_size
from quantlm.recipes import to_dict

log = logging.getLogger(__name__)


@dataclass
class ModuleReport:
    name: str
    shape: tuple[int, int]
    loss: float  # the solver's loss (sum of squared, Hessian-weighted errors)
    error: float  # reconstruction_error(W, Q, H) on the calibration inputs
    damp: float  # damping actually used (after Cholesky retries)
    seconds: float  # solve time (a group's shared solve split by rows), Hessian accumulation excluded
    nsamples: int  # calibration tokens seen by the Hessian

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PipelineResult:
    results: dict[str, GPTQResult]  # full module name -> result
    modules: list[ModuleReport]
    seconds: float
    plan: dict | None = None  # memory.plan_memory's plan this run followed (None: no usable model config)
    # measured_peak_bytes: the process's peak RSS (VmHWM) at the end; pipeline_peak_bytes: the peak during
    # this call (see memory.PeakSampler); device_peak_bytes: torch.cuda.max_memory_allocated (GPU runs);
    # resumed_from_block: the block a disk-offloaded run restarted at (0: from the start)
    measured: dict = field(default_factory=dict)

    @property
    def measured_peak_bytes(self) -> int | None:
        return self.measured.get("measured_peak_bytes")

    def memory_report(self) -> dict:
        """What report.json records: the plan and what was measured next to it."""
        return {"plan": self.plan, **self.measured}


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def check_quantizable(model: nn.Module, block_map: BlockMap, recipe: GPTQSettings) -> None:
    """Fail fast, before any compute, on settings the model cannot take (group size, NaN/Inf weights)."""
    layers = get_submodule(model, block_map.layers_path)
    for i, block in enumerate(layers):
        for name in block_map.linears:
            lin = get_submodule(block, name)
            full = f"{block_map.layers_path}.{i}.{name}"
            in_features = lin.weight.shape[1]
            check_group_size(recipe.group_size, in_features, full)
            if not torch.isfinite(lin.weight).all():
                raise QuantlmError(f"{full}.weight contains NaN or Inf values; quantize a finite checkpoint")


@contextlib.contextmanager
def _outside_blocks_on(model: nn.Module, layers: nn.Module, device: torch.device):
    """Every parameter and buffer outside the decoder blocks (embeddings, rotary, norm) on ``device``, half
    precision ones upcast to fp32 (so a model loaded in bf16 gives the first block the same inputs and
    rotary tables as the same weights in fp32); the original tensors are put back afterwards."""
    inside = {id(m) for m in layers.modules()}
    params, buffers = {}, []
    for module in model.modules():
        if id(module) in inside:
            continue
        for p in module._parameters.values():
            if p is not None and id(p) not in params:  # tied parameters (embedding = head) are one object
                params[id(p)] = (p, p.data)
                dtype = torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype
                p.data = p.data.to(device=device, dtype=dtype)
        for key, b in module._buffers.items():
            if b is not None:
                buffers.append((module, key, b))
                module._buffers[key] = b.to(device)
    try:
        yield
    finally:
        for p, data in params.values():
            p.data = data
        for module, key, b in buffers:
            module._buffers[key] = b


def _cast_floats(obj, dtype: torch.dtype):
    """``obj`` (nested tuple / list / dict of tensors) with floating tensors cast to ``dtype``."""
    return map_tensors(obj, lambda t: t.to(dtype) if t.is_floating_point() else t)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block_map: BlockMap, tokens: torch.Tensor, batch_size: int,
                         device: torch.device, store: HiddenStates | None = None
                         ) -> tuple[list[torch.Tensor], dict[int, dict]]:
    """Hidden states entering the first block, per batch, and the block's keyword arguments per batch size.

    Without ``store`` the hidden states are returned (fp32, a list of batches); with it each batch is
    written to ``store`` as it is computed and the list is empty.
    """
    layers = get_submodule(model, block_map.layers_path)
    first = layers[0]
    captured: dict = {}

    def hook(_module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise StopForward

    hidden: list[torch.Tensor] = []
    kwargs_by_size: dict[int, dict] = {}
    with _outside_blocks_on(model, layers, device):
        first.to(device)  # some models check the first block's device; it is moved back below
        handle = first.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for b, start in enumerate(range(0, tokens.shape[0], batch_size)):
                batch = tokens[start : start + batch_size].to(device)
                try:
                    model(input_ids=batch, use_cache=False)
                except StopForward:
                    pass
                if store is not None:
                    store.write(b, captured.pop("hidden"))
                else:
                    hidden.append(captured.pop("hidden").float())
                kwargs_by_size.setdefault(batch.shape[0], captured["kwargs"])
        finally:
            handle.remove()
            first.to("cpu")
    for kw in kwargs_by_size.values():
        kw["use_cache"] = False
        for key in ("past_key_values", "past_key_value", "cache"):  # no KV cache across calibration batches
            kw.pop(key, None)
    return hidden, kwargs_by_size


def _block_kwargs(model: nn.Module, block_map: BlockMap, tokens: torch.Tensor, batches: list[tuple[int, int]],
                  device: torch.device) -> dict[int, dict]:
    """The first block's keyword arguments per batch size, from one batch of each size (resume)."""
    kwargs: dict[int, dict] = {}
    for s, e in batches:
        if e - s not in kwargs:
            _, kw = capture_block_inputs(model, block_map, tokens[s:e], e - s, device)
            kwargs.update(kw)
    return kwargs


@contextlib.contextmanager
def _solver_threads(device: torch.device):
    """One CPU thread for the solves: their per-column steps are tiny ops that a second thread only slows
    down (10x on a busy 2-core machine, bench/solver.md), and one thread makes the codes independent of
    the thread count. Restores the caller's setting."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _block_on(block: nn.Module, device: torch.device, dtype: torch.dtype, linear_names):
    """``block`` on ``device`` with its parameters in the forward ``dtype``; yields the fp32 master weight
    of each linear (the tensor the solver reads and the quantized values are written to). Afterwards the
    parameters are back in their own dtype on the CPU, the linears holding the masters' (quantized) values."""
    block.to(device)
    saved = {name: p.data for name, p in block.named_parameters()}
    if dtype == torch.float32:
        if any(p.dtype != dtype for p in block.parameters()):
            block.to(dtype)  # weights stored in half precision: the fp32 upcast is the master
        masters = {n: get_submodule(block, n).weight.data for n in linear_names}
    else:  # fp32 masters (the stored tensors themselves when fp32), then the forward copies
        masters = {n: get_submodule(block, n).weight.data.float() for n in linear_names}
        block.to(dtype)
    try:
        yield masters
    finally:
        for name, p in block.named_parameters():
            if p.data is not saved[name]:
                p.data = saved[name]
        for n in linear_names:
            w = get_submodule(block, n).weight.data
            if w is not masters[n]:
                w.copy_(masters[n])
        block.to("cpu")


def _quantize_group(names: list[str], linears: list[nn.Module], Ws: list[torch.Tensor], H: torch.Tensor,
                    recipe: GPTQSettings, rtn: bool, device: torch.device, ntokens: int
                    ) -> list[tuple[GPTQResult, ModuleReport]]:
    """Quantize the linears of one group (sharing the Hessian ``H``) from their fp32 master weights ``Ws``;
    write the dequantized weights back to the masters and to the linears (forward copies)."""
    t0 = time.perf_counter()
    grid = {"grid": recipe.grid_spec()}
    with _solver_threads(device):
        if rtn:
            group_results = [rtn_quantize(W, bits=recipe.bits, group_size=recipe.group_size, sym=recipe.sym,
                                          **grid) for W in Ws]
        else:  # the linears of a group share H: one solve over their stacked rows
            group_results = gptq_quantize_shared(
                Ws, H, names=names, bits=recipe.bits, group_size=recipe.group_size, sym=recipe.sym,
                act_order=recipe.act_order, static_groups=recipe.static_groups, damp=recipe.damp,
                block_size=recipe.block_size, **grid)
    seconds = time.perf_counter() - t0
    rows = sum(W.shape[0] for W in Ws)
    out = []
    for full, lin, W, res in zip(names, linears, Ws, group_results, strict=True):
        Q = res.dequantize().to(W.device)
        err = float(reconstruction_error(W, Q, H))  # before the copy: W is the master weight
        W.copy_(Q)
        if lin.weight.data is not W:
            lin.weight.data.copy_(Q.to(lin.weight.dtype))
        # a shared solve's time is split over the group's layers by their share of rows
        report = ModuleReport(full, tuple(W.shape), float(res.loss), err, float(res.damp),
                              seconds * W.shape[0] / rows, ntokens)
        log.debug("%s: loss %.4g error %.4g damp %.3g", full, res.loss, err, res.damp)
        out.append((res.to("cpu"), report))  # codes leave the device with their block
    return out


def _keep_free_memory() -> None:
    """The allocator keeps its free pages (the plan has room; see ``memory.TRIM_FRACTION``)."""


def _release(linear: nn.Module) -> None:
    """Drop a quantized linear's weight (``MemorySettings.keep_weights`` off): an empty tensor of its dtype."""
    linear.weight.data = torch.empty(0, dtype=linear.weight.dtype)


# Test hook: "BLOCK:GROUP" kills the process (SIGKILL) after that group of that block is quantized, so a
# test can check that a disk-offloaded run resumes to the same result. Never set outside tests.
CRASH_ENV = "QUANTLM_TEST_CRASH_AT"


def _maybe_crash(block: int, group: int) -> None:
    at = os.environ.get(CRASH_ENV)
    if at and at == f"{block}:{group}":
        os.kill(os.getpid(), signal.SIGKILL)


def _settings(memory: MemorySettings | None, batch_size: int | None, offload: bool | None,
              replay_cache_gb: float | None) -> MemorySettings:
    """``memory`` with the older keyword arguments of ``quantize_blocks`` applied on top (when given)."""
    s = memory or MemorySettings()
    if batch_size is not None:
        s = replace(s, batch_size=batch_size)
    if offload is not None:
        s = replace(s, offload="host" if offload else "none")
    if replay_cache_gb is not None:
        s = replace(s, replay_cache_gb=replay_cache_gb)
    return s


_NOT_IN_FINGERPRINT = {"formats", "seeds", "calibration", "nsamples", "seqlen"}


def _fingerprint_extra(recipe, block_map: BlockMap, rtn: bool, settings: MemorySettings, batch: int,
                       device: torch.device) -> dict:
    recipe_fields = {k: v for k, v in to_dict(recipe).items() if k not in _NOT_IN_FINGERPRINT}
    return {"recipe": recipe_fields, "rtn": rtn, "block_map": asdict(block_map), "batch_size": batch,
            "activation_dtype": settings.activation_dtype, "forward_dtype": settings.forward_dtype,
            "device": device.type, "torch": torch.__version__}


def _make_plan(model: nn.Module, layers: nn.Module, block_map: BlockMap, tokens: torch.Tensor, recipe,
               settings: MemorySettings, device: torch.device, rtn: bool) -> dict | None:
    """The memory plan of this run from the model's config, with the process's measured baseline."""
    config = getattr(model, "config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else None
    if not config:
        return None
    unique = {id(p): p for p in model.parameters()}.values()
    weights = sum(p.numel() * p.element_size() for p in unique)
    first = get_submodule(layers[0], block_map.linears[0]).weight
    wdtype = {dt: name for name, dt in DTYPES.items()}.get(first.dtype, "float32")
    try:
        return plan_memory(config, tokens.shape[0], tokens.shape[1], settings, recipe.bits, recipe.group_size,
                           str(device), weights_dtype=wdtype, true_sequential=recipe.true_sequential, rtn=rtn,
                           baseline_bytes=max(0, rss_bytes() - weights))
    except QuantlmError:
        if block_map.layers_path == "model.layers":  # a LLaMA-like config is expected to plan
            raise
        return None


@torch.no_grad()
def quantize_blocks(model: nn.Module, block_map: BlockMap, tokens: torch.Tensor, recipe: GPTQSettings, *,
                    device: str | torch.device = "cpu", rtn: bool = False, batch_size: int | None = None,
                    offload: bool | None = None, replay_cache_gb: float | None = None,
                    progress: bool = True, memory: MemorySettings | None = None) -> PipelineResult:
    """Quantize every block linear of ``model`` in place (weights replaced by their dequantized values, or
    released with ``memory.keep_weights`` off).

    ``tokens``: ``[nsamples, seqlen]`` calibration windows. ``rtn``: round to nearest instead of GPTQ (the
    Hessians are still collected, to report the same reconstruction error). ``memory``: where the hidden
    states live, their dtype, the forward dtype, batch size, replay cache (``MemorySettings``; default:
    planned automatically). The older keywords override it when given: ``batch_size``, ``offload``
    (True: hidden states in host memory; False: on the compute device), ``replay_cache_gb``. A plan that
    does not fit raises ``QuantlmError`` before any compute. Returns the per-module results and reports,
    the plan and the measured peak memory; ``model`` ends on the CPU.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QuantlmError("--device cuda requested but no CUDA GPU is visible; use --device cpu")
    settings = _settings(memory, batch_size, offload, replay_cache_gb)
    check_quantizable(model, block_map, recipe)
    model.eval()
    t_start = time.perf_counter()
    layers = get_submodule(model, block_map.layers_path)
    plan = _make_plan(model, layers, block_map, tokens, recipe, settings, device, rtn)
    if plan is not None:
        check_plan(plan)
        if plan.get("warning"):
            log.warning(plan["warning"])
        log.info("memory plan: hidden states on %s (%s, batch %d), predicted peak %.2f GB of %.2f GB available",
                 plan["hidden_states"], plan["activation_dtype"], plan["batch_size"],
                 plan["predicted_peak_bytes"] / 1e9, plan["available_bytes"] / 1e9)
        where, bs, cache_bytes = plan["hidden_states"], plan["batch_size"], plan["replay_cache_bytes"]
        trim, heap = plan["trim_allocator"], plan.get("large_tensors_in_heap", False)
    else:
        trim = heap = False
        where = {"auto": "device" if device.type == "cuda" else "host", "none": "device"}.get(
            settings.offload, settings.offload)
        bs = settings.batch_size or 8
        cache = settings.replay_cache_gb if settings.replay_cache_gb >= 0 else (4.0 if device.type == "cpu" else 0)
        cache_bytes = int(cache * 2**30)
    if where == "device" and device.type == "cpu":
        where = "host"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with PeakSampler() as sampler, large_tensors_in_heap() if heap else contextlib.nullcontext():
        results, reports, resumed = _run_blocks(model, layers, block_map, tokens, recipe, settings, device, rtn,
                                                where, bs, cache_bytes, progress, trim)
    measured = {"measured_peak_bytes": peak_rss_bytes(), "pipeline_peak_bytes": sampler.peak_bytes,
                "rss_at_start_bytes": sampler.rss_before, "resumed_from_block": resumed,
                "hidden_states": where, "batch_size": bs}
    if device.type == "cuda":
        measured["device_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return PipelineResult(results, reports, time.perf_counter() - t_start, plan, measured)


def _run_blocks(model, layers, block_map, tokens, recipe, settings, device, rtn, where, bs, cache_bytes,
                progress, trim):
    fwd = DTYPES[settings.forward_dtype]
    storage = DTYPES[settings.activation_dtype]
    nsamples, seqlen = tokens.shape
    batches = batches_of(nsamples, bs)
    width = get_submodule(layers[0], block_map.linears[0]).weight.shape[1]
    # replay records stay where they are computed on a GPU (the plan sizes the cache from its free memory)
    replay_on = device if device.type == "cuda" else torch.device("cpu")

    state = None
    if where == "disk":
        fingerprint = run_fingerprint(model, tokens, _fingerprint_extra(recipe, block_map, rtn, settings, bs, device))
        folder = Path(settings.offload_dir) if settings.offload_dir else default_offload_dir(fingerprint)
        state = RunState.open(folder, fingerprint, settings.resume)

    opened: list[HiddenStates] = []

    def store(name: str | None, create: bool = True) -> HiddenStates:
        closed = next((h for h in opened if h.reusable), None)
        hs = HiddenStates(batches, seqlen, width, storage, where=where, device=device, dtype=fwd,
                          path=state.dir / name if state is not None else None, create=create, reuse=closed)
        opened.append(hs)
        return hs

    results: dict[str, GPTQResult] = {}
    reports: list[ModuleReport] = []
    tails: dict[str, str] = {}  # submodule -> the linear it ends in, learned by the passes of earlier blocks
    start = 0
    if state is not None and state.started:  # resume: earlier blocks from their saved results
        start, tails = state.next_block, dict(state.tails)
        for i in range(start):
            block_results, block_reports = state.load_block(i)
            block = layers[i]
            for name, res in block_results.items():
                lin = get_submodule(model, name)
                if settings.keep_weights:
                    lin.weight.data.copy_(res.dequantize().to(lin.weight.dtype))
                else:
                    _release(lin)
                results[name] = res
            reports += [ModuleReport(**{**r, "shape": tuple(r["shape"])}) for r in block_reports]
            del block
        log.info("resuming a disk-offloaded run at block %d of %d (%s)", start, len(layers), state.dir)
        hidden = store(state.inputs, create=False)
        kwargs_by_size = _block_kwargs(model, block_map, tokens, batches, device)
    else:
        hidden = store(state.inputs if state is not None else None)
        _, kwargs_by_size = capture_block_inputs(model, block_map, tokens, bs, device, store=hidden)
        hidden.flush()
        if state is not None:
            state.mark_started()
    kwargs_by_size = {b: _cast_floats(to_device(kw, device), fwd) for b, kw in kwargs_by_size.items()}
    ntokens = tokens.numel()
    tf32 = recipe.hessian_tf32
    try:
        _blocks_from(start, layers, block_map, recipe, device, rtn, fwd, hidden, kwargs_by_size, tails, store, state,
                     replay_on, cache_bytes, tf32, ntokens, progress, results, reports, settings.keep_weights,
                     release_free_memory if trim else _keep_free_memory)
    except BaseException:
        if state is not None:
            log.warning("the disk-offloaded run stopped; its state is kept in %s: run again to resume", state.dir)
        raise
    finally:
        for hs in opened:
            hs.close()
    if state is not None:
        state.remove()
    return results, reports, start


def _blocks_from(start, layers, block_map, recipe, device, rtn, fwd, hidden, kwargs_by_size, tails, store, state,
                 replay_on, cache_bytes, tf32, ntokens, progress, results, reports, keep_weights, trim) -> None:
    """Quantize blocks ``start``.. in order (``hidden``: the inputs of block ``start``), filling ``results``
    and ``reports``; each block's outputs become the next block's inputs. ``trim()`` after each group and
    block: hands freed memory back to the OS, or not (the plan's ``trim_allocator``: near the memory limit, or
    with large tensors in the heap)."""
    method = "rtn" if rtn else "gptq"
    for i in range(start, len(layers)):
        block, t_block = layers[i], time.perf_counter()
        bar = tqdm(total=len(block_map.linears), desc=f"{method} block {i + 1}/{len(layers)}",
                   disable=not progress, leave=False)
        outputs = store(state.other if state is not None else None)
        block_results: dict[str, GPTQResult] = {}
        block_reports: list[ModuleReport] = []
        with _block_on(block, device, fwd, block_map.linears) as masters:
            passes = BlockPasses(block, block_map.linears, hidden, kwargs_by_size, device, replay_on,
                                 cache_bytes, tails)
            firsts = [get_submodule(block, group[0]) for group in block_map.sequential]

            def accumulator(lin):
                return HessianAccumulator(lin.weight.shape[1], device, allow_tf32=tf32)

            with onednn_linears(block, enabled=device.type == "cpu"):
                accs = [accumulator(lin) for lin in firsts] if not recipe.true_sequential else []
                if accs:  # every group's Hessian from the unquantized block, one pass
                    passes.collect(firsts, [acc.add for acc in accs], stop=False)
                for k, group in enumerate(block_map.sequential):
                    if recipe.true_sequential:  # up to this group's input, earlier groups already quantized
                        acc = accumulator(firsts[k])
                        passes.collect([firsts[k]], [acc.add], stop=True)
                    else:
                        acc, accs[k] = accs[k], None
                    H = acc.take()  # the accumulator's memory becomes H: one [in, in] matrix per group
                    del acc
                    names = [f"{block_map.layers_path}.{i}.{name}" for name in group]
                    linears = [get_submodule(block, name) for name in group]
                    Ws = [masters[name] for name in group]
                    for res, report in _quantize_group(names, linears, Ws, H, recipe, rtn, device, ntokens):
                        block_results[report.name] = res
                        block_reports.append(report)
                        bar.update(1)
                    del H
                    trim()  # the pass's and solve's temporaries, trapped between records
                    _maybe_crash(i, k)
                passes.outputs(sink=outputs.write)
                tails = passes.tails
            del passes
        outputs.flush()
        bar.close()
        hidden.close(keep_buffer=i + 1 < len(layers))  # this block's inputs: the next block's outputs go there
        hidden = outputs
        if not keep_weights:
            for name in block_map.linears:
                _release(get_submodule(block, name))
        results.update(block_results)
        reports += block_reports
        if state is not None:
            state.block_done(i, block_results, [r.to_dict() for r in block_reports], tails)
        log.info("%s block %d/%d done in %.1f s (error %.4g; peak RSS so far %.2f GB)", method, i + 1, len(layers),
                 time.perf_counter() - t_block, sum(r.error for r in block_reports), peak_rss_bytes() / 1e9)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        trim()  # this block's freed temporaries, trapped between its results
