"""``compressed-tensors``: the ``pack-quantized`` layout (transformers with compressed-tensors, vLLM), 2..8 bits.

Per quantized linear ``L``: ``L.weight_packed`` int32 ``[out, ceil(in*b/32)]`` (codes as a little-endian bit
stream along the input dimension, the same words as the GPTQ ``qweight`` transposed), ``L.weight_scale``
fp16 ``[out, G]``, ``L.weight_shape`` int64 ``[2]``, and for an asymmetric grid ``L.weight_zero_point`` int32
``[ceil(out*b/32), G]`` packed along the output dimension. compressed-tensors reads codes and zero points
as signed values offset by 2**(b-1); as unsigned codes that is exactly W = scale * (q - zero). Written
with torch alone, so the compressed-tensors library is needed only to load the result elsewhere.
"""

from __future__ import annotations

import torch

from quantlm.errors import QuantlmError
from quantlm.formats.packing import pack_bits, packed_length, unpack_bits
from quantlm.formats.registry import Format, Layout, TensorSpec, as_quantized, register
from quantlm.quantized import QuantizedLinear, contiguous_g_idx, num_groups

COMPRESSED_TENSORS_VERSION = "0.20.0"  # the version whose layout this writer follows (tested in interop)


class CompressedTensors(Format):
    name = "compressed-tensors"
    families = ("quantlm",)

    def describe(self, layout):
        group = "per-channel" if layout.group_size == -1 else f"group {layout.group_size}"
        extras = [layout.scale_dtype.lower() + " scales", "sym" if layout.sym else "asym"]
        if layout.g_idx:
            extras.append("int32 g_idx")
        return f"compressed-tensors {layout.bits}-bit, {group}, {', '.join(extras)}"

    def linear_tensors(self, out, in_features, layout, kind):
        b, groups = layout.bits, num_groups(in_features, layout.group_size)
        specs = [
            TensorSpec(".weight_packed", "I32", (out, packed_length(in_features, b)), "codes", out * in_features,
                       float(b)),
            TensorSpec(".weight_scale", layout.scale_dtype, (out, groups), "scale"),
            TensorSpec(".weight_shape", "I64", (2,), "meta"),
        ]
        if not layout.sym:
            specs.append(TensorSpec(".weight_zero_point", "I32", (packed_length(out, b), groups), "zero"))
        if layout.g_idx:
            specs.append(TensorSpec(".weight_g_idx", "I32", (in_features,), "g_idx"))
        return specs

    def encode(self, name, value, layout):
        lin = as_quantized(value, name)
        tensors = {
            f"{name}.weight_packed": pack_bits(lin.q, lin.bits, dim=1),
            f"{name}.weight_scale": lin.scale.contiguous(),
            f"{name}.weight_shape": torch.tensor(lin.shape, dtype=torch.int64),
        }
        if not layout.sym:
            tensors[f"{name}.weight_zero_point"] = pack_bits(lin.zero, lin.bits, dim=0)
        if layout.g_idx:
            tensors[f"{name}.weight_g_idx"] = contiguous_g_idx(lin.shape[1], lin.group_size)
        return tensors

    def decode(self, read, name, out, in_features, layout, kind):
        b = layout.bits
        shape = tuple(int(v) for v in read(f"{name}.weight_shape").tolist())
        if shape != (out, in_features):
            raise QuantlmError(f"{name}: weight_shape {list(shape)} differs from the config's [{out}, {in_features}]")
        q = unpack_bits(read(f"{name}.weight_packed"), b, in_features, dim=1)
        scale = read(f"{name}.weight_scale")
        if layout.sym:
            zero = torch.full(scale.shape, 1 << (b - 1), dtype=torch.int32)
        else:
            zero = unpack_bits(read(f"{name}.weight_zero_point"), b, out, dim=0).to(torch.int32)
        return QuantizedLinear(q, scale, zero, b, layout.group_size, layout.sym)

    def quantization_config(self, layout, recipe):
        weights = {
            "num_bits": layout.bits,
            "type": "int",
            "symmetric": layout.sym,
            "strategy": "channel" if layout.group_size == -1 else "group",
            "group_size": None if layout.group_size == -1 else layout.group_size,
            "dynamic": False,
            "actorder": "static" if recipe.get("act_order") else None,
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

    def claims(self, config):
        return (config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors"

    def layout_from_config(self, config):
        qc = config["quantization_config"]
        if qc.get("format") != "pack-quantized" or len(qc.get("config_groups") or {}) != 1:
            raise QuantlmError("compressed-tensors checkpoint: only one pack-quantized config group is supported")
        try:
            w = next(iter(qc["config_groups"].values()))["weights"]
            gs = -1 if w.get("strategy") == "channel" else int(w["group_size"])
            return Layout("quantlm", "compressed-tensors", bits=int(w["num_bits"]), group_size=gs,
                          sym=bool(w["symmetric"]))
        except (KeyError, TypeError, ValueError):
            raise QuantlmError("compressed-tensors quantization_config lacks config_groups.*.weights "
                               "(num_bits, group_size, symmetric)") from None


COMPRESSED_TENSORS = register(CompressedTensors())
