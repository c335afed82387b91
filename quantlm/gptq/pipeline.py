"""Layer-sequential GPTQ over a Hugging Face causal LM whose blocks a ``BlockMap`` describes.

1. Run the calibration windows through the model up to the first block and keep its inputs (hidden
   states plus the keyword arguments the block is called with: rotary position embeddings, mask, ...).
2. Per block (``BlockLoop``), on the compute device: first the recipe's block transforms (``methods``), then for
   each sequential group (LLaMA: [q,k,v] -> [o] -> [gate,up] -> [down]) run the block forward just far enough
   to see the group's input (the forward stops there), with the earlier groups already quantized in place
   (true-sequential), accumulate one Hessian for the group, then call the recipe's quantizer on its linears.
   Finally recompute the block's outputs with all its weights quantized: they are the next block's inputs. Each pass replays the outputs of the submodules an earlier pass
   already finished (``block_passes``), so a block costs about one forward, not ~2.7 (the first block
   about one forward plus one attention, while the passes learn where submodules end in a linear).
Only one block is on the compute device at a time; the rest of the model stays on the CPU. On the CPU the
block linears and Hessian products run through oneDNN (``cpu_linear``) and the solves on one thread.

Memory (``memory.MemorySettings``): a plan is made and checked before any compute (``memory.plan_memory``:
it fails with the numbers and the fixes when the run would not fit); the hidden states between blocks
live on the device, in (pinned) host memory or on disk, in fp32, bf16 or fp16, kept by one ``Residency``;
the block forwards may run in bf16 while the Hessians and solves stay fp32 (an fp32 master copy of each
block linear gives the solver its weights). A disk-offloaded run is resumable at block granularity (the
residency's ``offload.RunState``). The result carries the plan, the transforms' records and the measured peak.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from quantlm.architectures import ARCHITECTURES, BlockMap
from quantlm.dtypes import TORCH_FLOATS, float_name
from quantlm.errors import QuantlmError
from quantlm.gptq.allocator import large_tensors_in_heap
from quantlm.gptq.block_passes import BlockPasses, StopForward, map_tensors, to_device
from quantlm.gptq.cpu_linear import onednn_linears
from quantlm.gptq.hessian import HessianAccumulator, tf32_matmul
from quantlm.gptq.memory import (
    MemorySettings,
    PeakSampler,
    check_plan,
    default_offload_dir,
    disk_free_bytes,
    peak_rss_bytes,
    plan_memory,
    rss_bytes,
)
from quantlm.gptq.methods import get_quantizer, get_transform
from quantlm.gptq.offload import HiddenStates, RunState, reusable_bytes, run_fingerprint
from quantlm.gptq.residency import Placement, Residency
from quantlm.gptq.settings import GPTQSettings
from quantlm.gptq.solver import GPTQResult, reconstruction_error
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
    # this call (see memory.PeakSampler); device_peak_bytes: torch.cuda.max_memory_allocated (GPU runs),
    # device_reserved_peak_bytes: torch.cuda.max_memory_reserved (what the caching allocator held); block_seconds:
    # each computed block's wall time;
    # resumed_from_block: the block a disk-offloaded run restarted at (0: from the start)
    measured: dict = field(default_factory=dict)
    transforms: list[dict] = field(default_factory=list)  # the block transforms' records, in block order

    @property
    def measured_peak_bytes(self) -> int | None:
        return self.measured.get("measured_peak_bytes")

    def memory_report(self) -> dict:
        """What report.json records: the plan and what was measured next to it."""
        return {"plan": self.plan, **self.measured}


def check_quantizable(model: nn.Module, block_map: BlockMap, recipe: GPTQSettings, finite: bool = True) -> None:
    """Fail fast, before any compute, on settings the model cannot take (group size; NaN/Inf weights unless the
    caller already checked them, ``finite`` False)."""
    layers = model.get_submodule(block_map.layers_path)
    for i, block in enumerate(layers):
        for name in block_map.linears:
            lin = block.get_submodule(name)
            full = f"{block_map.layers_path}.{i}.{name}"
            in_features = lin.weight.shape[1]
            check_group_size(recipe.group_size, in_features, full)
            if finite and not torch.isfinite(lin.weight).all():
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


class _LayerStub(nn.Module):
    """Stands in for decoder layer ``index`` during the capture: records the keyword arguments the model gives it
    (masks and rotary embeddings differ per layer in sliding-window families) and passes the hidden states through
    without computing; the first also records them, the last stops the forward. Attribute reads the model's loop
    makes (``attention_type``) go to the real layer."""

    def __init__(self, layer: nn.Module, index: int, last: bool, sink: dict):
        super().__init__()
        self.layer, self.index, self.last, self.sink = layer, index, last, sink

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if self.index == 0:
            self.sink["hidden"] = hidden
        self.sink.setdefault("kwargs", []).append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        if self.last:
            raise StopForward
        return hidden


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block_map: BlockMap, tokens: torch.Tensor, batch_size: int,
                         device: torch.device, store: HiddenStates | None = None
                         ) -> tuple[list[torch.Tensor], dict[int, list[dict]]]:
    """Hidden states entering the first block, per batch, and every block's keyword arguments per batch size
    (a list, one per block; tensors the blocks share, like one mask, stay one tensor).

    Without ``store`` the hidden states are returned (fp32, a list of batches); with it each batch is
    written to ``store`` as it is computed and the list is empty. No block computes: each is replaced by a stub
    that records its inputs while the model's own forward runs its embedding, masks and rotary embeddings.
    """
    layers = model.get_submodule(block_map.layers_path)
    real = list(layers)
    hidden: list[torch.Tensor] = []
    kwargs_by_size: dict[int, list[dict]] = {}
    with _outside_blocks_on(model, layers, device):
        real[0].to(device)  # some models check the first block's device; it is moved back below
        captured: dict = {}
        for i, layer in enumerate(real):
            layers[i] = _LayerStub(layer, i, i == len(real) - 1, captured)
        try:
            for b, start in enumerate(range(0, tokens.shape[0], batch_size)):
                batch = tokens[start : start + batch_size].to(device)
                captured.clear()
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
            for i, layer in enumerate(real):
                layers[i] = layer
            real[0].to("cpu")
    for per_block in kwargs_by_size.values():
        for kw in per_block:
            kw["use_cache"] = False
            for key in ("past_key_values", "past_key_value", "cache"):  # no KV cache across calibration batches
                kw.pop(key, None)
    return hidden, kwargs_by_size


def _prepare_kwargs(kwargs_by_size: dict[int, list[dict]], device: torch.device, dtype: torch.dtype
                    ) -> dict[int, list[dict]]:
    """Every block's keyword arguments on ``device`` with floats in ``dtype``; a tensor shared by several blocks
    (one mask, one rotary table) is moved once and stays shared."""
    done: dict[int, torch.Tensor] = {}

    def move(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in done:
            done[id(t)] = to_device(t, device).to(dtype) if t.is_floating_point() else to_device(t, device)
        return done[id(t)]

    return {b: [map_tensors(kw, move) for kw in per_block] for b, per_block in kwargs_by_size.items()}


def _block_kwargs(model: nn.Module, block_map: BlockMap, tokens: torch.Tensor, batches: list[tuple[int, int]],
                  device: torch.device) -> dict[int, list[dict]]:
    """Every block's keyword arguments per batch size, from one batch of each size (resume)."""
    kwargs: dict[int, list[dict]] = {}
    for s, e in batches:
        if e - s not in kwargs:
            _, kw = capture_block_inputs(model, block_map, tokens[s:e], e - s, device)
            kwargs.update(kw)
    return kwargs


def _clock(device: torch.device) -> float:
    """Wall time once the device has finished what is queued on it (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@contextlib.contextmanager
def _solver_context(device: torch.device):
    """The solves in full fp32 (never TF32 or bf16 matmuls, whatever the caller set globally: the error updates
    and the inverse Hessian need it), on one CPU thread: their per-column steps are tiny ops that a second thread
    only slows down (10x on a busy 2-core machine, bench/solver.md), and one thread makes the codes independent of
    the thread count. Restores the caller's settings."""
    with tf32_matmul(False):
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
        masters = {n: block.get_submodule(n).weight.data for n in linear_names}
    else:  # fp32 masters (the stored tensors themselves when fp32), then the forward copies
        masters = {n: block.get_submodule(n).weight.data.float() for n in linear_names}
        block.to(dtype)
    try:
        yield masters
    finally:
        for name, p in block.named_parameters():
            if p.data is not saved[name]:
                p.data = saved[name]
        for n in linear_names:
            w = block.get_submodule(n).weight.data
            if w is not masters[n]:
                w.copy_(masters[n])
        block.to("cpu")


def _release(linear: nn.Module) -> None:
    """Drop a quantized linear's weight (``MemorySettings.keep_weights`` off): an empty tensor of its dtype."""
    linear.weight.data = torch.empty(0, dtype=linear.weight.dtype)


def _fingerprint_extra(recipe: GPTQSettings, block_map: BlockMap, placement: Placement, device: torch.device) -> dict:
    return {"recipe": to_dict(recipe), "block_map": asdict(block_map), "batch_size": placement.batch_size,
            "activation_dtype": placement.storage_dtype, "forward_dtype": placement.forward_dtype,
            "device": device.type, "torch": torch.__version__}


def _placement(plan: dict | None, settings: MemorySettings, device: torch.device) -> Placement:
    """The plan's decisions (or, with no plan, the settings' own with the defaults filled in)."""
    keep = settings.keep_weights
    if plan is not None:
        where, bs, cache = plan["hidden_states"], plan["batch_size"], plan["replay_cache_bytes"]
        trim, heap = plan["trim_allocator"], plan.get("large_tensors_in_heap", False)
        keep = plan.get("keep_weights", keep)
    else:
        trim = heap = False
        where = {"auto": "device" if device.type == "cuda" else "host", "none": "device"}.get(
            settings.offload, settings.offload)
        bs = settings.batch_size or 8
        gb = settings.replay_cache_gb if settings.replay_cache_gb >= 0 else (4.0 if device.type == "cpu" else 0)
        cache = int(gb * 2**30)
    if where == "device" and device.type == "cpu":
        where = "host"
    return Placement(where, bs, settings.storage_dtype, settings.forward_dtype, cache, trim, heap, keep)


class BlockLoop:
    """Quantizes the decoder blocks of one model in order: per block, the recipe's transforms, then per
    sequential group one Hessian and one call of the recipe's quantizer; each block's outputs (computed with its
    quantized weights) are the next block's inputs, kept by a :class:`Residency`."""

    def __init__(self, model: nn.Module, block_map: BlockMap, tokens: torch.Tensor, recipe: GPTQSettings,
                 residency: Residency, device: torch.device, *, progress: bool = True):
        self.model, self.block_map, self.tokens, self.recipe = model, block_map, tokens, recipe
        self.residency, self.device, self.progress = residency, device, progress
        self.keep_weights = residency.placement.keep_weights
        self.layers = model.get_submodule(block_map.layers_path)
        self.quantizer = get_quantizer(recipe.method)
        self.transforms = [get_transform(name) for name in recipe.transforms]
        self.forward_dtype = TORCH_FLOATS[residency.placement.forward_dtype]
        # replay records stay where they are computed on a GPU (the plan sizes the cache from its free memory)
        self.replay_on = device if device.type == "cuda" else torch.device("cpu")
        self.ntokens = tokens.numel()
        self.results: dict[str, GPTQResult] = {}
        self.reports: list[ModuleReport] = []
        self.transform_records: list[dict] = []
        self.tails: dict[str, str] = {}  # submodule -> the linear it ends in, learned by earlier blocks' passes
        self.start = 0
        self.block_seconds: list[float] = []  # wall time of each block this run computed (device synchronized)

    def run(self) -> None:
        succeeded = False
        try:
            hidden, kwargs_by_size = self._inputs()
            for i in range(self.start, len(self.layers)):
                hidden = self._block(i, hidden, kwargs_by_size)
            succeeded = True
        except OSError as e:
            folder = self.residency.folder
            if e.errno not in (errno.ENOSPC, errno.EDQUOT) or folder is None:
                raise
            raise QuantlmError(f"the disk holding {folder} is full ({e.strerror}); the {self.residency.resume_block} "
                               "finished blocks are kept there: free space and run the same command again to resume "
                               "at the next block") from None
        finally:
            self.residency.close(succeeded=succeeded)

    # -- the first block's inputs, or a resumed run's restored blocks and saved inputs
    def _inputs(self):
        res = self.residency
        self.start = res.resume_block
        if self.start:
            self.tails = res.tails
            for i in range(self.start):
                self._restore(i)
            log.info("resuming a disk-offloaded run at block %d of %d (%s)", self.start, len(self.layers), res.folder)
            hidden = res.first_inputs()
            kwargs_by_size = _block_kwargs(self.model, self.block_map, self.tokens, res.batches, self.device)
        else:
            hidden = res.first_inputs()
            _, kwargs_by_size = capture_block_inputs(self.model, self.block_map, self.tokens,
                                                     res.placement.batch_size, self.device, store=hidden)
            hidden.flush()
            res.inputs_complete()
        return hidden, _prepare_kwargs(kwargs_by_size, self.device, self.forward_dtype)

    def _restore(self, i: int) -> None:
        """Block ``i`` of a resumed run as it was left: its transforms again, then its saved codes."""
        block = self.layers[i]
        self._transform(i, block)
        block_results, block_reports = self.residency.load_block(i)
        for name, res in block_results.items():
            lin = self.model.get_submodule(name)
            if self.keep_weights:
                lin.weight.data.copy_(res.dequantize().to(lin.weight.dtype))
            else:
                _release(lin)
            self.results[name] = res
        self.reports += [ModuleReport(**{**r, "shape": tuple(r["shape"])}) for r in block_reports]

    def _transform(self, i: int, block: nn.Module) -> None:
        for t in self.transforms:
            record = t.apply(block, self.block_map, i)
            if record is not None:
                self.transform_records.append({"transform": t.name, "block": i, **record})

    # -- one block
    def _block(self, i: int, hidden: HiddenStates, kwargs_by_size: dict) -> HiddenStates:
        bm, block, t_block = self.block_map, self.layers[i], _clock(self.device)
        bar = tqdm(total=len(bm.linears), desc=f"{self.quantizer.name} block {i + 1}/{len(self.layers)}",
                   disable=not self.progress, leave=False)
        self._transform(i, block)
        outputs = self.residency.outputs()
        block_results: dict[str, GPTQResult] = {}
        block_reports: list[ModuleReport] = []
        with _block_on(block, self.device, self.forward_dtype, bm.linears) as masters:
            passes = BlockPasses(block, bm.linears, hidden, {b: kw[i] for b, kw in kwargs_by_size.items()},
                                 self.device, self.replay_on,
                                 self.residency.placement.replay_cache_bytes, self.tails)
            with onednn_linears(block, enabled=self.device.type == "cpu"):
                for group, H in self._hessians(block, passes):
                    names = [f"{bm.layers_path}.{i}.{name}" for name in group]
                    linears = [block.get_submodule(name) for name in group]
                    for res, report in self._quantize_group(names, linears, [masters[n] for n in group], H):
                        block_results[report.name] = res
                        block_reports.append(report)
                        bar.update(1)
                    del H
                    self.residency.trim()  # the pass's and solve's temporaries, trapped between records
                passes.outputs(sink=outputs.write)
                self.tails = passes.tails
            del passes
        outputs.flush()
        bar.close()
        hidden.close(keep_buffer=i + 1 < len(self.layers))  # this block's inputs: the next block's outputs go there
        if not self.keep_weights:
            for name in bm.linears:
                _release(block.get_submodule(name))
        self.results.update(block_results)
        self.reports += block_reports
        self.residency.block_done(i, block_results, [r.to_dict() for r in block_reports], self.tails)
        self.block_seconds.append(_clock(self.device) - t_block)
        log.info("%s block %d/%d done in %.1f s (error %.4g; peak RSS so far %.2f GB)", self.quantizer.name, i + 1,
                 len(self.layers), self.block_seconds[-1], sum(r.error for r in block_reports),
                 peak_rss_bytes() / 1e9)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.residency.trim()  # this block's freed temporaries, trapped between its results
        return outputs

    def _hessians(self, block: nn.Module, passes: BlockPasses):
        """(group, H) per sequential group: with true-sequential, each H from a pass up to the group's input with
        the earlier groups already quantized; without, every H from one pass over the unquantized block."""
        firsts = [block.get_submodule(group[0]) for group in self.block_map.sequential]

        def accumulator(lin):
            return HessianAccumulator(lin.weight.shape[1], self.device, allow_tf32=self.recipe.hessian_tf32)

        accs = [accumulator(lin) for lin in firsts] if not self.recipe.true_sequential else []
        if accs:
            passes.collect(firsts, [acc.add for acc in accs], stop=False)
        for k, group in enumerate(self.block_map.sequential):
            if self.recipe.true_sequential:
                acc = accumulator(firsts[k])
                passes.collect([firsts[k]], [acc.add], stop=True)
            else:
                acc, accs[k] = accs[k], None
            H = acc.take()  # the accumulator's memory becomes H: one [in, in] matrix per group
            del acc
            yield group, H

    def _quantize_group(self, names: list[str], linears: list[nn.Module], Ws: list[torch.Tensor], H: torch.Tensor
                        ) -> list[tuple[GPTQResult, ModuleReport]]:
        """The quantizer on one group's fp32 master weights ``Ws`` (sharing ``H``); the dequantized weights are
        written back to the masters and to the linears (forward copies)."""
        t0 = _clock(self.device)  # after the queued forward and Hessian kernels: they are not the solve's time
        with _solver_context(self.device):
            group_results = self.quantizer.solve(Ws, H, self.recipe, names)
        if len(group_results) != len(Ws):
            raise QuantlmError(f"quantizer {self.quantizer.name!r} returned {len(group_results)} results for "
                               f"{len(Ws)} layers ({', '.join(names)}); it must return one per layer")
        seconds = _clock(self.device) - t0
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
                                  seconds * W.shape[0] / rows, self.ntokens)
            log.debug("%s: loss %.4g error %.4g damp %.3g", full, res.loss, err, res.damp)
            out.append((res.to("cpu"), report))  # codes leave the device with their block
        return out


def _first_linear(model: nn.Module, block_map: BlockMap) -> nn.Module:
    return model.get_submodule(block_map.layers_path)[0].get_submodule(block_map.linears[0])


def _make_plan(model: nn.Module, block_map: BlockMap, tokens: torch.Tensor, recipe: GPTQSettings,
               settings: MemorySettings, device: torch.device, folder: Path) -> dict | None:
    """The memory plan of this run from the model's config, with the process's measured baseline. A state an
    earlier run left in the offload ``folder`` counts as free disk (it is resumed or replaced)."""
    config = getattr(model, "config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else None
    if not config:
        return None
    unique = {id(p): p for p in model.parameters()}.values()
    weights = sum(p.numel() * p.element_size() for p in unique)
    wdtype = float_name(_first_linear(model, block_map).weight.dtype)
    try:
        return plan_memory(config, tokens.shape[0], tokens.shape[1], settings, recipe.bits, recipe.group_size,
                           str(device), weights_dtype=wdtype, true_sequential=recipe.true_sequential,
                           rtn=not get_quantizer(recipe.method).uses_hessian,
                           baseline_bytes=max(0, rss_bytes() - weights), offload_dir=str(folder),
                           disk_available_bytes=offload_disk_available(folder))
    except QuantlmError:
        if config.get("model_type") in ARCHITECTURES:  # an architecture of the table is expected to plan
            raise
        return None  # a model the caller describes with its own block map: the settings as given


def offload_disk_available(folder: Path) -> int | None:
    """Bytes a disk-offloaded run may write in ``folder``: the disk's free space plus what an earlier run's state there
    holds (resumed or replaced); 0 for a folder that cannot be written, None where the disk cannot be asked."""
    free = disk_free_bytes(folder)
    if free is None or (folder.exists() and not os.access(folder, os.W_OK | os.X_OK)):
        return 0 if free is not None else None  # a folder that cannot be written has no room
    return free + reusable_bytes(folder)


def offload_folder(settings: MemorySettings, recipe: GPTQSettings, tokens: torch.Tensor, owner: str) -> Path:
    """Where a disk-offloaded run keeps its hidden states and resume state: ``--offload-dir``, else a folder per
    run keyed by the output it writes, the recipe and the calibration tokens (so two runs that differ only in their
    output never share a state)."""
    if settings.offload_dir:
        return Path(settings.offload_dir)
    h = hashlib.sha256(json.dumps([owner, to_dict(recipe)], sort_keys=True, default=str).encode())
    h.update(tokens.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return default_offload_dir(h.hexdigest())


@torch.no_grad()
def quantize_blocks(model: nn.Module, block_map: BlockMap, tokens: torch.Tensor, recipe: GPTQSettings, *,
                    device: str | torch.device = "cpu", progress: bool = True,
                    memory: MemorySettings | None = None, weights_checked: bool = False,
                    owner: str | os.PathLike = "") -> PipelineResult:
    """Quantize every block linear of ``model`` in place with the recipe's method (weights replaced by their
    dequantized values, or released with ``memory.keep_weights`` off).

    ``tokens``: ``[nsamples, seqlen]`` calibration windows. ``memory``: where the hidden states live, their
    dtype, the forward dtype, batch size, replay cache (``MemorySettings``; default: planned automatically). A
    plan that does not fit raises ``QuantlmError`` before any compute. ``weights_checked``: the caller has already
    refused NaN/Inf weights (``quantize_model`` checks the files before loading them). ``owner``: the output this
    run writes (``quantize_model`` passes its ``out_dir``); a disk-offloaded run's state belongs to it. Returns the per-module results and
    reports, the transforms' records, the plan and the measured peak memory; ``model`` ends on the CPU.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QuantlmError("--device cuda requested but no CUDA GPU is visible; use --device cpu")
    settings = memory or MemorySettings()
    check_quantizable(model, block_map, recipe, finite=not weights_checked)
    model.eval()
    t_start = time.perf_counter()
    owner = str(Path(owner).resolve()) if owner else ""
    folder = offload_folder(settings, recipe, tokens, owner)
    plan = _make_plan(model, block_map, tokens, recipe, settings, device, folder)
    if plan is not None:
        check_plan(plan)
        if plan.get("warning"):
            log.warning(plan["warning"])
        log.info("memory plan: hidden states on %s (%s, batch %d), predicted peak %.2f GB of %.2f GB available",
                 plan["hidden_states"], plan["activation_dtype"], plan["batch_size"],
                 plan["predicted_peak_bytes"] / 1e9, plan["available_bytes"] / 1e9)
    placement = _placement(plan, settings, device)
    state = None
    if placement.where == "disk":
        extra = {**_fingerprint_extra(recipe, block_map, placement, device), "owner": owner}
        state = RunState.open(folder, run_fingerprint(model, tokens, extra), settings.resume, owner)
    width = _first_linear(model, block_map).weight.shape[1]  # the hidden states' width
    residency = Residency(placement, tokens.shape[0], tokens.shape[1], width, device, state=state)
    loop = BlockLoop(model, block_map, tokens, recipe, residency, device, progress=progress)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    heap = large_tensors_in_heap() if placement.large_tensors_in_heap else contextlib.nullcontext()
    with PeakSampler() as sampler, heap:
        loop.run()
    measured = {"measured_peak_bytes": peak_rss_bytes(), "pipeline_peak_bytes": sampler.peak_bytes,
                "rss_at_start_bytes": sampler.rss_before, "resumed_from_block": loop.start,
                "hidden_states": placement.where, "batch_size": placement.batch_size,
                "activation_dtype": placement.storage_dtype, "keep_weights": placement.keep_weights,
                "block_seconds": loop.block_seconds}
    if device.type == "cuda":
        measured["device_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
        measured["device_reserved_peak_bytes"] = int(torch.cuda.max_memory_reserved(device))
    return PipelineResult(loop.results, loop.reports, time.perf_counter() - t_start, plan, measured,
                          loop.transform_records)
