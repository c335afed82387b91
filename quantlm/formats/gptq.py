"""``gptq``: the GPTQ v1 checkpoint layout that transformers (optimum + GPTQModel), GPTQModel and vLLM load.

Per quantized linear ``L`` (``in`` inputs, ``out`` outputs, ``G`` groups, ``b`` bits):
- ``L.qweight`` int32 ``[ceil(in*b/32), out]``: column o holds the codes q[o, :] as a little-endian bit
  stream along the input dimension (input k at stream bits [k*b, k*b+b)), see ``quantlm.gptq.packing``;
- ``L.qzeros`` int32 ``[G, ceil(out*b/32)]``: zero point minus one (the v1 convention), packed the same way
  along the output dimension;
- ``L.scales`` fp16 ``[G, out]``; ``L.g_idx`` int32 ``[in]`` = i // group_size (static groups only);
so that W[o, i] = scales[g, o] * (q[i, o] - (qzeros[g, o] + 1)), g = g_idx[i].
Act-order is exported only with static groups, so g_idx is always contiguous and ``desc_act`` is false.
"""

from __future__ import annotations

from pathlib import Path

import torch

from quantlm.errors import QuantlmError
from quantlm.formats.common import (
    StoredLinear,
    check_format_bits,
    write_checkpoint,
)
from quantlm.gptq.packing import pack_bits, unpack_bits


def gptq_tensors(name: str, lin: StoredLinear) -> dict[str, torch.Tensor]:
    out, in_features = lin.shape
    if (lin.zero < 1).any():
        raise QuantlmError(f"{name}: an asymmetric zero point of 0 cannot be stored in the GPTQ v1 layout "
                           "(which stores zero-1); use --sym or --format compressed-tensors")
    gs = in_features if lin.group_size == -1 else lin.group_size
    return {
        f"{name}.qweight": pack_bits(lin.q.T, lin.bits, dim=0),
        f"{name}.qzeros": pack_bits((lin.zero - 1).T, lin.bits, dim=1),
        f"{name}.scales": lin.scale.T.contiguous(),
        f"{name}.g_idx": (torch.arange(in_features) // gs).to(torch.int32),
    }


def read_gptq_tensors(tensors: dict[str, torch.Tensor], name: str, bits: int, out: int, in_features: int):
    """Codes [out, in] uint8, fp16 scales [out, G], zeros [out, G] int32 of one layer of a gptq checkpoint."""
    q = unpack_bits(tensors[f"{name}.qweight"], bits, in_features, dim=0).T
    scale = tensors[f"{name}.scales"].T
    zeros = unpack_bits(tensors[f"{name}.qzeros"], bits, out, dim=1).T.to(torch.int32) + 1
    return q.contiguous(), scale.contiguous(), zeros.contiguous(), tensors[f"{name}.g_idx"]


def quantization_config(bits: int, group_size: int, sym: bool, recipe: dict) -> dict:
    return {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": False,  # act-order ran with static groups: g_idx is contiguous, no reordering needed
        "sym": sym,
        "damp_percent": recipe.get("damp"),
        "true_sequential": recipe.get("true_sequential"),
        "static_groups": recipe.get("static_groups"),
        "quantlm_act_order": recipe.get("act_order"),
        "modules_in_block_to_quantize": None,
    }


def write_gptq(out: Path, model, linears: dict[str, StoredLinear], meta: dict,
               tokenizer_dir: Path | None = None) -> Path:
    first = next(iter(linears.values()))
    check_format_bits("gptq", first.bits)
    return write_checkpoint(out, model, linears, meta, tokenizer_dir, fmt="gptq", linear_tensors=gptq_tensors,
                            quantization_config=quantization_config(first.bits, first.group_size, first.sym,
                                                                    meta.get("recipe", {})))
