"""Load any checkpoint quantlm reads into a torch model: unpacked ones through transformers, packed ones (gptq,
compressed-tensors, ternary) with their block linears kept packed as :class:`QuantLinear`.

``QuantLinear`` keeps the packed int32 codes (``[out, ceil(in*b/32)]``), fp16 scales and integer zero points, and
dequantizes on every forward, so a packed model stays packed in memory. A TriLM's ternary weight is the 2-bit
``QuantizedLinear`` with codes W_t + 1, zero 1 and its shard scales as groups, so it runs in the same module.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quantlm.errors import QuantlmError
from quantlm.formats.packing import pack_bits, packed_length, unpack_bits
from quantlm.formats.registry import Layout, get_format, layout_of_config
from quantlm.hf_checkpoint import (
    block_map_for,
    load_causal_lm,
    read_config,
    read_safetensors_header,
    safetensors_files,
)
from quantlm.quantized import QuantizedLinear, TernaryWeight, num_groups
from quantlm.specs import spec_from_config


class QuantLinear(nn.Module):
    """A linear layer stored as packed b-bit codes: W[o, i] = scale[o, g] * (q[o, i] - zero[o, g]), g = i // gs."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = num_groups(in_features, group_size)
        self.register_buffer("packed", torch.zeros(out_features, packed_length(in_features, bits), dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_quantized(cls, lin: QuantizedLinear, bias: torch.Tensor | None = None) -> QuantLinear:
        out, in_features = lin.shape
        layer = cls(in_features, out, lin.bits, lin.group_size, bias is not None)
        layer.packed.copy_(pack_bits(lin.q, lin.bits, dim=1))
        layer.scales.copy_(lin.scale.to(torch.float16))
        layer.zeros.copy_(lin.zero.to(torch.uint8))
        if bias is not None:
            layer.bias.data.copy_(bias.float())
        return layer

    def quantized(self) -> QuantizedLinear:
        return QuantizedLinear(unpack_bits(self.packed, self.bits, self.in_features, dim=1), self.scales,
                               self.zeros.to(torch.int32), self.bits, self.group_size, True)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return self.quantized().dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


def ternary_as_quantized(w: TernaryWeight) -> QuantizedLinear:
    """The same weights as a 2-bit code: q = W_t + 1, zero 1, one scale group per shard."""
    out, in_features = w.shape
    q = (w.codes.to(torch.int16) + 1).to(torch.uint8)
    if w.kind == "column":  # shards along the output rows: one per-channel scale per row
        scale = w.scales.to(torch.float16).repeat_interleave(out // w.mp)[:, None]
        group_size = -1
    else:  # shards along the input: one group per shard
        scale = w.scales.to(torch.float16)[None, :].expand(out, w.mp).contiguous()
        group_size = in_features // w.mp if w.mp > 1 else -1
    return QuantizedLinear(q, scale, torch.ones_like(scale, dtype=torch.int32), 2, group_size, False)


def read_state(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory's safetensors files (shards included)."""
    from safetensors.torch import load_file


    tensors: dict[str, torch.Tensor] = {}
    for f in safetensors_files(Path(model_dir)):
        read_safetensors_header(f)  # the clear errors for corrupt or truncated files
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own and OS errors for broken files
            raise QuantlmError(f"{f}: cannot read safetensors ({e}); re-download or re-export it") from None
    return tensors


def read_linears(model_dir: str | os.PathLike, config: dict, layout: Layout, block_map
                 ) -> tuple[dict[str, torch.Tensor], dict]:
    """(the dense tensors, name -> decoded block linear) of a checkpoint in ``layout``."""
    fmt = get_format(layout.format)
    tensors = read_state(model_dir)
    shapes = spec_from_config(config, str(model_dir)).linear_shapes()
    n = int(config["num_hidden_layers"])
    used: set[str] = set()

    def read(key: str) -> torch.Tensor:
        if key not in tensors:
            raise QuantlmError(f"{model_dir}: tensor {key} is missing; the checkpoint is incomplete or not "
                               f"in the {layout.format} format its config.json declares")
        used.add(key)
        return tensors[key]

    linears = {}
    for i in range(n):
        for rel, (out_f, in_f) in shapes.items():
            name = block_map.block_prefix(i) + rel
            linears[name] = fmt.decode(read, name, out_f, in_f, layout, block_map.shard_kind(rel))
    dense = {k: v for k, v in tensors.items() if k not in used}
    return dense, linears


def load_model(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """A torch causal LM from any checkpoint quantlm reads (unpacked, gptq, compressed-tensors, ternary), with
    packed block linears kept packed. Needs no optional library (optimum, GPTQModel, compressed-tensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM


    path = Path(model_dir)
    cfg = read_config(path)
    layout = layout_of_config(cfg)
    if layout.format == "unpacked":
        return load_causal_lm(path, dtype=dtype, device=device)
    block_map = block_map_for(cfg, str(path))
    dense, linears = read_linears(path, cfg, layout, block_map)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, value in linears.items():
        lin = ternary_as_quantized(value) if isinstance(value, TernaryWeight) else value
        parent_path, _, child = name.rpartition(".")
        bias = dense.pop(name + ".bias", None)
        setattr(model.get_submodule(parent_path), child, QuantLinear.from_quantized(lin, bias))
    missing, unexpected = model.load_state_dict(
        {k: v.to(dtype) if v.is_floating_point() else v for k, v in dense.items()}, strict=False)
    unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
    quant_buffers = (".packed", ".scales", ".zeros")
    missing = [k for k in missing if not k.endswith(quant_buffers) and not k.endswith(".bias")
               and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise QuantlmError(f"{path}: checkpoint does not match its config (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(device).eval()

