"""Packed TriLM formats: ternary codes at 2 bits (``ternary-2``, 4 per byte) or 1.6 bits (``ternary-1.6``, 5 trits
per byte, base 3), with one fp16 scale per model-parallel shard.

Per block linear ``L`` (``out`` x ``in``): ``L.weight_trits`` uint8 ``[out, ceil(in / per_byte)]`` (each row packed
on its own, padded with zero trits) and ``L.weight_scale`` fp16 ``[mp]``; config.json gets
``quantization_config = {quant_method: quantlm-ternary, format, model_parallel}``. Decoding gives back the
unpacked TriLM bit for bit.

Code mapping: trit t = W_t + 1 in {0, 1, 2}. 2-bit: byte = t0 | t1 << 2 | t2 << 4 | t3 << 6.
Base 3: byte = t0 + 3 t1 + 9 t2 + 27 t3 + 81 t4 (at most 242). The pack/unpack functions import only torch.
"""

from __future__ import annotations

import torch

from quantlm.errors import QuantlmError
from quantlm.formats.registry import LOG2_3, Format, Layout, TensorSpec, as_ternary, register
from quantlm.quantized import TernaryWeight, check_shards

SCHEMES = {"2bit": 4, "base3": 5}  # trits per byte
QUANT_METHOD = "quantlm-ternary"
_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)
_SHIFT2 = torch.tensor([0, 2, 4, 6], dtype=torch.int32)


def _check_scheme(scheme: str) -> int:
    if scheme not in SCHEMES:
        raise QuantlmError(f"unknown ternary scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    return SCHEMES[scheme]


def pack_codes(codes: torch.Tensor, scheme: str = "2bit") -> torch.Tensor:
    """uint8 bytes holding the ternary ``codes`` (values -1, 0, 1) along the last dimension, padded with zeros."""
    per = _check_scheme(scheme)
    t = codes.to(torch.int32) + 1
    if t.numel() and (t.min() < 0 or t.max() > 2):
        raise QuantlmError("ternary codes must be -1, 0 or 1")
    pad = (-t.shape[-1]) % per
    t = torch.nn.functional.pad(t, (0, pad), value=1).view(*t.shape[:-1], -1, per)
    packed = (t << _SHIFT2).sum(-1) if scheme == "2bit" else (t * _POW3).sum(-1)
    return packed.to(torch.uint8)


def unpack_codes(packed: torch.Tensor, n: int, scheme: str = "2bit") -> torch.Tensor:
    """int8 codes (-1, 0, 1), ``n`` along the last dimension, from :func:`pack_codes` bytes."""
    _check_scheme(scheme)
    b = packed.to(torch.int32)[..., None]
    t = (b >> _SHIFT2) & 3 if scheme == "2bit" else (b // _POW3) % 3
    return (t.flatten(-2)[..., :n] - 1).to(torch.int8)


class Ternary(Format):
    families = ("trilm",)

    def __init__(self, name: str, scheme: str):
        self.name, self.scheme = name, scheme
        self.per_byte = SCHEMES[scheme]

    def describe(self, layout):
        return f"{self.per_byte} trits per byte ({8 / self.per_byte:g} bits/weight), fp16 per-shard scales"

    def linear_tensors(self, out, in_features, layout, kind):
        return [
            TensorSpec(".weight_trits", "U8", (out, -(-in_features // self.per_byte)), "codes", out * in_features,
                       LOG2_3),
            TensorSpec(".weight_scale", layout.scale_dtype, (layout.mp,), "scale"),
        ]

    def encode(self, name, value, layout):
        w = as_ternary(value, name)
        if w.mp != layout.mp:
            raise QuantlmError(f"{name}: {w.mp} scale shards, but the checkpoint declares model_parallel={layout.mp}")
        return {name + ".weight_trits": pack_codes(w.codes, self.scheme),
                name + ".weight_scale": w.scales.to(torch.float16).reshape(layout.mp)}

    def decode(self, read, name, out, in_features, layout, kind):
        check_shards((out, in_features), layout.mp, kind, name)
        codes = unpack_codes(read(name + ".weight_trits"), in_features, self.scheme)
        if tuple(codes.shape) != (out, in_features):
            raise QuantlmError(f"{name}: packed trits of shape {list(codes.shape)} do not fit [{out}, {in_features}]")
        return TernaryWeight(codes, read(name + ".weight_scale"), kind)

    def quantization_config(self, layout, recipe):
        return {"quant_method": QUANT_METHOD, "format": self.name, "model_parallel": layout.mp}

    def claims(self, config):
        qc = config.get("quantization_config") or {}
        return qc.get("quant_method") == QUANT_METHOD and qc.get("format") == self.name

    def layout_from_config(self, config):
        qc = config["quantization_config"]
        return Layout("trilm", self.name, mp=int(qc.get("model_parallel") or config.get("pretraining_model_parallel")
                                                  or 1))


TERNARY_16 = register(Ternary("ternary-1.6", "base3"))
TERNARY_2 = register(Ternary("ternary-2", "2bit"))
SCHEME_FORMATS = {"base3": "ternary-1.6", "2bit": "ternary-2"}
