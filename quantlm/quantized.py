"""The two quantized-weight values every part of quantlm shares, each with its one ``dequantize``.

* :class:`QuantizedLinear`: b-bit integer codes with per-group scales and zero points,
  W[o, i] = scale[o, g] * (q[o, i] - zero[o, g]) with g = g_idx[i] (i // group_size for contiguous groups).
* :class:`TernaryWeight`: a TriLM weight, gamma_s * W_t with W_t in {-1, 0, 1} and one scale per
  model-parallel shard s (along the output dimension for column-parallel layers, the input for row-parallel).

The GPTQ solver returns a ``QuantizedLinear``; every storage format (``quantlm.formats``) encodes one and
decodes it back; the packed loader runs it. Only torch and the standard library are imported here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from quantlm.architectures import COLUMN, ROW
from quantlm.errors import QuantlmError


def check_bits(bits: int, where: str = "bits") -> None:
    """The one check of a code width: every layout and the solver take 2..8 bits."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise QuantlmError(f"{where}={bits!r} is outside 2..8; choose a bitwidth from 2 to 8")


def check_group_size(group_size: int, in_features: int | None = None, where: str = "") -> None:
    """The one check of a group size: positive or -1 (per channel), and a divisor of the input width."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size == 0 or group_size < -1:
        raise QuantlmError(f"group_size={group_size!r}: use a positive group size or -1 for per-channel")
    if in_features is not None and group_size != -1 and in_features % group_size:
        at = f" of {where}" if where else ""
        divisors = [d for d in (32, 64, 128, 256) if in_features % d == 0] or [
            d for d in range(2, 65) if in_features % d == 0]
        hint = f" (e.g. {', '.join(map(str, divisors[:4]))})" if divisors else ""
        raise QuantlmError(f"group size {group_size} does not divide the input width {in_features}{at}; choose a "
                           f"divisor of every layer's input width{hint} or --group-size -1 (per channel)")


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-in_features // group_size)


def contiguous_g_idx(in_features: int, group_size: int, device=None) -> Tensor:
    gs = in_features if group_size == -1 else group_size
    return (torch.arange(in_features, device=device, dtype=torch.int64) // gs).to(torch.int32)


@dataclass(frozen=True)
class QuantizedLinear:
    """One quantized linear weight [out, in].

    q: uint8 codes in the layer's original column order; scale: [out, G] (fp32 from the solver, fp16 once
    stored); zero: [out, G] integer-valued zero points in [0, 2**bits) (2**(bits-1) everywhere when symmetric);
    g_idx: int32 [in] group of each input column, or None for contiguous groups (i // group_size).
    """

    q: Tensor
    scale: Tensor
    zero: Tensor
    bits: int
    group_size: int  # -1: one group spanning the whole input
    sym: bool
    g_idx: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def group_index(self) -> Tensor:
        if self.g_idx is not None:
            return self.g_idx
        return contiguous_g_idx(self.shape[1], self.group_size, self.q.device)

    def is_contiguous(self) -> bool:
        return self.g_idx is None or torch.equal(
            self.g_idx.to(torch.int64).cpu(), contiguous_g_idx(self.shape[1], self.group_size).to(torch.int64))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weights the codes represent: scale * (q - zero), computed in fp32."""
        g = self.group_index().long()
        return ((self.q.to(torch.float32) - self.zero.to(torch.float32)[:, g]) * self.scale.to(torch.float32)[:, g]
                ).to(dtype)

    def to(self, device) -> QuantizedLinear:
        return dataclasses.replace(self, q=self.q.to(device), scale=self.scale.to(device), zero=self.zero.to(device),
                                   g_idx=None if self.g_idx is None else self.g_idx.to(device))

    def stored(self, name: str = "layer") -> QuantizedLinear:
        """The form every packed format stores: fp16 scales, int32 zeros, contiguous groups, on the CPU.

        The solver's fp32 scales are rounded to fp16 here, once, so the unpacked export and the packed ones
        hold the same weights (up to the final rounding of W to fp16).
        """
        if not self.is_contiguous():
            raise QuantlmError(f"{name}: act-order without static groups gives an arbitrary g_idx, which the "
                               "export formats do not store; quantize with static_groups: true (the default)")
        return QuantizedLinear(self.q.to(torch.uint8).cpu().contiguous(), self.scale.to(torch.float16).cpu(),
                               self.zero.round().to(torch.int32).cpu(), self.bits, self.group_size, self.sym)


def _shard_dim(kind: str) -> int:
    if kind == COLUMN:
        return 0
    if kind == ROW:
        return 1
    raise ValueError(f"unknown shard kind {kind!r}; use {COLUMN!r} or {ROW!r}")


def check_shards(shape: tuple[int, ...], mp: int, kind: str, where: str = "a ternary weight") -> int:
    """The sharded dimension of a [out, in] weight, after checking that ``mp`` shards divide it."""
    dim = _shard_dim(kind)
    if len(shape) != 2:
        raise QuantlmError(f"{where} must be 2-D, got shape {tuple(shape)}")
    if mp <= 0 or shape[dim] % mp:
        raise QuantlmError(
            f"model_parallel={mp} does not divide dimension {dim} (size {shape[dim]}) of {where} ({kind} layer); "
            "choose an MP degree that divides the sharded width")
    return dim


def expand_scales(gamma: Tensor, shape: tuple[int, int], kind: str) -> Tensor:
    """Per-shard scales broadcast to a weight of ``shape`` (out, in)."""
    mp = gamma.numel()
    if _shard_dim(kind) == 0:
        return gamma.repeat_interleave(shape[0] // mp)[:, None].expand(shape)
    return gamma.repeat_interleave(shape[1] // mp)[None, :].expand(shape)


@dataclass(frozen=True)
class TernaryWeight:
    """gamma_s * W_t: int8 codes in {-1, 0, 1} [out, in], scales [mp] (one per shard), the shard kind."""

    codes: Tensor
    scales: Tensor
    kind: str

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def mp(self) -> int:
        return int(self.scales.numel())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense weight gamma_s * W_t (exact in the scales' dtype: each value is +-scale or 0)."""
        scales = expand_scales(self.scales.to(torch.float32), self.shape, self.kind)
        return (self.codes.to(torch.float32) * scales).to(dtype)

    @classmethod
    def from_dense(cls, weight: Tensor, mp: int, kind: str, where: str = "a weight") -> TernaryWeight:
        """Codes and per-shard scales of an unpacked ternary weight; an error if it is not gamma_s * {-1, 0, 1}."""
        dim = check_shards(tuple(weight.shape), mp, kind, where)
        codes = torch.sign(weight).to(torch.int8)
        scales = []
        for s, chunk in enumerate(weight.chunk(mp, dim=dim)):
            mags = chunk.abs()[chunk != 0].unique()
            if mags.numel() > 1:
                raise QuantlmError(f"shard {s} of {where} has {mags.numel()} distinct magnitudes; it is not an "
                                   "unpacked TriLM weight (or its pretraining_model_parallel is wrong)")
            scales.append(mags[0] if mags.numel() else torch.zeros((), dtype=weight.dtype))
        return cls(codes, torch.stack(scales), kind)
