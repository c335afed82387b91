"""GPTQ (Frantar et al. 2022, Algorithm 1) as a pure function of a weight W and its Hessian H.

Notation follows the paper and the original code: W [out, in] (rows = output channels, columns = input
features), H = 2/n X^T X [in, in], Hinv = upper Cholesky factor of the damped H^-1, maxq = 2**bits - 1.
Columns are quantized one at a time (in order of decreasing diag(H) with act-order); the error of
column j, Err1_j = (w_j - q_j) / Hinv[j, j], is spread over the columns not yet quantized through row j
of Hinv. Updates to later columns are applied lazily, once per block of ``block_size`` columns, as one
matrix product (the paper's "lazy batch" trick).

Implementation notes (why it looks the way it does):
- the pass works on W transposed into pass order ([in, out]), so a column of W is a contiguous row;
- inside a block, columns are handled in sub-blocks of 16: a column's error goes at once (rank 1) only
  to the rest of its sub-block, and after each sub-block the rest of the block is updated with one
  small matrix product. This replaces the original's rank-1 update of the whole rest of the block
  after every column (memory-bound) with cache-sized work;
- the per-column work is five tensor ops with no host synchronisation, so on a GPU the pass stays on
  the device;
- Hinv comes from one Cholesky factorisation of the reversed H and one triangular inverse;
- rows are independent given H: layers sharing an input (q/k/v, gate/up) can be solved as one stacked
  matrix with ``gptq_quantize_shared``, which pays the per-column cost once.

Pure tensors, torch + stdlib only; no hooks, no prints, no global torch flags.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from quantlm.errors import QuantlmError
from quantlm.gptq.grid import GridSpec, find_params, quantize_codes
from quantlm.quantized import QuantizedLinear, check_bits, check_group_size

# Columns per sub-block inside a lazy block (see the module notes).
_SUB_BLOCK = 16
# Size below which a triangular inverse is a plain triangular solve.
_TRI_INV_BASE = 128
# Damping retries: after ``damp`` fails, lambda fractions grow 4x per try from max(damp, 1e-3), up to this.
_MAX_DAMP = 10.0


@dataclass(frozen=True)
class GPTQResult(QuantizedLinear):
    """A quantized layer (``QuantizedLinear``: W_hat[o, i] = scale[o, g] * (q[o, i] - zero[o, g]), g = g_idx[i])
    with what the solve reports.

    q: uint8 [out, in] integer codes in the layer's original column order.
    scale, zero: fp32 [out, G] (zero integer-valued; (maxq + 1) / 2 everywhere for a symmetric grid).
    g_idx: int32 [in], the group of each input column (i // group_size with static groups).
    loss: the GPTQ objective as the paper's code reports it, sum over weights of
        (w - q)^2 / Hinv[j, j]^2 / 2 (w: the error-updated weight when its column is quantized).
        Since W - W_hat = Err1 @ Hinv, this equals trace((W - W_hat) H_damp (W - W_hat)^T) / 2 with
        H_damp the damped Hessian (dead inputs excluded): about ||X W^T - X W_hat^T||^2 / n.
        For ``rtn_quantize`` it is sum (w - q)^2 / 2 (the same with H = I).
    damp: damping fraction of mean(diag H) actually used (after retries; 0 for round-to-nearest).
    row_loss: float64 [out], each output row's part of ``loss`` (GPTQ only; splits a stacked solve).
    """

    loss: float = 0.0
    damp: float = 0.0
    row_loss: Tensor | None = dataclasses.field(default=None, repr=False, compare=False)


def _all_finite(x: Tensor) -> bool:
    # NaN and Inf propagate into the sum, so one reduction settles the usual case without big temporaries;
    # a huge but finite tensor can overflow the sum, hence the exact check only then.
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def _check_inputs(W: Tensor, H: Tensor | None, bits: int, group_size: int, block_size: int, damp: float,
                  name: str) -> None:
    check_bits(bits)
    if W.dim() != 2:
        raise QuantlmError(f"{name}: weight must be 2-D [out, in], got shape {tuple(W.shape)}")
    cols = W.shape[1]
    check_group_size(group_size, cols, name)
    if block_size <= 0:
        raise QuantlmError(f"{name}: block_size={block_size} must be positive")
    if not (damp >= 0 and math.isfinite(damp)):
        raise QuantlmError(f"{name}: damp={damp} must be a finite fraction >= 0 (0.01 is the usual value)")
    if not _all_finite(W):
        raise QuantlmError(f"{name}: the weight contains NaN or Inf; fix or retrain the checkpoint before quantizing")
    if H is not None:
        if H.shape != (cols, cols):
            raise QuantlmError(f"{name}: Hessian shape {tuple(H.shape)} does not match the input width {cols}")
        if not _all_finite(H):
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


def _lower_triangular_inverse(L: Tensor) -> Tensor:
    """L^-1 of a lower-triangular L, by halves: [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]].

    About 2.5x faster on a CPU than a triangular solve against the identity (which ignores the zeros
    of the identity: n^3/2 multiply-adds instead of ~n^3/6 + matrix products).
    """
    n = L.shape[0]
    if n <= _TRI_INV_BASE:
        return torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False)
    h = n // 2
    Ai = _lower_triangular_inverse(L[:h, :h])
    Di = _lower_triangular_inverse(L[h:, h:])
    out = torch.zeros_like(L)
    out[:h, :h] = Ai
    out[h:, h:] = Di
    out[h:, :h] = Di @ (L[h:, :h] @ Ai)
    out[h:, :h].neg_()
    return out


def _inverse_cholesky(H: Tensor, damp: float, name: str) -> tuple[Tensor, float]:
    """Upper Cholesky factor U of (H + lambda I)^-1 (U^T U = H^-1), lambda = frac * mean(diag H).

    ``H`` is given in REVERSED pass order (J H J, J the reversal permutation), and is damped in place.
    With J H J = L L^T, U = J L^-1 J: one Cholesky and one triangular inverse instead of the original's
    Cholesky, Cholesky inverse and second Cholesky. Returns U still reversed, i.e. L^-1 (lower), and the
    damping fraction used, which grows along _damp_ladder while the factorisation fails.
    """
    diag = torch.diagonal(H)
    mean_diag = float(diag.mean())
    added = 0.0
    for frac in _damp_ladder(damp):
        diag.add_(frac * mean_diag - added)
        added = frac * mean_diag
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) != 0:
            continue
        Linv = _lower_triangular_inverse(L)
        if _all_finite(Linv) and bool((torch.diagonal(Linv) > 0).all()):
            return Linv, frac
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
    grid: GridSpec | None = None,
    name: str = "layer",
) -> GPTQResult:
    """Quantize W [out, in] to ``bits`` with GPTQ, given the Hessian H [in, in] of its inputs.

    group_size: input columns per scale (-1: one scale per output row; must divide ``in``).
    act_order: quantize columns in order of decreasing diag(H).
    static_groups: group grids from the original W before the pass (g_idx[i] = i // group_size);
        otherwise a group's grid is taken from the error-updated weights when the pass reaches its first
        column (in act-order, so g_idx is then arbitrary), with the errors of every earlier column applied
        (the original code misses the current block's errors when a group starts inside a block, i.e.
        when group_size < block_size). Per-channel grids always come from the original W.
    damp: lambda = damp * mean(diag H) is added to diag(H); raised in steps if the Cholesky fails.
    block_size: columns per lazy-update block (changes only float rounding, not the result's meaning).
    mse: search the clipping range of each grid (GridSpec.mse, default search settings).
    grid: the full grid settings (``GPTQSettings.grid_spec()``); overrides ``sym`` and ``mse`` when given.
    name: the layer's name, used in error messages.
    Inputs are not modified; the result lives on W's device. Same inputs -> bit-identical result.
    """
    _check_inputs(W, H, bits, group_size, block_size, damp, name)
    spec = grid or GridSpec(bits=bits, sym=sym, mse=mse)
    sym = spec.sym
    maxq = spec.maxq
    rows, cols = W.shape
    device = W.device
    per_channel = group_size == -1
    group = cols if per_channel else group_size
    dynamic = not static_groups and not per_channel

    # Hessian in reversed pass order (see _inverse_cholesky); dead inputs (always zero in calibration)
    # get diag 1 and weight 0.
    H = H.detach().to(device=device, dtype=torch.float32)
    dead = torch.diagonal(H) == 0
    has_dead = bool(dead.any())
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else None
    rev = perm.flip(0) if perm is not None else torch.arange(cols - 1, -1, -1, device=device)
    H = H[rev.unsqueeze(1), rev]
    dead_pass = dead[perm] if perm is not None else dead
    if has_dead:
        torch.diagonal(H).masked_fill_(dead_pass.flip(0), 1.0)
    Linv, damp_used = _inverse_cholesky(H, damp, name)
    del H
    # Hinv = J Linv J. d = diag(Hinv); Hs = Hinv with row j divided by Hinv[j, j] (upper, unit diagonal):
    # column j of W sends its plain error e_j = w_j - q_j to later columns c as -Hs[j, c] * e_j
    # (Err1_j = e_j / Hinv[j, j] in the paper's notation).
    dl = torch.diagonal(Linv).clone()
    d = dl.flip(0)
    Hs = Linv.div_(dl.unsqueeze(1)).flip(0, 1)
    del Linv

    # Wt [cols, rows]: W transposed into pass order, so column j of W is the contiguous row Wt[j].
    Wd = W.detach()
    Wt = torch.empty((cols, rows), dtype=torch.float32, device=device)
    Wt.copy_(Wd.t())  # a private copy: the input is never modified
    if perm is not None:
        Wt = Wt[perm]  # gathering contiguous rows: much faster than gathering strided columns
    if has_dead:
        Wt.masked_fill_(dead_pass.unsqueeze(1), 0.0)

    # Grids. Codes are handled centred, r = code - zero in [-zero, maxq - zero], so that q = r * scale.
    col_s: Sequence[Tensor] | None = None
    col_lo: Sequence[Tensor] | None = None
    col_hi: Sequence[Tensor] | None = None
    s = lo = hi = None
    if not dynamic:  # fixed before the pass, from the original W (dead columns zeroed)
        W0 = Wd.to(torch.float32)
        if has_dead:
            W0 = W0.masked_fill(dead.unsqueeze(0), 0.0)
        scale_g, zero_g = _group_params(W0, group, spec)
        del W0
        if per_channel:
            s, lo, hi = scale_g[:, 0], -zero_g[:, 0], maxq - zero_g[:, 0]
        else:  # per pass position, views of its group's grid (no [cols, rows] copies)
            col_group = [c // group for c in (perm.tolist() if perm is not None else range(cols))]
            zero_t = zero_g.t().contiguous()
            scale_rows = scale_g.t().contiguous().unbind(0)
            col_s = [scale_rows[g] for g in col_group]
            if not sym:
                lo_rows, hi_rows = (-zero_t).unbind(0), (maxq - zero_t).unbind(0)
                col_lo = [lo_rows[g] for g in col_group]
                col_hi = [hi_rows[g] for g in col_group]
        if sym:  # the symmetric zero is one number: clamp with scalars
            lo, hi = -(maxq + 1) / 2, maxq - (maxq + 1) / 2
    else:
        dyn_s: list[Tensor] = []
        dyn_z: list[Tensor] = []

    R = torch.empty_like(Wt)  # centred codes, pass order
    E = torch.empty_like(Wt)  # e = w - q of every column, pass order
    w_rows, r_rows, e_rows, h_rows = Wt.unbind(0), R.unbind(0), E.unbind(0), Hs.unbind(0)
    B = block_size
    b = min(_SUB_BLOCK, B)

    for i1 in range(0, cols, B):  # lazy blocks: later columns are updated once per block
        i2 = min(i1 + B, cols)
        for k1 in range(i1, i2, b):  # sub-blocks: the rest of the block is updated once per sub-block
            k2 = min(k1 + b, i2)
            for j in range(k1, k2):
                if dynamic:
                    if j % group == 0:  # a new group: its grid from the weights as updated so far
                        cur = _current_columns(Wt, Hs, E, j, min(j + group, cols), i1, i2, k1, k2)
                        s, z = find_params(cur.t(), spec)
                        dyn_s.append(s)
                        dyn_z.append(z)
                        if not sym:
                            lo, hi = -z, maxq - z
                        else:
                            lo, hi = -(maxq + 1) / 2, maxq - (maxq + 1) / 2
                elif col_s is not None:
                    s = col_s[j]
                    if col_lo is not None:
                        lo, hi = col_lo[j], col_hi[j]
                w = w_rows[j]
                r = torch.div(w, s, out=r_rows[j]).round_().clamp_(lo, hi)
                e = torch.addcmul(w, r, s, value=-1.0, out=e_rows[j])
                if j + 1 < k2:  # inside the sub-block, errors are passed on at once (rank 1, in cache)
                    Wt[j + 1:k2].addr_(h_rows[j][j + 1:k2], e, alpha=-1.0)
            if k2 < i2:
                Wt[k2:i2].addmm_(Hs[k1:k2, k2:i2].t(), E[k1:k2], alpha=-1.0)
        if i2 < cols:
            Wt[i2:].addmm_(Hs[i1:i2, i2:].t(), E[i1:i2], alpha=-1.0)
    del Wt, Hs, w_rows, h_rows, e_rows, r_rows

    # Loss of the paper's code: sum over weights of (e / Hinv[j, j])^2 / 2.
    row_loss = (d.reciprocal().square() @ E.square_()).double() / 2  # [rows]
    loss = float(row_loss.sum())
    del E

    # Codes: add the zero points back (groups are contiguous runs of columns: in pass order for dynamic
    # groups, in the original order for static ones), undo the permutation (on uint8 where possible),
    # transpose to [out, in].
    unperm = torch.argsort(perm) if perm is not None else None
    if dynamic:
        scale = torch.stack(dyn_s, dim=1)
        zero = torch.stack(dyn_z, dim=1)
        R.view(-1, group, rows).add_(zero.t().unsqueeze(1))
        g_idx = torch.empty(cols, dtype=torch.int32, device=device)
        pos_group = (torch.arange(cols, device=device) // group).to(torch.int32)
        g_idx[perm if perm is not None else torch.arange(cols, device=device)] = pos_group
    else:
        scale, zero = scale_g, zero_g
        if sym:
            R += (maxq + 1) / 2
        else:
            if unperm is not None:
                R, unperm = R[unperm], None
            R.view(-1, group, rows).add_(zero_g.t().unsqueeze(1))
        g_idx = (torch.arange(cols, device=device) // group).to(torch.int32)
    codes = R.to(torch.uint8)
    del R
    if unperm is not None:
        codes = codes[unperm]
    q = codes.t().contiguous()
    return GPTQResult(q=q, scale=scale.contiguous(), zero=zero.contiguous(), g_idx=g_idx, loss=loss,
                      damp=damp_used, bits=bits, group_size=group_size, sym=sym, row_loss=row_loss)


def _current_columns(Wt: Tensor, Hs: Tensor, E: Tensor, j0: int, j1: int, i1: int, i2: int, k1: int,
                     k2: int) -> Tensor:
    """Columns j0..j1-1 (pass order) with the errors of every column before j0 applied: [j1 - j0, rows].

    When column j0 is reached, the rest of its sub-block is up to date, the rest of the block misses the
    errors of the sub-block so far (k1..j0-1) and later columns miss those of the block so far (i1..j0-1).
    """
    cur = Wt[j0:j1].clone()
    if k1 < j0 and j1 > k2:
        a, z = k2, min(j1, i2)
        cur[a - j0:z - j0].addmm_(Hs[k1:j0, a:z].t(), E[k1:j0], alpha=-1.0)
    if i1 < j0 and j1 > i2:
        cur[i2 - j0:].addmm_(Hs[i1:j0, i2:j1].t(), E[i1:j0], alpha=-1.0)
    return cur


def gptq_quantize_shared(Ws: Sequence[Tensor], H: Tensor, *, names: Sequence[str] | None = None,
                         **kwargs) -> list[GPTQResult]:
    """GPTQ of several layers that share one input (q/k/v, gate/up): one pass over their stacked rows.

    GPTQ treats rows independently given H, so this equals quantizing each layer alone (up to float
    summation order), at the per-column cost of a single call. Returns one result per layer, each with
    its own part of the loss. Keyword arguments are those of ``gptq_quantize``.
    """
    if not Ws:
        return []
    names = list(names) if names is not None else [f"layer{i}" for i in range(len(Ws))]
    widths = {w.shape[1] for w in Ws}
    if len(widths) != 1:
        raise QuantlmError(f"{', '.join(names)}: layers sharing a Hessian must have one input width, got {widths}")
    sizes = [w.shape[0] for w in Ws]
    stacked = torch.cat([w.detach().to(torch.float32) for w in Ws], dim=0)
    res = gptq_quantize(stacked, H, name="+".join(names), **kwargs)
    out, start = [], 0
    for size in sizes:
        sl = slice(start, start + size)
        out.append(GPTQResult(q=res.q[sl].contiguous(), scale=res.scale[sl].contiguous(),
                              zero=res.zero[sl].contiguous(), g_idx=res.g_idx.clone(),
                              loss=float(res.row_loss[sl].sum()), damp=res.damp, bits=res.bits,
                              group_size=res.group_size, sym=res.sym, row_loss=res.row_loss[sl].clone()))
        start += size
    return out


def rtn_quantize(W: Tensor, *, bits: int, group_size: int = 128, sym: bool = True, mse: bool = False,
                 grid: GridSpec | None = None, name: str = "layer") -> GPTQResult:
    """Round-to-nearest baseline on the same grids (the same result type as gptq_quantize).

    loss = sum (w - q)^2 / 2, the GPTQ objective with H = I.
    """
    _check_inputs(W, None, bits, group_size, 1, 0.0, name)
    spec = grid or GridSpec(bits=bits, sym=sym, mse=mse)
    sym = spec.sym
    W = W.detach().to(torch.float32)
    rows, cols = W.shape
    group = cols if group_size == -1 else group_size
    scale, zero = _group_params(W, group, spec)
    g_idx = (torch.arange(cols, device=W.device) // group).to(torch.int32)
    G = cols // group
    q = quantize_codes(W.reshape(rows * G, group), scale.reshape(-1), zero.reshape(-1), spec.maxq)
    q = q.reshape(rows, cols)
    g = g_idx.long()
    loss = float((W - (q.to(torch.float32) - zero[:, g]) * scale[:, g]).double().pow(2).sum()) / 2
    return GPTQResult(q=q, scale=scale, zero=zero, g_idx=g_idx, loss=loss, damp=0.0, bits=bits,
                      group_size=group_size, sym=sym)


def reconstruction_error(W: Tensor, Q: Tensor, H: Tensor) -> float:
    """trace((W - Q) H (W - Q)^T): with H = 2/n X^T X this is 2/n * ||X W^T - X Q^T||_F^2."""
    D = W.to(torch.float32) - Q.to(device=W.device, dtype=torch.float32)
    Hd = H.to(device=D.device, dtype=torch.float32)
    return float(((D @ Hd) * D).double().sum())
