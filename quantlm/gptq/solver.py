"""GPTQ (Frantar et al. 2022, Algorithm 1) as a pure function of a weight W and its Hessian H.

Notation follows the paper and the original code: W [out, in] (rows = output channels, columns = input
features), H = 2/n X^T X [in, in], Hinv = upper Cholesky factor of H^-1, maxq = 2**bits - 1. Columns are
quantized one at a time (in order of decreasing diag(H) with act-order); the error of column j,
Err1_j = (w_j - q_j) / Hinv[j, j], is spread over the not yet quantized columns through row j of Hinv.
Updates inside a block of ``block_size`` columns are immediate (rank-1), those to later columns are
applied lazily once per block (one matrix product), which is what makes GPTQ fast.

Implementation notes (why it looks the way it does):
- the loop works on W transposed ([in, out]), so a column of W is one contiguous row of memory;
- the per-column work is a handful of vector ops with no host synchronisation, so on a GPU the whole
  loop stays on the device; the diagonal of Hinv is read to the host once;
- rows are independent given H: layers sharing an input (q/k/v, gate/up) can be solved as one stacked
  matrix with ``gptq_quantize_shared``, which pays the per-column overhead once.

Pure tensors, torch + stdlib only; no hooks, no prints, no global torch flags.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from quantlm.errors import QuantlmError
from quantlm.gptq.grid import GridSpec, check_bits, find_params, quantize_codes

# Damping retries: after ``damp`` fails, lambda fractions grow 4x per try from max(damp, 1e-3), up to this.
_MAX_DAMP = 10.0


@dataclass(frozen=True)
class GPTQResult:
    """Quantized layer: W_hat[o, i] = scale[o, g] * (q[o, i] - zero[o, g]) with g = g_idx[i].

    q: uint8 [out, in] integer codes in the layer's original column order.
    scale, zero: fp32 [out, G] (zero integer-valued; (maxq + 1) / 2 everywhere for a symmetric grid).
    g_idx: int32 [in], the group of each input column (i // group_size with static groups).
    loss: the GPTQ objective as reported by the paper's code, sum over weights of
        (w - q)^2 / Hinv[j, j]^2 / 2, i.e. half the sum of squared scaled errors Err1 (Hinv: upper
        Cholesky factor of the damped H^-1). It estimates the increase of ||X W^T - X Q^T||^2 / n caused
        by quantization (exact when columns are independent); for ``rtn_quantize`` it is
        sum (w - q)^2 / 2 (the same formula with H = I).
    damp: damping fraction of mean(diag H) actually used (after retries; 0 for round-to-nearest).
    """

    q: Tensor
    scale: Tensor
    zero: Tensor
    g_idx: Tensor
    loss: float
    damp: float
    bits: int
    group_size: int
    sym: bool

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def dequantize(self) -> Tensor:
        """fp32 [out, in] weights represented by the codes."""
        g = self.g_idx.long()
        return (self.q.to(torch.float32) - self.zero[:, g]) * self.scale[:, g]


def _check_inputs(W: Tensor, H: Tensor | None, bits: int, group_size: int, block_size: int, damp: float,
                  name: str) -> None:
    check_bits(bits)
    if W.dim() != 2:
        raise QuantlmError(f"{name}: weight must be 2-D [out, in], got shape {tuple(W.shape)}")
    cols = W.shape[1]
    if group_size != -1 and (group_size <= 0 or cols % group_size != 0):
        divisors = [d for d in (32, 64, 128, 256) if cols % d == 0] or [d for d in range(2, 65) if cols % d == 0]
        hint = f"e.g. {', '.join(map(str, divisors[:4]))} or " if divisors else ""
        raise QuantlmError(
            f"{name}: group_size={group_size} does not divide the layer's input width {cols}; "
            f"use a group size that divides {cols} ({hint}-1 for one scale per output channel)"
        )
    if block_size <= 0:
        raise QuantlmError(f"{name}: block_size={block_size} must be positive")
    if not (damp >= 0 and math.isfinite(damp)):
        raise QuantlmError(f"{name}: damp={damp} must be a finite fraction >= 0 (0.01 is the usual value)")
    if not bool(torch.isfinite(W).all()):
        raise QuantlmError(f"{name}: the weight contains NaN or Inf; fix or retrain the checkpoint before quantizing")
    if H is not None:
        if H.shape != (cols, cols):
            raise QuantlmError(f"{name}: Hessian shape {tuple(H.shape)} does not match the input width {cols}")
        if not bool(torch.isfinite(H).all()):
            raise QuantlmError(
                f"{name}: the Hessian contains NaN or Inf (overflowing activations?); check the calibration "
                "inputs and run the model in fp32"
            )


def _damp_ladder(damp: float) -> list[float]:
    ladder = [damp]
    x = max(damp, 1e-3)
    while x * 4 <= _MAX_DAMP:
        x *= 4
        ladder.append(x)
    return ladder


def _inverse_cholesky(H: Tensor, damp: float, name: str) -> tuple[Tensor, float]:
    """Upper Cholesky factor of (H + lambda I)^-1 with lambda = frac * mean(diag H), retrying larger fracs."""
    mean_diag = float(torch.diagonal(H).mean())
    for frac in _damp_ladder(damp):
        Hd = H.clone()
        torch.diagonal(Hd).add_(frac * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) != 0:
            continue
        Hinv = torch.cholesky_inverse(L)
        U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
        if int(info) == 0 and bool(torch.isfinite(U).all()):
            return U, frac
    raise QuantlmError(
        f"{name}: the Hessian is not positive definite even with damping {frac:g} x mean(diag H); "
        "the calibration inputs are degenerate: use more or different calibration samples"
    )


def _group_params(W: Tensor, group: int, spec: GridSpec) -> tuple[Tensor, Tensor]:
    """Grid of each group of ``group`` consecutive columns of W [rows, cols] -> scale, zero [rows, G]."""
    rows, cols = W.shape
    G = cols // group
    s, z = find_params(W.reshape(rows * G, group), spec)
    return s.reshape(rows, G), z.reshape(rows, G)


def _block_size_for(block_size: int, group: int, dynamic: bool) -> int:
    """Block size making every dynamic group see fully updated weights when its first column is reached.

    A group's grid is computed from W at that moment: the group must lie inside one block (block a
    multiple of the group) or start at a block boundary (group a multiple of the block), where the lazy
    updates of all earlier columns have been applied.
    """
    if not dynamic or block_size % group == 0 or group % block_size == 0:
        return block_size
    return group * max(1, block_size // group)


def gptq_quantize(
    W: Tensor,
    H: Tensor,
    *,
    bits: int,
    group_size: int = 128,
    sym: bool = True,
    act_order: bool = True,
    static_groups: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    mse: bool = False,
    name: str = "layer",
) -> GPTQResult:
    """Quantize W [out, in] to ``bits`` with GPTQ, given the Hessian H [in, in] of its inputs.

    group_size: input columns per scale (-1: one scale per output row; must divide ``in``).
    act_order: quantize columns in order of decreasing diag(H).
    static_groups: group grids from the original W before the pass (g_idx[i] = i // group_size);
        otherwise a group's grid is taken from the error-updated weights when the pass reaches its first
        column (in act-order, so g_idx is then arbitrary).
    damp: lambda = damp * mean(diag H) added to diag(H); raised in steps if the Cholesky fails.
    mse: search the clipping range of each grid (GridSpec.mse).
    name: the layer's name, used in error messages.
    Nothing is modified in place; the result lives on W's device. Same inputs -> bit-identical result.
    """
    return _gptq(W, H, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                 static_groups=static_groups, damp=damp, block_size=block_size, mse=mse, name=name)[0]


def _gptq(
    W: Tensor,
    H: Tensor,
    *,
    bits: int,
    group_size: int = 128,
    sym: bool = True,
    act_order: bool = True,
    static_groups: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    mse: bool = False,
    name: str = "layer",
) -> tuple[GPTQResult, Tensor]:
    """gptq_quantize, also returning the loss of each row [out] (float64)."""
    _check_inputs(W, H, bits, group_size, block_size, damp, name)
    spec = GridSpec(bits=bits, sym=sym, mse=mse)
    maxq = spec.maxq
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(device=W.device, dtype=torch.float32).clone()
    rows, cols = W.shape
    per_channel = group_size == -1
    group = cols if per_channel else group_size
    dynamic = not static_groups and not per_channel

    # Dead inputs (always zero in calibration): their weights cannot matter, quantize them to 0.
    dead = torch.diagonal(H) == 0
    torch.diagonal(H).masked_fill_(dead, 1.0)
    W.masked_fill_(dead.unsqueeze(0), 0.0)

    if not dynamic:  # grids of the original columns, fixed before the pass
        scale_g, zero_g = _group_params(W, group, spec)

    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    Hinv, damp_used = _inverse_cholesky(H, damp, name)
    del H

    # Per-column grid of the static case, in pass order: [cols, rows].
    if not dynamic:
        col_group = torch.arange(cols, device=W.device) // group
        if perm is not None:
            col_group = col_group[perm]
        S = scale_g.t()[col_group].contiguous()
        Z = zero_g.t()[col_group].contiguous()
    else:
        dyn_scales: list[Tensor] = []
        dyn_zeros: list[Tensor] = []

    Wt = W.t().contiguous()  # [cols, rows]: column j of W is the contiguous row Wt[j]
    del W
    Codes = torch.empty_like(Wt)  # float codes, pass order
    Err = torch.empty_like(Wt)  # Err1 of every column (scaled errors), pass order
    dinv = (1.0 / torch.diagonal(Hinv)).tolist()
    B = _block_size_for(block_size, group, dynamic)
    sym_zero = (maxq + 1) / 2

    s = z = None
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        count = i2 - i1
        W1 = Wt[i1:i2]
        Err1 = Err[i1:i2]
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            j = i1 + i
            if dynamic:
                if j % group == 0:
                    s, z = find_params(Wt[j:j + group].t(), spec)
                    dyn_scales.append(s)
                    dyn_zeros.append(z)
            else:
                s = S[j]
                z = sym_zero if sym else Z[j]
            w = W1[i]
            c = Codes[j]
            torch.div(w, s, out=c).round_().add_(z).clamp_(0, maxq)
            err = Err1[i]
            # Err1 = (w - q) / d with q = (c - z) * s the dequantized column
            torch.sub(c, z, out=err).mul_(s)
            torch.sub(w, err, out=err).mul_(dinv[j])
            if i + 1 < count:
                W1[i + 1:].addr_(Hinv1[i, i + 1:], err, alpha=-1.0)
        if i2 < cols:
            Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1.0)

    row_loss = Err.double().pow(2).sum(dim=0) / 2  # [rows]
    loss = float(row_loss.sum())
    q = Codes.t()
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    q = q.to(torch.uint8).contiguous()

    if dynamic:
        scale = torch.stack(dyn_scales, dim=1)
        zero = torch.stack(dyn_zeros, dim=1)
        pos = torch.arange(cols, device=q.device) // group  # group of each pass position
        g_idx = torch.empty(cols, dtype=torch.int32, device=q.device)
        g_idx[perm if perm is not None else torch.arange(cols, device=q.device)] = pos.to(torch.int32)
    else:
        scale, zero = scale_g, zero_g
        g_idx = (torch.arange(cols, device=q.device) // group).to(torch.int32)
    res = GPTQResult(q=q, scale=scale.contiguous(), zero=zero.contiguous(), g_idx=g_idx, loss=loss,
                     damp=damp_used, bits=bits, group_size=group_size, sym=sym)
    return res, row_loss


def gptq_quantize_shared(Ws: Sequence[Tensor], H: Tensor, *, names: Sequence[str] | None = None,
                         **kwargs) -> list[GPTQResult]:
    """GPTQ of several layers that share one input (q/k/v, gate/up): one pass over their stacked rows.

    GPTQ treats rows independently given H, so this equals quantizing each layer alone (up to float
    summation order), at the per-column cost of a single call. Returns one result per layer, each with
    its own share of the loss.
    """
    if not Ws:
        return []
    names = list(names) if names is not None else [f"layer{i}" for i in range(len(Ws))]
    widths = {w.shape[1] for w in Ws}
    if len(widths) != 1:
        raise QuantlmError(f"{', '.join(names)}: layers sharing a Hessian must have one input width, got {widths}")
    sizes = [w.shape[0] for w in Ws]
    stacked = torch.cat([w.detach().to(torch.float32) for w in Ws], dim=0)
    res = _gptq(stacked, H, name="+".join(names), **kwargs)
    out, start = [], 0
    for size in sizes:
        sl = slice(start, start + size)
        out.append(GPTQResult(q=res[0].q[sl].contiguous(), scale=res[0].scale[sl].contiguous(),
                              zero=res[0].zero[sl].contiguous(), g_idx=res[0].g_idx.clone(),
                              loss=float(res[1][sl].sum()), damp=res[0].damp, bits=res[0].bits,
                              group_size=res[0].group_size, sym=res[0].sym))
        start += size
    return out


def rtn_quantize(W: Tensor, *, bits: int, group_size: int = 128, sym: bool = True, mse: bool = False,
                 name: str = "layer") -> GPTQResult:
    """Round-to-nearest baseline on the same grids (the same result type as gptq_quantize).

    loss = sum (w - q)^2 / 2, the GPTQ objective with H = I.
    """
    _check_inputs(W, None, bits, group_size, 1, 0.0, name)
    spec = GridSpec(bits=bits, sym=sym, mse=mse)
    W = W.detach().to(torch.float32)
    rows, cols = W.shape
    group = cols if group_size == -1 else group_size
    scale, zero = _group_params(W, group, spec)
    g_idx = (torch.arange(cols, device=W.device) // group).to(torch.int32)
    G = cols // group
    Wg = W.reshape(rows * G, group)
    q = quantize_codes(Wg, scale.reshape(-1), zero.reshape(-1), spec.maxq).reshape(rows, cols)
    res = GPTQResult(q=q, scale=scale, zero=zero, g_idx=g_idx, loss=0.0, damp=0.0, bits=bits,
                     group_size=group_size, sym=sym)
    loss = float((W - res.dequantize()).double().pow(2).sum()) / 2
    return GPTQResult(q=q, scale=scale, zero=zero, g_idx=g_idx, loss=loss, damp=0.0, bits=bits,
                      group_size=group_size, sym=sym)


def reconstruction_error(W: Tensor, Q: Tensor, H: Tensor) -> float:
    """trace((W - Q) H (W - Q)^T): with H = 2/n X^T X this is 2/n * ||X W^T - X Q^T||_F^2."""
    D = W.to(torch.float32) - Q.to(device=W.device, dtype=torch.float32)
    Hd = H.to(device=D.device, dtype=torch.float32)
    return float(((D @ Hd) * D).double().sum())
