"""A reference GPTQ written from the paper (Frantar et al., "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", 2022/ICLR 2023), run the way the paper's code runs it: an eager loop
over layers, one Hessian per linear layer accumulated by forward hooks, one calibration sequence per forward,
the model in fp16. It is the yardstick quantlm's pipeline is timed against (bench/gpu_check.sh); it shares
no code with quantlm (not even the grid), so agreement in error is evidence, not tautology.

The algorithm (paper, Algorithm 1, with its three refinements):
- H = 2/n sum x x^T over the layer's calibration inputs; columns whose diagonal is 0 never fire: their
  weights are zeroed and their diagonal set to 1; lambda = percdamp * mean(diag H) is added to the diagonal;
- the inverse Hessian enters only through the upper Cholesky factor U of H^-1 (step 3 of the paper: "Cholesky
  reformulation"), computed as chol(H) -> H^-1 -> upper chol(H^-1);
- columns are quantized left to right (or, with act-order, in order of decreasing diag H), each one's error
  e = (w - q) / U[j, j] is fed to the columns not yet quantized through row j of U; inside a block of B
  columns this happens column by column, and the block's errors reach the later columns in one matrix product
  ("lazy batch updates");
- grids: min-max per output row over a group of g columns, the range always containing 0; symmetric grids put
  the zero point at (maxq + 1) / 2. With static groups the grids come from the unquantized W before the pass;
  otherwise a group's grid is taken when the pass reaches the group's first column (in pass order).
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor


def minmax_grid(x: Tensor, maxq: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero point per row of x [rows, cols] (each row's range widened to contain 0)."""
    lo = torch.clamp(x.min(dim=1).values, max=0)
    hi = torch.clamp(x.max(dim=1).values, min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = torch.where(lo < 0, -hi, lo)
    flat = (lo == 0) & (hi == 0)  # an all-zero row: any positive scale will do
    lo, hi = torch.where(flat, -1.0, lo), torch.where(flat, 1.0, hi)
    scale = (hi - lo) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-lo / scale)
    return scale, zero


def fake_quant(x: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Round x to the grid and back: scale * (clamp(round(x / scale) + zero, 0, maxq) - zero)."""
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def gptq(W: Tensor, H: Tensor, *, bits: int, group_size: int = 128, sym: bool = True, act_order: bool = True,
         static_groups: bool = True, percdamp: float = 0.01, block: int = 128) -> tuple[Tensor, float]:
    """Quantize W [rows, cols] given H [cols, cols]; returns (dequantized Q in W's column order, loss)
    with loss = sum of e^2 / 2 as the paper's code reports it."""
    W = W.clone().float()
    H = H.clone().float()
    rows, cols = W.shape
    maxq = 2**bits - 1
    g = cols if group_size == -1 else group_size
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    grids = None
    if static_groups or group_size == -1:  # from the unquantized weights, in original column order
        grids = [minmax_grid(W[:, c:c + g], maxq, sym) for c in range(0, cols, g)]
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    W, H = W[:, order], H[order][:, order]
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    loss = torch.zeros(rows, device=W.device, dtype=torch.float64)
    scale = zero = None
    for i in range(0, cols, block):
        j_end = min(i + block, cols)
        E = torch.zeros(rows, j_end - i, device=W.device)
        for j in range(i, j_end):
            w = W[:, j]
            if grids is not None:
                scale, zero = grids[int(order[j]) // g]
            elif j % g == 0:  # a dynamic group starts here: its grid from the weights as updated so far
                scale, zero = minmax_grid(W[:, j:j + g], maxq, sym)
            q = fake_quant(w.unsqueeze(1), scale.unsqueeze(1), zero.unsqueeze(1), maxq).squeeze(1)
            Q[:, j] = q
            err = (w - q) / U[j, j]
            loss += (err.double() ** 2) / 2
            W[:, j:j_end] -= err.unsqueeze(1) @ U[j, j:j_end].unsqueeze(0)
            E[:, j - i] = err
        W[:, j_end:] -= E @ U[i:j_end, j_end:]
    Q = Q[:, torch.argsort(order)]
    return Q, float(loss.sum())


class _Hessian:
    """The running H = 2/n sum x x^T of one linear layer's inputs (a forward hook)."""

    def __init__(self, cols: int, device):
        self.H = torch.zeros(cols, cols, device=device)
        self.n = 0

    def __call__(self, _module, args, _output):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = math.sqrt(2 / self.n) * x
        self.H += x.t() @ x


SEQUENTIAL = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


class _Stop(Exception):
    pass


@torch.no_grad()
def quantize_model(model, tokens: Tensor, device, *, bits: int = 4, group_size: int = 128, sym: bool = True,
                   act_order: bool = True, static_groups: bool = True, percdamp: float = 0.01,
                   dtype=torch.float16) -> dict:
    """GPTQ of every block linear of an HF LLaMA ``model`` (in place), true-sequential, as the paper's code:
    the blocks in ``dtype`` on ``device`` one at a time, the inputs of all windows kept on ``device``.
    Returns per-linear loss and own-path error tr((W - Q) H (W - Q)^T), the dequantized fp32 weights (on the
    CPU; the model itself holds them in ``dtype``, as the original) and the time."""
    t0 = time.perf_counter()
    layers = model.model.layers
    model.model.embed_tokens.to(device)
    model.model.rotary_emb.to(device)
    n = tokens.shape[0]
    inps = torch.zeros(n, tokens.shape[1], model.config.hidden_size, dtype=dtype, device=device)
    caught: dict = {}

    def catch(_m, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        inps[caught.setdefault("i", 0)] = h[0].to(dtype)
        caught["i"] += 1
        caught["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    layers[0].to(device)
    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    embed_dtype = model.model.embed_tokens.weight.dtype
    model.model.embed_tokens.to(dtype)
    for j in range(n):  # one sequence per forward, as the original
        try:
            model(input_ids=tokens[j:j + 1].to(device), use_cache=False)
        except _Stop:
            pass
    handle.remove()
    model.model.embed_tokens.to(embed_dtype).cpu()
    kwargs = caught["kwargs"]
    kwargs = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kwargs.items()}
    if "position_embeddings" in kwargs:
        kwargs["position_embeddings"] = tuple(t.to(dtype) for t in kwargs["position_embeddings"])
    kwargs["use_cache"] = False
    for key in ("past_key_values", "past_key_value", "cache"):  # no KV cache: every call is a fresh sequence
        kwargs.pop(key, None)
    outs = torch.zeros_like(inps)
    report, quantized = {}, {}
    for i, layer in enumerate(layers):
        orig_dtype = next(layer.parameters()).dtype
        layer.to(device=device, dtype=dtype)
        for group in SEQUENTIAL:
            lins = {name: layer.get_submodule(name) for name in group}
            hess = {name: _Hessian(lin.in_features, device) for name, lin in lins.items()}
            handles = [lin.register_forward_hook(hess[name]) for name, lin in lins.items()]
            for j in range(n):
                layer(inps[j:j + 1], **kwargs)
            for h in handles:
                h.remove()
            for name, lin in lins.items():
                W = lin.weight.data.float()
                H = hess[name].H
                Q, loss = gptq(W, H, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                               static_groups=static_groups, percdamp=percdamp)
                D = W - Q
                report[f"model.layers.{i}.{name}"] = {"loss": loss, "error": float(((D @ H) * D).double().sum())}
                quantized[f"model.layers.{i}.{name}"] = Q.cpu()
                lin.weight.data = Q.to(lin.weight.dtype)
                del hess[name]
        for j in range(n):
            out = layer(inps[j:j + 1], **kwargs)
            outs[j] = (out[0] if isinstance(out, tuple) else out)[0]
        layer.to(device="cpu", dtype=orig_dtype)
        inps, outs = outs, inps
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    model.model.rotary_emb.cpu()
    return {"modules": report, "quantized": quantized, "seconds": time.perf_counter() - t0}
