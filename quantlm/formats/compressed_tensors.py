"""``compressed-tensors``: the ``pack-quantized`` layout (transformers with compressed-tensors, vLLM), 2..8 bits.

Per quantized linear ``L``: ``L.weight_packed`` int32 ``[out, ceil(in*b/32)]`` (codes as a little-endian bit
stream along the input dimension, the same words as the GPTQ ``qweight`` transposed), ``L.weight_scale``
fp16 ``[out, G]``, ``L.weight_shape`` int64 ``[2]``, and for an asymmetric grid ``L.weight_zero_point`` int32
``[ceil(out*b/32), G]`` packed along the output dimension. compressed-tensors reads codes and zero points
as signed values offset by 2**(b-1); as unsigned codes that is exactly W = scale * (q - zero). Written
with torch alone, so the compressed-tensors library is needed only to load the result elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import torch

from quantlm.formats.common import (
    StoredLinear,
    write_checkpoint,
)
from quantlm.gptq.packing import pack_bits, unpack_bits

COMPRESSED_TENSORS_VERSION = "0.20.0"  # the version whose layout this writer follows (tested in interop)


def ct_tensors(name: str, lin: StoredLinear) -> dict[str, torch.Tensor]:
    tensors = {
        f"{name}.weight_packed": pack_bits(lin.q, lin.bits, dim=1),
        f"{name}.weight_scale": lin.scale.contiguous(),
        f"{name}.weight_shape": torch.tensor(lin.shape, dtype=torch.int64),
    }
    if not lin.sym:
        tensors[f"{name}.weight_zero_point"] = pack_bits(lin.zero, lin.bits, dim=0)
    return tensors


def read_ct_tensors(tensors: dict[str, torch.Tensor], name: str, bits: int, sym: bool):
    """Codes [out, in] uint8, fp16 scales [out, G], zeros [out, G] int32 of one layer."""
    out, in_features = (int(v) for v in tensors[f"{name}.weight_shape"].tolist())
    q = unpack_bits(tensors[f"{name}.weight_packed"], bits, in_features, dim=1)
    scale = tensors[f"{name}.weight_scale"]
    if sym:
        zeros = torch.full(scale.shape, 1 << (bits - 1), dtype=torch.int32)
    else:
        zeros = unpack_bits(tensors[f"{name}.weight_zero_point"], bits, out, dim=0).to(torch.int32)
    return q, scale, zeros


def quantization_config(bits: int, group_size: int, sym: bool, act_order: bool) -> dict:
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": sym,
        "strategy": "channel" if group_size == -1 else "group",
        "group_size": None if group_size == -1 else group_size,
        "dynamic": False,
        "actorder": "static" if act_order else None,
        "observer": "minmax",
        "observer_kwargs": {},
        "block_structure": None,
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "pack-quantized"}},
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "version": COMPRESSED_TENSORS_VERSION,
    }


def write_compressed_tensors(out: Path, model, linears: dict[str, StoredLinear], meta: dict,
                             tokenizer_dir: Path | None = None) -> Path:
    first = next(iter(linears.values()))
    act_order = bool(meta.get("recipe", {}).get("act_order"))
    return write_checkpoint(out, model, linears, meta, tokenizer_dir, fmt="compressed-tensors",
                            linear_tensors=ct_tensors,
                            quantization_config=quantization_config(first.bits, first.group_size, first.sym, act_order))
