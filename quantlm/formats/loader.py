"""Reload any quantlm export into a torch model: ``unpacked`` as is, packed formats with :class:`QuantLinear`.

``QuantLinear`` keeps the packed int32 codes (the compressed-tensors orientation, ``[out, ceil(in*b/32)]``),
fp16 scales and integer zero points, and dequantizes on every forward, so a packed model stays packed in memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quantlm.checkpoint import block_map_for, load_causal_lm, read_config
from quantlm.errors import QuantlmError
from quantlm.formats.common import dequantize_groups
from quantlm.gptq.packing import pack_bits, unpack_bits


class QuantLinear(nn.Module):
    """A linear layer stored as packed b-bit codes: W[o, i] = scale[o, g] * (q[o, i] - zero[o, g]), g = i // gs."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = 1 if group_size == -1 else in_features // group_size
        words = (in_features * bits + 31) // 32
        self.register_buffer("packed", torch.zeros(out_features, words, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
                   bias: torch.Tensor | None = None) -> QuantLinear:
        out, in_features = q.shape
        layer = cls(in_features, out, bits, group_size, bias is not None)
        layer.packed.copy_(pack_bits(q, bits, dim=1))
        layer.scales.copy_(scale.to(torch.float16))
        layer.zeros.copy_(zero.to(torch.uint8))
        if bias is not None:
            layer.bias.data.copy_(bias.float())
        return layer

    def codes(self) -> torch.Tensor:
        return unpack_bits(self.packed, self.bits, self.in_features, dim=1)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_groups(self.codes(), self.scales, self.zeros, self.group_size).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise QuantlmError(f"{path}: no *.safetensors weights found")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def _layer_params(qc: dict) -> tuple[int, int, bool]:
    if qc.get("quant_method") == "gptq":
        if qc.get("checkpoint_format", "gptq") != "gptq":
            raise QuantlmError(f"GPTQ checkpoint_format {qc.get('checkpoint_format')!r} is not supported; "
                               "quantlm reads the v1 'gptq' layout")
        return int(qc["bits"]), int(qc["group_size"]), bool(qc["sym"])
    if qc.get("quant_method") == "compressed-tensors":
        if qc.get("format") != "pack-quantized" or len(qc.get("config_groups", {})) != 1:
            raise QuantlmError("compressed-tensors checkpoint: only one pack-quantized config group is supported")
        w = next(iter(qc["config_groups"].values()))["weights"]
        gs = -1 if w.get("strategy") == "channel" else int(w["group_size"])
        return int(w["num_bits"]), gs, bool(w["symmetric"])
    raise QuantlmError(f"quantization method {qc.get('quant_method')!r} is not one quantlm writes "
                       "(gptq, compressed-tensors)")


def load_quantized(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A torch model from any quantlm export directory (unpacked, gptq or compressed-tensors), on the CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantlm.formats.compressed_tensors import read_ct_tensors
    from quantlm.formats.gptq import read_gptq_tensors

    path = Path(model_dir)
    cfg = read_config(path)
    qc = cfg.get("quantization_config")
    if qc is None:
        return load_causal_lm(path, dtype=dtype)
    block_map = block_map_for(cfg, str(path))
    bits, group_size, sym = _layer_params(qc)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = _read_tensors(path)
    layers = model.get_submodule(block_map.layers_path)
    for i, block in enumerate(layers):
        for rel in block_map.linears:
            name = f"{block_map.layers_path}.{i}.{rel}"
            dense = block.get_submodule(rel)
            if qc["quant_method"] == "gptq":
                q, scale, zero, g_idx = read_gptq_tensors(tensors, name, bits, dense.out_features,
                                                          dense.in_features)
                gs = dense.in_features if group_size == -1 else group_size
                if not torch.equal(g_idx.long(), torch.arange(dense.in_features) // gs):
                    raise QuantlmError(f"{name}: g_idx is not contiguous; quantlm loads static-group GPTQ only")
            else:
                q, scale, zero = read_ct_tensors(tensors, name, bits, sym)
            bias = tensors.get(f"{name}.bias")
            parent_path, _, child = rel.rpartition(".")
            parent = block.get_submodule(parent_path) if parent_path else block
            setattr(parent, child, QuantLinear.from_codes(q, scale, zero, bits, group_size, bias))
            for suffix in ("qweight", "qzeros", "scales", "g_idx", "weight_packed", "weight_scale",
                           "weight_shape", "weight_zero_point", "bias"):
                tensors.pop(f"{name}.{suffix}", None)
    missing, unexpected = model.load_state_dict(
        {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, strict=False)
    unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
    quant_buffers = (".packed", ".scales", ".zeros")
    missing = [k for k in missing if not k.endswith(quant_buffers) and not k.endswith(".bias")
               and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise QuantlmError(f"{path}: checkpoint does not match its config (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def read_meta(model_dir: str | os.PathLike) -> dict:
    p = Path(model_dir) / "quantlm.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
