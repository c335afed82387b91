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
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from quantlm.errors import QuantlmError
from quantlm.gptq.block_passes import BlockPasses, StopForward, to_device
from quantlm.gptq.cpu_linear import onednn_linears
from quantlm.gptq.hessian import HessianAccumulator
from quantlm.gptq.settings import GPTQSettings
from quantlm.gptq.solver import GPTQResult, gptq_quantize_shared, reconstruction_error, rtn_quantize
from quantlm.models.blocks import BlockMap

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
            if recipe.group_size != -1 and in_features % recipe.group_size:
                raise QuantlmError(
                    f"group size {recipe.group_size} does not divide the input width {in_features} of {full}; "
                    "choose a divisor of every layer's input width or --group-size -1 (per channel)")
            if not torch.isfinite(lin.weight).all():
                raise QuantlmError(f"{full}.weight contains NaN or Inf values; quantize a finite checkpoint")


def _move_outside_blocks(model: nn.Module, layers: nn.Module, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside the decoder blocks (embeddings, rotary, norm)."""
    inside = {id(m) for m in layers.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for p in module._parameters.values():
            if p is not None and p.device != device:
                p.data = p.data.to(device)  # in place, so tied parameters (embedding = head) stay one object
        for key, b in module._buffers.items():
            if b is not None and b.device != device:
                module._buffers[key] = b.to(device)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block_map: BlockMap, tokens: torch.Tensor, batch_size: int,
                         device: torch.device) -> tuple[list[torch.Tensor], dict[int, dict]]:
    """Hidden states entering the first block, per batch, and the block's keyword arguments per batch size."""
    layers = get_submodule(model, block_map.layers_path)
    first = layers[0]
    captured: dict = {}

    def hook(_module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise StopForward

    _move_outside_blocks(model, layers, device)
    first.to(device)  # some models check the first block's device; it is moved back below
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    hidden: list[torch.Tensor] = []
    kwargs_by_size: dict[int, dict] = {}
    try:
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start : start + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except StopForward:
                pass
            hidden.append(captured["hidden"].float())
            kwargs_by_size.setdefault(batch.shape[0], captured["kwargs"])
    finally:
        handle.remove()
        first.to("cpu")
        _move_outside_blocks(model, layers, torch.device("cpu"))
    for kw in kwargs_by_size.values():
        kw["use_cache"] = False
        kw.pop("past_key_values", None)
        kw.pop("past_key_value", None)
    return hidden, kwargs_by_size


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


def _quantize_group(names: list[str], linears: list[nn.Module], H: torch.Tensor, recipe: GPTQSettings, rtn: bool,
                    device: torch.device, ntokens: int) -> list[tuple[GPTQResult, ModuleReport]]:
    """Quantize the linears of one group (sharing the Hessian ``H``) and write the dequantized weights back."""
    Ws = [lin.weight.data.float() for lin in linears]
    t0 = time.perf_counter()
    with _solver_threads(device):
        if rtn:
            group_results = [rtn_quantize(W, bits=recipe.bits, group_size=recipe.group_size, sym=recipe.sym,
                                          grid=recipe.grid_spec()) for W in Ws]
        else:  # the linears of a group share H: one solve over their stacked rows
            group_results = gptq_quantize_shared(
                Ws, H, names=names, bits=recipe.bits, group_size=recipe.group_size, sym=recipe.sym,
                act_order=recipe.act_order, static_groups=recipe.static_groups, damp=recipe.damp,
                block_size=recipe.block_size, grid=recipe.grid_spec())
    seconds = time.perf_counter() - t0
    rows = sum(W.shape[0] for W in Ws)
    out = []
    for full, lin, W, res in zip(names, linears, Ws, group_results, strict=True):
        Q = res.dequantize().to(W.device)
        err = float(reconstruction_error(W, Q, H))  # before the copy: W may be the weight tensor itself
        lin.weight.data.copy_(Q.to(lin.weight.dtype))
        # a shared solve's time is split over the group's layers by their share of rows
        report = ModuleReport(full, tuple(W.shape), float(res.loss), err, float(res.damp),
                              seconds * W.shape[0] / rows, ntokens)
        log.debug("%s: loss %.4g error %.4g damp %.3g", full, res.loss, err, res.damp)
        out.append((res.to("cpu"), report))  # codes leave the device with their block
    return out


@torch.no_grad()
def quantize_blocks(model: nn.Module, block_map: BlockMap, tokens: torch.Tensor, recipe: GPTQSettings, *,
                    device: str | torch.device = "cpu", rtn: bool = False, batch_size: int = 8,
                    offload: bool | None = None, replay_cache_gb: float | None = None,
                    progress: bool = True) -> PipelineResult:
    """Quantize every block linear of ``model`` in place (weights replaced by their dequantized values).

    ``tokens``: ``[nsamples, seqlen]`` calibration windows. ``rtn``: round to nearest instead of GPTQ (the
    Hessians are still collected, to report the same reconstruction error). ``offload``: keep the hidden
    states on the CPU between blocks (default: when the compute device is not the CPU).
    ``replay_cache_gb``: memory (on the device holding the hidden states) for submodule outputs replayed
    between a block's true-sequential passes (default 4 on the CPU; 0 on a GPU, where recomputing is
    cheaper than moving them; 0 recomputes). Returns the per-module results and reports; ``model`` ends
    on the CPU.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QuantlmError("--device cuda requested but no CUDA GPU is visible; use --device cpu")
    keep_on = torch.device("cpu") if (offload if offload is not None else device.type != "cpu") else device
    if replay_cache_gb is None:
        replay_cache_gb = 4.0 if device.type == "cpu" else 0.0
    check_quantizable(model, block_map, recipe)
    model.eval()
    t_start = time.perf_counter()
    hidden, kwargs_by_size = capture_block_inputs(model, block_map, tokens, batch_size, device)
    hidden = [h.to(keep_on) for h in hidden]
    kwargs_by_size = {b: to_device(kw, device) for b, kw in kwargs_by_size.items()}
    ntokens = tokens.numel()
    layers = get_submodule(model, block_map.layers_path)
    results: dict[str, GPTQResult] = {}
    reports: list[ModuleReport] = []
    method = "rtn" if rtn else "gptq"
    tails: dict[str, str] = {}  # submodule -> the linear it ends in, learned by the passes of earlier blocks
    for i, block in enumerate(layers):
        block.to(device)
        bar = tqdm(total=len(block_map.linears), desc=f"{method} block {i + 1}/{len(layers)}",
                   disable=not progress, leave=False)
        passes = BlockPasses(block, block_map.linears, hidden, kwargs_by_size, device, keep_on,
                             int(replay_cache_gb * 2**30), tails)
        firsts = [get_submodule(block, group[0]) for group in block_map.sequential]
        accs = [HessianAccumulator(lin.weight.shape[1], device) for lin in firsts]
        with onednn_linears(block, enabled=device.type == "cpu"):
            if not recipe.true_sequential:  # every group's Hessian from the unquantized block, one pass
                passes.collect(firsts, [acc.add for acc in accs], stop=False)
            for k, group in enumerate(block_map.sequential):
                if recipe.true_sequential:  # up to this group's input, earlier groups already quantized
                    passes.collect([firsts[k]], [accs[k].add], stop=True)
                names = [f"{block_map.layers_path}.{i}.{name}" for name in group]
                linears = [get_submodule(block, name) for name in group]
                for res, report in _quantize_group(names, linears, accs[k].H, recipe, rtn, device, ntokens):
                    results[report.name] = res
                    reports.append(report)
                    bar.update(1)
                accs[k] = None  # free the Hessian
            hidden = passes.outputs()
            tails = passes.tails
        bar.close()
        block.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return PipelineResult(results, reports, time.perf_counter() - t_start)
