"""Layer-sequential GPTQ over a Hugging Face causal LM whose blocks a ``BlockMap`` describes.

1. Run the calibration windows through the model up to the first block and keep its inputs (hidden
   states plus the keyword arguments the block is called with: rotary position embeddings, mask, ...).
2. Per block, on the compute device: for each sequential group (LLaMA: [q,k,v] -> [o] -> [gate,up] ->
   [down]) run the block forward just far enough to see the group's input (the forward stops there), with
   the earlier groups already quantized in place (true-sequential), accumulate one Hessian for the group,
   then quantize each of its linears. Finally recompute the block's outputs with all its weights quantized:
   they are the next block's inputs.
Only one block is on the compute device at a time; the rest of the model stays on the CPU.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from quantlm.errors import QuantlmError
from quantlm.gptq.hessian import HessianAccumulator
from quantlm.gptq.solver import GPTQResult, gptq_quantize_shared, reconstruction_error, rtn_quantize
from quantlm.models.blocks import BlockMap
from quantlm.recipes import QuantRecipe

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by a hook once it has what it needs, so the rest of the forward pass is skipped."""


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


def check_quantizable(model: nn.Module, block_map: BlockMap, recipe: QuantRecipe) -> None:
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


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


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
        raise _StopForward

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
            except _StopForward:
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


def _group_input_hessian(block: nn.Module, first_linear: nn.Module, hidden: list[torch.Tensor],
                         kwargs_by_size: dict[int, dict], device: torch.device) -> HessianAccumulator:
    """Run ``block`` on every batch up to ``first_linear`` and accumulate the Hessian of its input."""
    acc = HessianAccumulator(first_linear.weight.shape[1], device)

    def hook(_module, args):
        acc.add(args[0].float())
        raise _StopForward

    handle = first_linear.register_forward_pre_hook(hook)
    try:
        for h in hidden:
            try:
                block(h.to(device), **kwargs_by_size[h.shape[0]])
            except _StopForward:
                pass
    finally:
        handle.remove()
    return acc


def _all_group_hessians(block: nn.Module, block_map: BlockMap, hidden: list[torch.Tensor],
                        kwargs_by_size: dict[int, dict], device: torch.device) -> dict[str, HessianAccumulator]:
    """Without true-sequential: every group's Hessian from one forward pass of the unquantized block."""
    accs, handles = {}, []
    for group in block_map.sequential:
        lin = get_submodule(block, group[0])
        acc = accs[group[0]] = HessianAccumulator(lin.weight.shape[1], device)
        handles.append(lin.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0].float())))
    try:
        for h in hidden:
            block(h.to(device), **kwargs_by_size[h.shape[0]])
    finally:
        for handle in handles:
            handle.remove()
    return accs


def _block_outputs(block: nn.Module, hidden: list[torch.Tensor], kwargs_by_size: dict[int, dict],
                   device: torch.device, keep_on: torch.device) -> list[torch.Tensor]:
    outs = []
    for h in hidden:
        out = block(h.to(device), **kwargs_by_size[h.shape[0]])
        out = out[0] if isinstance(out, (tuple, list)) else out
        outs.append(out.float().to(keep_on))
    return outs


@torch.no_grad()
def quantize_blocks(model: nn.Module, block_map: BlockMap, tokens: torch.Tensor, recipe: QuantRecipe, *,
                    device: str | torch.device = "cpu", rtn: bool = False, batch_size: int = 8,
                    offload: bool | None = None, progress: bool = True) -> PipelineResult:
    """Quantize every block linear of ``model`` in place (weights replaced by their dequantized values).

    ``tokens``: ``[nsamples, seqlen]`` calibration windows. ``rtn``: round to nearest instead of GPTQ (the
    Hessians are still collected, to report the same reconstruction error). ``offload``: keep the hidden
    states on the CPU between blocks (default: when the compute device is not the CPU). Returns the
    per-module results and reports; ``model`` ends on the CPU.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QuantlmError("--device cuda requested but no CUDA GPU is visible; use --device cpu")
    keep_on = torch.device("cpu") if (offload if offload is not None else device.type != "cpu") else device
    check_quantizable(model, block_map, recipe)
    model.eval()
    t_start = time.perf_counter()
    hidden, kwargs_by_size = capture_block_inputs(model, block_map, tokens, batch_size, device)
    hidden = [h.to(keep_on) for h in hidden]
    kwargs_by_size = {b: _to_device(kw, device) for b, kw in kwargs_by_size.items()}
    ntokens = tokens.numel()
    layers = get_submodule(model, block_map.layers_path)
    results: dict[str, GPTQResult] = {}
    reports: list[ModuleReport] = []
    method = "rtn" if rtn else "gptq"
    for i, block in enumerate(layers):
        block.to(device)
        bar = tqdm(total=len(block_map.linears), desc=f"{method} block {i + 1}/{len(layers)}",
                   disable=not progress, leave=False)
        hessians = {} if recipe.true_sequential else _all_group_hessians(
            block, block_map, hidden, kwargs_by_size, device)
        for group in block_map.sequential:
            linears = [get_submodule(block, name) for name in group]
            acc = hessians.pop(group[0], None) or _group_input_hessian(
                block, linears[0], hidden, kwargs_by_size, device)
            H = acc.H
            names = [f"{block_map.layers_path}.{i}.{name}" for name in group]
            Ws = [lin.weight.data.float() for lin in linears]
            t0 = time.perf_counter()
            if rtn:
                group_results = [rtn_quantize(W, bits=recipe.bits, group_size=recipe.group_size, sym=recipe.sym,
                                              mse=recipe.mse_grid) for W in Ws]
            else:  # the linears of a group share H: one solve over their stacked rows
                group_results = gptq_quantize_shared(
                    Ws, H, names=names, bits=recipe.bits, group_size=recipe.group_size, sym=recipe.sym,
                    act_order=recipe.act_order, static_groups=recipe.static_groups, damp=recipe.damp,
                    block_size=recipe.block_size, mse=recipe.mse_grid)
            seconds = time.perf_counter() - t0
            rows = sum(W.shape[0] for W in Ws)
            for full, lin, W, res in zip(names, linears, Ws, group_results, strict=True):
                Q = res.dequantize().to(W.device)
                err = float(reconstruction_error(W, Q, H))
                lin.weight.data.copy_(Q.to(lin.weight.dtype))
                results[full] = res.to("cpu")  # codes leave the device with their block
                # a shared solve's time is split over the group's layers by their share of rows
                reports.append(ModuleReport(full, tuple(W.shape), float(res.loss), err, float(res.damp),
                                            seconds * W.shape[0] / rows, ntokens))
                log.debug("%s: loss %.4g error %.4g damp %.3g", full, res.loss, err, res.damp)
                bar.update(1)
            del acc, H
        hidden = _block_outputs(block, hidden, kwargs_by_size, device, keep_on)
        bar.close()
        block.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return PipelineResult(results, reports, time.perf_counter() - t_start)
