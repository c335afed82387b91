"""quantlm's codes and scales laid out bit for bit as llama.cpp's GGUF block types.

No weight is re-quantized here: each encoder takes the integer codes and fp16 scales quantlm already has and
writes them into a block layout whose dequantization gives the same fp32 numbers.

* A :class:`~quantlm.quantized.QuantizedLinear` holds W = s * v with the integer v = q - zero. The "_0" types
  store d * v for one fp16 d per 32 weights: Q4_0 (v in [-8, 7]), Q5_0 ([-16, 15]), Q8_0 ([-128, 127]);
  so a symmetric b-bit code fits Q4_0 for b <= 4, Q5_0 for b = 5, Q8_0 for b <= 8, and an asymmetric one
  (v in [-(2^b - 1), 2^b - 1]) fits Q4_0 for b <= 3, Q5_0 for b = 4, Q8_0 for b <= 7. Groups must be
  multiples of 32 (or per channel) so each block has one scale. Q4_1 / Q5_1 store d * q + m: exact when
  m = -d * zero is itself an fp16 number (checked, never chosen automatically).
* The K types have 256-weight super-blocks of 16-weight sub-blocks, d_sub = d * sc with a small integer sc:
  Q6_K (v in [-32, 31], sc int8), Q3_K (v in [-4, 3], sc 6-bit signed) and Q2_K (q in [0, 3],
  d * sc * q - dmin * m, 4-bit sc and m). A super-block inside one group is exact (sc = 1, d = s); a grouped
  code (group smaller than 256) needs ``kquant_grouped=True``, which re-quantizes only the sub-block scales
  and reports the largest scale and weight change.
* A :class:`~quantlm.quantized.TernaryWeight` fits TQ2_0 / TQ1_0 (256 trits and one fp16 d) exactly where
  each 256-block lies in one scale shard (and Q4_0 / Q8_0 where each 32-block does); elsewhere
  ``merge_shard_scales=True`` gives a straddling block the least-squares common scale and reports the change.

Every encoder returns uint8 [out, bytes_per_row]; rows are independent, so permuting rows afterwards (as the
GGUF writer does for q and k) keeps the blocks valid. Imports only torch, numpy (for the bytes) and quantlm.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from quantlm.errors import QuantlmError
from quantlm.quantized import COLUMN, QuantizedLinear, TernaryWeight


@dataclass(frozen=True)
class GGMLType:
    """One ggml tensor type: ``block_size`` weights take ``type_size`` bytes."""

    name: str
    ggml_id: int  # the number GGUF stores (ggml_type)
    block_size: int
    type_size: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size


TYPES: dict[str, GGMLType] = {t.name: t for t in (
    GGMLType("F32", 0, 1, 4), GGMLType("F16", 1, 1, 2), GGMLType("BF16", 30, 1, 2),
    GGMLType("Q4_0", 2, 32, 18), GGMLType("Q4_1", 3, 32, 20), GGMLType("Q5_0", 6, 32, 22),
    GGMLType("Q5_1", 7, 32, 24), GGMLType("Q8_0", 8, 32, 34),
    GGMLType("Q2_K", 10, 256, 84), GGMLType("Q3_K", 11, 256, 110), GGMLType("Q6_K", 14, 256, 210),
    GGMLType("TQ1_0", 34, 256, 54), GGMLType("TQ2_0", 35, 256, 66),
)}
FLOAT_TYPES = ("F32", "F16", "BF16")
LINEAR_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q6_K")  # for QuantizedLinear
TERNARY_TYPES = ("TQ1_0", "TQ2_0", "Q4_0", "Q8_0")  # for TernaryWeight
K_TYPES = ("Q2_K", "Q3_K", "Q6_K")

# Types holding d * v, v = q - zero, as a signed integer in this range (d per block or d * sc per sub-block).
_SIGNED = {"Q4_0": (-8, 7), "Q5_0": (-16, 15), "Q8_0": (-128, 127), "Q6_K": (-32, 31), "Q3_K": (-4, 3)}
# Types holding the code q itself (q < 2**bits) with an offset: d * q + m (Q4_1, Q5_1), d*sc*q - dmin*m (Q2_K).
_UNSIGNED_BITS = {"Q4_1": 4, "Q5_1": 5, "Q2_K": 2}
# The sub-scale range of each K type: Q6_K int8, Q3_K 6-bit signed (stored + 32), Q2_K 4-bit unsigned.
_SUBSCALE = {"Q6_K": (-128, 127), "Q3_K": (-32, 31), "Q2_K": (0, 15)}
_ROW_CHUNK_ELEMS = 1 << 22  # rows encoded per step: bounds the temporaries of a large layer


def ggml_type(name: str) -> GGMLType:
    try:
        return TYPES[name]
    except KeyError:
        raise QuantlmError(f"unknown GGUF type {name!r}; use one of {', '.join(TYPES)}") from None


def bits_per_weight(type_name: str) -> float:
    """Storage bits per weight of a type: 8 * bytes per block / weights per block (Q4_0: 4.5, TQ1_0: 1.6875)."""
    return ggml_type(type_name).bits_per_weight


# Bits per weight of each block type's code field (the rest of a block is scales, offsets and sub-scales):
# TQ1_0 keeps 256 trits in 52 bytes (5 per byte, 4 in the last 16 bytes), TQ2_0 in 64.
CODE_FIELD_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q2_K": 2, "Q3_K": 3, "Q6_K": 6,
                   "TQ1_0": 52 * 8 / 256, "TQ2_0": 2}


def scale_bits_per_weight(type_name: str) -> float:
    """Bits per weight a block type spends beyond its code field (block scales, offsets, sub-block scales):
    0.5 for Q4_0 / Q5_0 / Q8_0, 0.5625 for Q6_K, 0.4375 for Q3_K, 0.625 for Q2_K, 0.0625 for TQ1_0 / TQ2_0."""
    if type_name in FLOAT_TYPES:
        return 0.0
    return bits_per_weight(type_name) - CODE_FIELD_BITS[ggml_type(type_name).name]


def shaped(shape: tuple[int, int], *, bits: int | None = None, sym: bool = True, group_size: int = -1, mp: int = 1,
           kind: str = COLUMN) -> QuantizedLinear | TernaryWeight:
    """A weight with a shape and a recipe but no data (meta tensors): all that :func:`choose_type`,
    :func:`working_types` and :func:`check_fits` read, so a file's types follow from a config and a recipe.
    ``bits`` None: a TriLM weight with ``mp`` scale shards of ``kind``; else a b-bit QuantizedLinear."""
    out, in_features = shape
    if bits is None:
        return TernaryWeight(torch.empty(shape, dtype=torch.int8, device="meta"),
                             torch.empty(mp, dtype=torch.float16, device="meta"), kind)
    groups = 1 if group_size == -1 else -(-in_features // group_size)
    return QuantizedLinear(torch.empty(shape, dtype=torch.uint8, device="meta"),
                           torch.empty(out, groups, dtype=torch.float16, device="meta"),
                           torch.empty(out, groups, dtype=torch.int32, device="meta"), bits, group_size, sym)


def bytes_per_row(type_name: str, in_features: int, name: str = "a tensor") -> int:
    """Bytes of one row of ``in_features`` weights; an error if the row is not a whole number of blocks."""
    t = ggml_type(type_name)
    if in_features % t.block_size:
        raise QuantlmError(f"{name}: {t.name} needs rows that are a multiple of {t.block_size} weights, "
                           f"but the row is {in_features} wide")
    return in_features // t.block_size * t.type_size


@dataclass(frozen=True)
class Encoded:
    """The blocks of one weight and what encoding it changed (nothing, when ``exact``).

    scale_error: the largest |d_stored - s| over the scales (absolute, in weight units per code step);
    weight_error: the largest |W_gguf - W| over the weights. Both 0.0 when exact.
    """

    type: str
    data: np.ndarray  # uint8 [out, bytes_per_row]
    exact: bool
    scale_error: float = 0.0
    weight_error: float = 0.0
    changed_blocks: int = 0  # blocks whose scales were re-quantized or merged
    note: str = ""


# ---------------------------------------------------------------------------------------------------------
# Which types can hold a weight (static: from bits, symmetry, group size, width and shards, never the data)


def _value_range(bits: int, sym: bool) -> tuple[int, int]:
    """Range of v = q - zero: symmetric codes have zero = 2**(bits-1); asymmetric ones any zero in [0, 2**b)."""
    if sym:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return -((1 << bits) - 1), (1 << bits) - 1


def _linear_misfit(type_name: str, bits: int, sym: bool, group_size: int, in_features: int,
                   kquant_grouped: bool = False) -> str | None:
    """Why a QuantizedLinear of this shape cannot be stored exactly as ``type_name`` (None: it can)."""
    if type_name in FLOAT_TYPES:
        return None
    if type_name not in LINEAR_TYPES:
        return f"{type_name} holds ternary weights only"
    t = TYPES[type_name]
    if in_features % t.block_size:
        return f"rows must be a multiple of {t.block_size} weights, and this one is {in_features} wide"
    if type_name in _SIGNED:
        lo, hi = _SIGNED[type_name]
        vlo, vhi = _value_range(bits, sym)
        if vlo < lo or vhi > hi:
            kind = "symmetric" if sym else "asymmetric"
            return f"{kind} {bits}-bit codes span q - zero in [{vlo}, {vhi}], beyond its [{lo}, {hi}]"
    else:
        if bits > _UNSIGNED_BITS[type_name]:
            return f"it stores codes of at most {_UNSIGNED_BITS[type_name]} bits, not {bits}"
    if group_size == -1:
        return None
    if type_name in K_TYPES:
        if group_size % 256 == 0:
            return None
        if group_size % 16:
            return f"group size {group_size} is not a multiple of its 16-weight sub-blocks"
        if not kquant_grouped:
            return (f"group size {group_size} gives each 256-weight super-block several scales, which it holds "
                    "only with re-quantized sub-block scales (kquant_grouped=True)")
        return None
    if group_size % t.block_size:
        return f"group size {group_size} is not a multiple of its {t.block_size}-weight blocks"
    return None


def _ternary_misfit(type_name: str, tw: TernaryWeight, merge_shard_scales: bool = False) -> str | None:
    if type_name in FLOAT_TYPES:
        return None
    if type_name not in TERNARY_TYPES:
        return f"{type_name} holds integer GPTQ codes with their own layout; a ternary weight fits {', '.join(TERNARY_TYPES)}"
    bs = TYPES[type_name].block_size
    out_f, in_f = tw.shape
    if in_f % bs:
        return f"rows must be a multiple of {bs} weights, and this one is {in_f} wide"
    if tw.kind != COLUMN and tw.mp > 1 and (in_f // tw.mp) % bs and not merge_shard_scales:
        return (f"its {tw.mp} row-parallel scale shards are {in_f // tw.mp} weights wide, not a multiple of {bs}, so "
                "blocks straddle two scales")
    return None


def _order(types) -> list[str]:
    return sorted(types, key=lambda n: TYPES[n].bits_per_weight)


def working_types(w: QuantizedLinear | TernaryWeight, *, kquant_grouped: bool = False,
                  merge_shard_scales: bool = False) -> list[str]:
    """The quantized types that hold ``w`` exactly (or with the named opt-in), smallest first.

    Q4_1/Q5_1 are listed for codes they can hold; whether their offset is exact depends on the scales.
    """
    if isinstance(w, TernaryWeight):
        return _order(t for t in TERNARY_TYPES if _ternary_misfit(t, w, merge_shard_scales) is None)
    return _order(t for t in LINEAR_TYPES
                  if _linear_misfit(t, w.bits, w.sym, w.group_size, w.shape[1], kquant_grouped) is None)


def _alternatives(w, kquant_grouped, merge_shard_scales) -> str:
    exact = working_types(w, kquant_grouped=kquant_grouped, merge_shard_scales=merge_shard_scales)
    offset_note = isinstance(w, QuantizedLinear) and not w.sym
    opts = [f"{t} (if -scale * zero is an fp16 number)" if offset_note and t in ("Q4_1", "Q5_1") else t
            for t in exact]
    if isinstance(w, QuantizedLinear) and not kquant_grouped:
        opts += [f"{t} with kquant_grouped=True" for t in working_types(w, kquant_grouped=True) if t not in exact]
    if isinstance(w, TernaryWeight) and not merge_shard_scales:
        opts += [f"{t} with merge_shard_scales=True" for t in working_types(w, merge_shard_scales=True)
                 if t not in exact]
    opts += ["F16 (the dequantized weights, fp16-rounded)" if isinstance(w, QuantizedLinear) else "F16", "F32"]
    return ", ".join(opts)


def choose_type(w: QuantizedLinear | TernaryWeight, *, kquant_grouped: bool = False,
                merge_shard_scales: bool = False, name: str = "layer") -> str:
    """The smallest type that holds ``w`` exactly, decided from its shape and recipe alone (not its values).

    QuantizedLinear: Q4_0 for <= 4-bit symmetric codes, Q5_0 for 5 bits, Q8_0 for 6..8, unless a per-channel
    (or 256-multiple group) 6/3/2-bit code fits Q6_K/Q3_K/Q2_K, which are smaller; with ``kquant_grouped`` the
    K types are also taken for grouped codes (scales re-quantized). Asymmetric codes take the signed type that
    holds q - zero (Q4_0 up to 3 bits, Q5_0 at 4, Q8_0 up to 7, Q6_K for per-channel 5-bit, Q2_K for 2-bit
    per channel); 8-bit asymmetric codes have no exact home. Q4_1/Q5_1 are never chosen: whether they are
    exact depends on the scales. TernaryWeight: TQ1_0, or an error naming the options when blocks straddle
    scale shards.
    """
    if isinstance(w, TernaryWeight):
        why = _ternary_misfit("TQ1_0", w, merge_shard_scales)
        if why is None:
            return "TQ1_0"
        raise QuantlmError(f"{name}: TQ1_0 cannot hold this ternary weight ({why}); types that would work: "
                           f"{_alternatives(w, kquant_grouped, merge_shard_scales)}")
    fits = [t for t in working_types(w, kquant_grouped=kquant_grouped) if t not in _UNSIGNED_BITS or t == "Q2_K"]
    if fits:
        return fits[0]
    reasons = "; ".join(f"{t}: {_linear_misfit(t, w.bits, w.sym, w.group_size, w.shape[1], kquant_grouped)}"
                        for t in ("Q4_0", "Q5_0", "Q8_0"))
    kind = "symmetric" if w.sym else "asymmetric"
    raise QuantlmError(f"{name}: no GGUF block type holds this {kind} {w.bits}-bit code (group size {w.group_size}, "
                       f"width {w.shape[1]}) exactly ({reasons}); types that would work: "
                       f"{_alternatives(w, kquant_grouped, merge_shard_scales)}"
                       + ("; or re-quantize with sym: true or at most 7 bits" if not w.sym else ""))


def check_fits(w: QuantizedLinear | TernaryWeight, type_name: str, *, name: str = "layer",
               kquant_grouped: bool = False, merge_shard_scales: bool = False) -> None:
    """The error :func:`encode` raises when ``type_name`` cannot hold ``w`` exactly (with the named opt-ins),
    naming the layer, the reason and the types that would work; decided from shape and recipe alone."""
    ggml_type(type_name)
    if type_name in FLOAT_TYPES:
        return
    if isinstance(w, TernaryWeight):
        why = _ternary_misfit(type_name, w, merge_shard_scales)
        if why is not None:
            raise QuantlmError(f"{name}: {type_name} cannot hold this ternary weight exactly: {why}; types that "
                               f"would work: {_alternatives(w, False, merge_shard_scales)}")
        return
    why = _linear_misfit(type_name, w.bits, w.sym, w.group_size, w.shape[1], kquant_grouped)
    if why is not None:
        raise QuantlmError(f"{name}: {type_name} cannot hold this {'symmetric' if w.sym else 'asymmetric'} "
                           f"{w.bits}-bit code (group size {w.group_size}) exactly: {why}; types that would work: "
                           f"{_alternatives(w, kquant_grouped, False)}")


# ---------------------------------------------------------------------------------------------------------
# The block layouts. Inputs: integer tensors [R, n] (int32) and fp16 scales per block; output uint8 [R, bytes].


def _half_bytes(d: Tensor) -> Tensor:
    """fp16 values as their 2 little-endian bytes: [..., 2] uint8."""
    return d.to(torch.float16).reshape(-1).clone().view(torch.uint8).reshape(*d.shape, 2)


def _pack_bits(x: Tensor, width: int) -> Tensor:
    """Fields of ``width`` bits along the second-last axis [..., 8 // width, m] -> bytes [..., m], field j at bit width*j."""
    shifts = torch.arange(0, 8, width, dtype=torch.int32).view(-1, 1)
    return (x.to(torch.int32) << shifts).sum(dim=-2).to(torch.uint8)


def _blocks(x: Tensor, size: int) -> Tensor:
    return x.reshape(x.shape[0], -1, size)


def pack_q4_0(v: Tensor, d: Tensor) -> Tensor:
    """Q4_0: per 32 weights, fp16 d then 16 bytes; byte i holds weight i (low nibble) and i + 16 (high), as v + 8."""
    u = _blocks(v + 8, 32)
    qs = (u[..., :16] | (u[..., 16:] << 4)).to(torch.uint8)
    return torch.cat([_half_bytes(d), qs], dim=-1).reshape(v.shape[0], -1)


def pack_q4_1(q: Tensor, d: Tensor, m: Tensor) -> Tensor:
    """Q4_1: fp16 d, fp16 m, then the 4-bit q nibbles as in Q4_0; value d * q + m."""
    u = _blocks(q, 32)
    qs = (u[..., :16] | (u[..., 16:] << 4)).to(torch.uint8)
    return torch.cat([_half_bytes(d), _half_bytes(m), qs], dim=-1).reshape(q.shape[0], -1)


def _fifth_bits(u: Tensor) -> Tensor:
    """Bit 4 of each of the 32 values of a block, as a little-endian uint32 (4 bytes): bit j for weight j."""
    return _pack_bits(((u >> 4) & 1).reshape(*u.shape[:-1], 4, 8).transpose(-1, -2), 1)


def pack_q5_0(v: Tensor, d: Tensor) -> Tensor:
    """Q5_0: fp16 d, 4 bytes of fifth bits, 16 bytes of low nibbles (as Q4_0); value d * (u - 16), u = v + 16."""
    u = _blocks(v + 16, 32)
    qs = ((u[..., :16] & 15) | ((u[..., 16:] & 15) << 4)).to(torch.uint8)
    return torch.cat([_half_bytes(d), _fifth_bits(u), qs], dim=-1).reshape(v.shape[0], -1)


def pack_q5_1(q: Tensor, d: Tensor, m: Tensor) -> Tensor:
    """Q5_1: fp16 d, fp16 m, fifth bits, low nibbles; value d * q + m."""
    u = _blocks(q, 32)
    qs = ((u[..., :16] & 15) | ((u[..., 16:] & 15) << 4)).to(torch.uint8)
    return torch.cat([_half_bytes(d), _half_bytes(m), _fifth_bits(u), qs], dim=-1).reshape(q.shape[0], -1)


def pack_q8_0(v: Tensor, d: Tensor) -> Tensor:
    """Q8_0: fp16 d, then 32 int8 values."""
    qs = (_blocks(v, 32) & 0xFF).to(torch.uint8)
    return torch.cat([_half_bytes(d), qs], dim=-1).reshape(v.shape[0], -1)


def _crumbs(u: Tensor) -> Tensor:
    """2-bit fields of a 256-block, 64 bytes: weight 128h + 32k + b sits in byte 32h + b at bit 2k."""
    return _pack_bits(u.reshape(*u.shape[:-1], 2, 4, 32), 2).reshape(*u.shape[:-1], 64)


def pack_q6_k(v: Tensor, sc: Tensor, d: Tensor) -> Tensor:
    """Q6_K: per 256 weights, ql[128], qh[64], int8 scales[16], fp16 d; value d * sc[j // 16] * (u - 32).

    Weight 128h + r (u = v + 32): low nibble in ql byte 64h + r % 64 (high half of the byte when r >= 64);
    top two bits in qh byte 32h + r % 32 at bit 2 * (r // 32).
    """
    u = _blocks(v + 32, 256).reshape(v.shape[0], -1, 2, 128)
    lo = u & 15
    ql = (lo[..., :64] | (lo[..., 64:] << 4)).to(torch.uint8).reshape(*u.shape[:2], 128)
    qh = _pack_bits(((u >> 4) & 3).reshape(*u.shape[:3], 4, 32), 2).reshape(*u.shape[:2], 64)
    scales = (sc.reshape(*u.shape[:2], 16) & 0xFF).to(torch.uint8)
    return torch.cat([ql, qh, scales, _half_bytes(d)], dim=-1).reshape(v.shape[0], -1)


def pack_q3_k(v: Tensor, sc: Tensor, d: Tensor) -> Tensor:
    """Q3_K: per 256 weights, hmask[32], qs[64], scales[12], fp16 d; value d * sc[j // 16] * v, v in [-4, 3].

    Weight j: its low two bits (v & 3) in qs like Q2_K; hmask byte j % 32, bit j // 32, set when v >= 0 (the
    stored value subtracts 4 where the bit is clear). Sub-scales s = sc + 32 (6 bits): low nibbles of s[i]
    and s[i + 8] share byte i (i < 8); the top two bits of s[4k + b] are at bit 2k of byte 8 + b.
    """
    b = _blocks(v, 256)
    hm = _pack_bits((b >= 0).reshape(*b.shape[:2], 8, 32), 1)
    qs = _crumbs(b & 3)
    s = sc.reshape(*b.shape[:2], 16) + 32
    low = ((s[..., :8] & 15) | ((s[..., 8:] & 15) << 4)).to(torch.uint8)
    high = _pack_bits(((s >> 4) & 3).reshape(*b.shape[:2], 4, 4), 2)
    return torch.cat([hm, qs, low, high, _half_bytes(d)], dim=-1).reshape(v.shape[0], -1)


def pack_q2_k(q: Tensor, sc: Tensor, m: Tensor, d: Tensor, dmin: Tensor) -> Tensor:
    """Q2_K: per 256 weights, scales[16] (sc | m << 4), qs[64], fp16 d, fp16 dmin; value d*sc*q - dmin*m."""
    b = _blocks(q, 256)
    scales = (sc.reshape(*b.shape[:2], 16) | (m.reshape(*b.shape[:2], 16) << 4)).to(torch.uint8)
    return torch.cat([scales, _crumbs(b), _half_bytes(d), _half_bytes(dmin)], dim=-1).reshape(q.shape[0], -1)


def pack_tq2_0(t: Tensor, d: Tensor) -> Tensor:
    """TQ2_0: per 256 trits, 64 bytes of 2-bit t + 1 (the Q2_K order), then fp16 d; value d * t."""
    return torch.cat([_crumbs(_blocks(t + 1, 256)), _half_bytes(d)], dim=-1).reshape(t.shape[0], -1)


_POW3 = torch.tensor([81, 27, 9, 3, 1], dtype=torch.int32)


def _trit_bytes(u: Tensor) -> Tensor:
    """Five trits [..., 5, m] (first most significant) -> bytes [..., m]: ceil(n * 256 / 243), n their base-3 value.

    The byte is the fixed-point fraction n / 243 rounded up, so the decoder reads trit k as the top trit of
    byte * 3**k (mod 256), i.e. ((byte * 3**k) % 256 * 3) >> 8.
    """
    n = (u * _POW3.view(-1, 1)).sum(dim=-2)
    return ((n * 256 + 242) // 243).to(torch.uint8)


def pack_tq1_0(t: Tensor, d: Tensor) -> Tensor:
    """TQ1_0: per 256 trits, 48 + 4 bytes of base-3 fractions, then fp16 d; value d * t.

    Trits 0..159: byte i < 32 holds trits i, 32 + i, ..., 128 + i; trits 160..239: byte 32 + i holds
    160 + i, 176 + i, ..., 224 + i; trits 240..255: byte 48 + i holds 240 + i, 244 + i, 248 + i, 252 + i
    (and a fifth trit 0).
    """
    u = _blocks(t + 1, 256)
    R, nb = u.shape[:2]
    a = _trit_bytes(u[..., :160].reshape(R, nb, 5, 32))
    b = _trit_bytes(u[..., 160:240].reshape(R, nb, 5, 16))
    tail = torch.cat([u[..., 240:].reshape(R, nb, 4, 4), torch.zeros(R, nb, 1, 4, dtype=u.dtype)], dim=-2)
    return torch.cat([a, b, _trit_bytes(tail), _half_bytes(d)], dim=-1).reshape(t.shape[0], -1)


# ---------------------------------------------------------------------------------------------------------
# From quantlm's values to the layouts


def _row_chunks(rows: int, cols: int):
    step = max(1, _ROW_CHUNK_ELEMS // max(cols, 1))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _requantize_subscales(s: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """One fp16 d and integer sc in [lo, hi] per row of sub-block scales s [N, 16], minimising max |d*sc - s|.

    Rows whose scales are all equal get the exact d = s, sc = 1. The others try d = amax / k for the upper half
    of the integer range (k from hi // 2 to hi) and keep the best.
    """
    amax = s.abs().amax(dim=-1)
    best_err = torch.full_like(amax, float("inf"))
    best_d = torch.zeros_like(amax)
    best_sc = torch.zeros(s.shape, dtype=torch.int32)
    for k in range(max(1, hi // 2), hi + 1):
        d = (amax / k).to(torch.float16).to(torch.float32)
        safe = torch.where(d == 0, torch.ones_like(d), d)
        sc = torch.round(s / safe[:, None]).clamp(lo, hi).to(torch.int32)
        err = (d[:, None] * sc.to(torch.float32) - s).abs().amax(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_d = torch.where(better, d, best_d)
        best_sc = torch.where(better[:, None], sc, best_sc)
    uniform = (s == s[:, :1]).all(dim=-1)
    best_d = torch.where(uniform, s[:, 0], best_d)
    best_sc = torch.where(uniform[:, None], torch.ones_like(best_sc), best_sc)
    return best_d, best_sc


class _Errors:
    def __init__(self):
        self.scale = 0.0
        self.weight = 0.0
        self.blocks = 0

    def add(self, scale_err: Tensor, weight_err: Tensor, changed: Tensor) -> None:
        if scale_err.numel():
            self.scale = max(self.scale, float(scale_err.max()))
        if weight_err.numel():
            self.weight = max(self.weight, float(weight_err.max()))
        self.blocks += int(changed.sum())


def _encode_linear(lin: QuantizedLinear, type_name: str, name: str, kquant_grouped: bool) -> Encoded:
    check_fits(lin, type_name, name=name, kquant_grouped=kquant_grouped)
    lin = lin.stored(name)
    rows, cols = lin.shape
    g = lin.group_index().long()
    errors = _Errors()
    parts = []
    for r0, r1 in _row_chunks(rows, cols):
        q = lin.q[r0:r1].to(torch.int32)
        z = lin.zero[r0:r1][:, g]
        s = lin.scale[r0:r1].to(torch.float32)[:, g]  # fp16 values, per weight
        v = q - z
        if type_name in _SIGNED:
            lo, hi = _SIGNED[type_name]
            if v.numel() and (int(v.min()) < lo or int(v.max()) > hi):
                raise QuantlmError(f"{name}: q - zero leaves [{lo}, {hi}] for {type_name}; its zero points are "
                                   f"outside [0, 2**{lin.bits}), which no quantlm code has")
        if type_name in ("Q4_0", "Q5_0", "Q8_0"):
            d = _blocks(s, 32)[..., 0]
            parts.append({"Q4_0": pack_q4_0, "Q5_0": pack_q5_0, "Q8_0": pack_q8_0}[type_name](v, d))
        elif type_name in ("Q4_1", "Q5_1"):
            d = _blocks(s, 32)[..., 0]
            zb = _blocks(z, 32)[..., 0].to(torch.float32)
            m = (-d * zb).to(torch.float16)
            bad = m.to(torch.float32) != -d * zb
            if bool(bad.any()):
                alt = "Q5_0" if lin.bits <= 4 else "Q8_0"
                raise QuantlmError(f"{name}: {type_name} is not exact here: its offset m = -scale * zero is not an "
                                   f"fp16 number in {int(bad.sum())} of {bad.numel()} blocks; use {alt} (exact for "
                                   f"this code) or F32")
            parts.append((pack_q4_1 if type_name == "Q4_1" else pack_q5_1)(q, d, m))
        else:
            parts.append(_encode_kquant(type_name, q, v, z, s, errors, kquant_grouped))
    data = torch.cat(parts, dim=0) if parts else torch.zeros(0, bytes_per_row(type_name, cols), dtype=torch.uint8)
    exact = errors.blocks == 0 or (errors.scale == 0.0 and errors.weight == 0.0)
    note = "" if errors.blocks == 0 else (f"{errors.blocks} super-blocks with re-quantized sub-block scales")
    return Encoded(type_name, data.numpy(), exact, errors.scale, errors.weight, errors.blocks, note)


def _encode_kquant(type_name: str, q: Tensor, v: Tensor, z: Tensor, s: Tensor, errors: _Errors,
                   kquant_grouped: bool) -> Tensor:
    R = q.shape[0]
    sub = s.reshape(R, -1, 16, 16)[..., 0].reshape(-1, 16)  # [N super-blocks, 16 sub-block scales]
    uniform = (sub == sub[:, :1]).all(dim=-1)
    if not kquant_grouped and not bool(uniform.all()):
        raise QuantlmError(f"{type_name}: a super-block holds several scales; pass kquant_grouped=True")
    lo, hi = _SUBSCALE[type_name]
    if type_name == "Q2_K" and bool((sub < 0).any()):
        raise QuantlmError("Q2_K stores unsigned sub-block scales; this layer has negative scales: use Q4_0")
    d, sc = _requantize_subscales(sub, lo, hi)
    eff = d[:, None] * sc.to(torch.float32)  # the sub-block scales the file holds, [N, 16]
    if type_name == "Q2_K":
        zsub = z.reshape(R, -1, 16, 16)[..., 0].reshape(-1, 16).to(torch.float32)
        # exact super-blocks: dmin = s, m = zero; elsewhere keep the offset a multiple of the new scale when the
        # zero is constant (dmin = zero * d, m = sc: a symmetric code's zero stays exactly 0), else quantize it too
        zconst = (zsub == zsub[:, :1]).all(dim=-1)
        dmin_ratio = (zsub[:, 0] * d).to(torch.float16).to(torch.float32)
        dmin_free, m_free = _requantize_subscales(eff * zsub, 0, 15)
        dmin = torch.where(uniform, d, torch.where(zconst, dmin_ratio, dmin_free))
        m = torch.where(uniform[:, None], zsub.to(torch.int32),
                        torch.where(zconst[:, None], sc, m_free))
        offset = dmin[:, None] * m.to(torch.float32)
        qf = q.reshape(-1, 16, 16).to(torch.float32)
        new_w = eff.reshape(-1, 16, 1) * qf - offset.reshape(-1, 16, 1)
        old_w = (sub.reshape(-1, 16, 1) * (qf - zsub.reshape(-1, 16, 1)))
        errors.add((eff - sub).abs(), (new_w - old_w).abs(), ~uniform)
        shape = (R, -1)
        return pack_q2_k(q, sc.reshape(shape), m.reshape(shape), d.reshape(shape), dmin.reshape(shape))
    vmax = v.reshape(-1, 16, 16).abs().amax(dim=-1).to(torch.float32)
    errors.add((eff - sub).abs(), (eff - sub).abs() * vmax, ~uniform)
    pack = pack_q6_k if type_name == "Q6_K" else pack_q3_k
    return pack(v, sc.reshape(R, -1), d.reshape(R, -1))


def _encode_ternary(tw: TernaryWeight, type_name: str, name: str, merge_shard_scales: bool) -> Encoded:
    check_fits(tw, type_name, name=name, merge_shard_scales=merge_shard_scales)
    rows, cols = tw.shape
    bs = TYPES[type_name].block_size
    scales16 = tw.scales.to(torch.float16)
    rounding = float((scales16.to(torch.float32) - tw.scales.to(torch.float32)).abs().max()) if tw.mp else 0.0
    errors = _Errors()
    parts = []
    shard_w = cols // tw.mp
    for r0, r1 in _row_chunks(rows, cols):
        t = tw.codes[r0:r1].to(torch.int32)
        if t.numel() and (int(t.min()) < -1 or int(t.max()) > 1):
            raise QuantlmError(f"{name}: ternary codes must be -1, 0 or 1")
        if tw.kind == COLUMN:
            s = scales16.to(torch.float32).repeat_interleave(rows // tw.mp)[r0:r1, None].expand(r1 - r0, cols)
        else:
            s = scales16.to(torch.float32).repeat_interleave(shard_w)[None, :].expand(r1 - r0, cols)
        sb = _blocks(s, bs)
        d = sb[..., 0]
        straddle = (sb != d[..., None]).any(dim=-1)
        if bool(straddle.any()):  # only with merge_shard_scales (checked above)
            nz = _blocks(t, bs).abs().to(torch.float32)
            count = nz.sum(dim=-1)
            merged = torch.where(count > 0, (nz * sb).sum(dim=-1) / count.clamp(min=1), d).to(torch.float16)
            d = torch.where(straddle, merged.to(torch.float32), d)
            diff = (sb - d[..., None]).abs()
            errors.add(diff[straddle], (diff * nz)[straddle], straddle)
        if type_name == "TQ1_0":
            parts.append(pack_tq1_0(t, d))
        elif type_name == "TQ2_0":
            parts.append(pack_tq2_0(t, d))
        elif type_name == "Q4_0":
            parts.append(pack_q4_0(t, d))
        else:
            parts.append(pack_q8_0(t, d))
    data = torch.cat(parts, dim=0) if parts else torch.zeros(0, bytes_per_row(type_name, cols), dtype=torch.uint8)
    notes = []
    if errors.blocks:
        notes.append(f"{errors.blocks} blocks straddling scale shards got one merged scale")
    if rounding:
        notes.append(f"scales rounded to fp16 (largest change {rounding:.3g})")
    scale_err = max(errors.scale, rounding)
    weight_err = max(errors.weight, rounding)
    return Encoded(type_name, data.numpy(), scale_err == 0.0 and weight_err == 0.0, scale_err, weight_err,
                   errors.blocks, "; ".join(notes))


def encode(w: QuantizedLinear | TernaryWeight, type_name: str | None = None, *, name: str = "layer",
           kquant_grouped: bool = False, merge_shard_scales: bool = False) -> Encoded:
    """The GGUF blocks of one quantized weight, uint8 [out, bytes_per_row(type, in)], in type ``type_name``.

    ``None`` picks :func:`choose_type`. A type that cannot hold the weight exactly is a ``QuantlmError``
    naming the layer, the reason and the types that would work, unless the matching opt-in is given:
    ``kquant_grouped`` (K types for grouped codes: sub-block scales re-quantized) or ``merge_shard_scales``
    (TQ / Q4_0 / Q8_0 blocks straddling two ternary scale shards get one least-squares scale). The result
    says whether anything changed and by how much at most. Scales are taken in fp16, as every quantlm
    format stores them (``QuantizedLinear.stored``).
    """
    if sys.byteorder != "little":
        raise QuantlmError("GGUF blocks are written little-endian; this machine is big-endian")
    if type_name is None:
        type_name = choose_type(w, kquant_grouped=kquant_grouped, merge_shard_scales=merge_shard_scales, name=name)
    ggml_type(type_name)
    if type_name in FLOAT_TYPES:
        raise QuantlmError(f"{name}: {type_name} is a float type; write the dequantized weight instead of blocks")
    if isinstance(w, TernaryWeight):
        return _encode_ternary(w, type_name, name, merge_shard_scales)
    if isinstance(w, QuantizedLinear):
        return _encode_linear(w, type_name, name, kquant_grouped)
    raise TypeError(f"{name}: expected a QuantizedLinear or TernaryWeight, got {type(w).__name__}")
