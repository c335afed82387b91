"""Uniform integer grid ("quantizer") of GPTQ: per-row scale and zero point, codes, dequantization.

A weight w maps to the code q = clamp(round(w / scale) + zero, 0, maxq) with maxq = 2**bits - 1 and
back to scale * (q - zero). As in the original GPTQ code (``quant.py``), the grid always contains 0
(the range [xmin, xmax] is widened to include it) and a symmetric grid fixes zero = (maxq + 1) / 2.
One deliberate difference: a symmetric row whose weights are all >= 0 uses [-max, max] (the original
keeps [0, max] with the zero point in the middle, which clips half the row).

``signed_absmax`` (symmetric only) is llama.cpp's Q4_0/Q8_0 grid: the weight of largest magnitude lands exactly on
the grid's outer level -(maxq + 1) / 2, so scale = that weight / -((maxq + 1) / 2) carries its sign (it may be
negative) and all 2**bits levels face the larger side; the reference grid spends a level on +(maxq + 1) / 2 that
the symmetric range never reaches.

Pure tensors, torch + stdlib only. Shapes: W is [rows, cols]; scale and zero are [rows] (one grid per row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from quantlm.errors import QuantlmError
from quantlm.quantized import check_bits

# Smallest scale kept: a row of denormals would otherwise get scale 0 and divide by zero.
_MIN_SCALE = torch.finfo(torch.float32).tiny
# Elements per chunk of the vectorised MSE search (candidates x rows x cols), about 64 MiB in fp32.
_MSE_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class GridSpec:
    """A uniform grid: bit width, symmetry and the optional MSE clipping search.

    mse: search shrink factors p = 1, 1 - 1/mse_grid, ... down to 1 - mse_maxshrink (exclusive) of the
    range, keeping per row the first p that minimises sum |dequant(quant(w)) - w| ** mse_norm.
    """

    bits: int
    sym: bool = True
    mse: bool = False
    mse_grid: int = 100
    mse_maxshrink: float = 0.8
    mse_norm: float = 2.4
    signed_absmax: bool = False

    def __post_init__(self):
        check_bits(self.bits)
        if self.signed_absmax and (not self.sym or self.mse):
            raise QuantlmError("signed_absmax is a symmetric grid without a clipping search; use it with sym and "
                               "without mse")
        if self.mse and (self.mse_grid <= 0 or not 0 < self.mse_maxshrink <= 1 or self.mse_norm <= 0):
            raise QuantlmError(
                f"MSE grid search needs mse_grid > 0, 0 < mse_maxshrink <= 1 and mse_norm > 0; got "
                f"{self.mse_grid}, {self.mse_maxshrink}, {self.mse_norm}"
            )

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1


def _scale_zero(xmin: Tensor, xmax: Tensor, maxq: int, sym: bool) -> tuple[Tensor, Tensor]:
    scale = ((xmax - xmin) / maxq).clamp_min_(_MIN_SCALE)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def _range(x: Tensor, sym: bool) -> tuple[Tensor, Tensor]:
    """Per-row [xmin, xmax] containing 0; symmetric -> [-amax, amax]; all-zero rows -> [-1, 1]."""
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    xmin = torch.minimum(x.amin(dim=1), zero)
    xmax = torch.maximum(x.amax(dim=1), zero)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    return xmin, xmax


def find_params(W: Tensor, spec: GridSpec) -> tuple[Tensor, Tensor]:
    """Per-row grid of ``W`` [rows, cols]: returns (scale [rows], zero [rows]) in fp32, zero integer-valued."""
    if W.dim() != 2:
        raise ValueError(f"find_params expects a 2-D [rows, cols] tensor, got shape {tuple(W.shape)}")
    x = W.to(torch.float32)
    maxq = spec.maxq
    if spec.signed_absmax:
        return _signed_absmax(x, maxq)
    xmin, xmax = _range(x, spec.sym)
    scale, zero = _scale_zero(xmin, xmax, maxq, spec.sym)
    if not spec.mse:
        return scale, zero

    # Vectorised clipping search over shrink factors, chunked to bound memory. argmin keeps the first
    # minimum within a chunk and the strict "<" across chunks keeps the first overall (as the original loop).
    steps = int(spec.mse_maxshrink * spec.mse_grid)
    rows, cols = x.shape
    chunk = max(1, _MSE_CHUNK_ELEMENTS // max(1, rows * cols))
    best = torch.full((rows,), float("inf"), dtype=torch.float32, device=x.device)
    best_scale, best_zero = scale.clone(), zero.clone()
    for start in range(0, steps, chunk):
        idx = torch.arange(start, min(start + chunk, steps), device=x.device, dtype=torch.float64)
        p = (1 - idx / spec.mse_grid).to(torch.float32).unsqueeze(1)  # [k, 1], p rounded once to fp32
        s1, z1 = _scale_zero(p * xmin, p * xmax, maxq, spec.sym)  # [k, rows]
        s1, z1 = s1.unsqueeze(2), z1.unsqueeze(2)
        # centred codes round(x / s) clamped to [-zero, maxq - zero]: the same values as
        # clamp(round(x / s) + zero, 0, maxq) - zero (zero is an integer), in fewer passes
        r = torch.div(x, s1).round_()
        r = torch.maximum(r, -z1, out=r) if not spec.sym else r.clamp_(min=-(maxq + 1) / 2)
        r = torch.minimum(r, maxq - z1, out=r) if not spec.sym else r.clamp_(max=maxq - (maxq + 1) / 2)
        err = r.mul_(s1).sub_(x).abs_().pow_(spec.mse_norm).sum(dim=2)  # [k, rows]
        val, arg = err.min(dim=0)
        better = val < best
        best = torch.where(better, val, best)
        pick_s = s1.squeeze(2).gather(0, arg.unsqueeze(0)).squeeze(0)
        pick_z = z1.squeeze(2).gather(0, arg.unsqueeze(0)).squeeze(0)
        best_scale = torch.where(better, pick_s, best_scale)
        best_zero = torch.where(better, pick_z, best_zero)
    return best_scale, best_zero


def _signed_absmax(x: Tensor, maxq: int) -> tuple[Tensor, Tensor]:
    """llama.cpp's grid: scale = (the row's weight of largest magnitude) / -((maxq + 1) / 2), zero in the middle."""
    half = (maxq + 1) / 2
    peak = x.gather(1, x.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    scale = peak / -half
    tiny = scale.abs() < _MIN_SCALE  # an all-zero row: any scale reproduces it
    scale = torch.where(tiny, torch.full_like(scale, 1.0 / half), scale)
    return scale, torch.full_like(scale, half)


def _cols(t: Tensor) -> Tensor:
    """Per-row parameters [rows] -> [rows, 1] so they broadcast over columns."""
    return t.unsqueeze(1) if t.dim() == 1 else t


def quantize_codes(W: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Integer codes (uint8) of ``W`` [rows, cols] on the per-row grid (scale, zero [rows] or broadcastable)."""
    s, z = _cols(scale), _cols(zero)
    return torch.clamp(torch.round(W.to(torch.float32) / s) + z, 0, maxq).to(torch.uint8)


def fake_quantize(W: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """scale * (quantize_codes(W) - zero) in fp32, without the uint8 round trip."""
    s, z = _cols(scale), _cols(zero)
    return (torch.clamp(torch.round(W.to(torch.float32) / s) + z, 0, maxq) - z) * s
