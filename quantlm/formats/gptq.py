"""``gptq``: the GPTQ v1 checkpoint layout that transformers (optimum + GPTQModel), GPTQModel and vLLM load.

Per quantized linear ``L`` (``in`` inputs, ``out`` outputs, ``G`` groups, ``b`` bits):
- ``L.qweight`` int32 ``[ceil(in*b/32), out]``: column o holds the codes q[o, :] as a little-endian bit
  stream along the input dimension (input k at stream bits [k*b, k*b+b)), see ``quantlm.formats.packing``;
- ``L.qzeros`` int32 ``[G, ceil(out*b/32)]``: zero point minus one (the v1 convention), packed the same way
  along the output dimension;
- ``L.scales`` fp16 ``[G, out]``; ``L.g_idx`` int32 ``[in]`` = i // group_size (static groups only);
so that W[o, i] = scales[g, o] * (q[i, o] - (qzeros[g, o] + 1)), g = g_idx[i].
Act-order is exported only with static groups, so g_idx is always contiguous and ``desc_act`` is false.
"""

from __future__ import annotations

import torch

from quantlm.errors import QuantlmError
from quantlm.formats.packing import pack_bits, packed_length, unpack_bits
from quantlm.formats.registry import Format, Layout, TensorSpec, as_quantized, register
from quantlm.quantized import QuantizedLinear, contiguous_g_idx, num_groups

GPTQ_BITS = (2, 3, 4, 8)


class GPTQ(Format):
    name = "gptq"
    families = ("quantlm",)

    def check(self, layout):
        if layout.bits not in GPTQ_BITS:
            raise QuantlmError(f"the gptq format holds 2, 3, 4 or 8 bits, not {layout.bits}; "
                               "use --format compressed-tensors or unpacked for that bitwidth")

    def describe(self, layout):
        group = "per-channel" if layout.group_size == -1 else f"group {layout.group_size}"
        return (f"gptq {layout.bits}-bit, {group}, {layout.scale_dtype.lower()} scales, "
                f"{'sym' if layout.sym else 'asym'}, int32 g_idx")

    def linear_tensors(self, out, in_features, layout, kind):
        b, groups = layout.bits, num_groups(in_features, layout.group_size)
        return [
            TensorSpec(".qweight", "I32", (packed_length(in_features, b), out), "codes", out * in_features, float(b)),
            TensorSpec(".qzeros", "I32", (groups, packed_length(out, b)), "zero"),
            TensorSpec(".scales", layout.scale_dtype, (groups, out), "scale"),
            TensorSpec(".g_idx", "I32", (in_features,), "g_idx"),
        ]

    def encode(self, name, value, layout):
        lin = as_quantized(value, name)
        out, in_features = lin.shape
        if (lin.zero < 1).any():
            raise QuantlmError(f"{name}: an asymmetric zero point of 0 cannot be stored in the GPTQ v1 layout "
                               "(which stores zero-1); use --sym or --format compressed-tensors")
        return {
            f"{name}.qweight": pack_bits(lin.q.T, lin.bits, dim=0),
            f"{name}.qzeros": pack_bits((lin.zero - 1).T, lin.bits, dim=1),
            f"{name}.scales": lin.scale.T.contiguous(),
            f"{name}.g_idx": contiguous_g_idx(in_features, lin.group_size),
        }

    def decode(self, read, name, out, in_features, layout, kind):
        b = layout.bits
        q = unpack_bits(read(f"{name}.qweight"), b, in_features, dim=0).T.contiguous()
        scale = read(f"{name}.scales").T.contiguous()
        zero = unpack_bits(read(f"{name}.qzeros"), b, out, dim=1).T.to(torch.int32).contiguous() + 1
        lin = QuantizedLinear(q, scale, zero, b, layout.group_size, layout.sym, read(f"{name}.g_idx"))
        if not lin.is_contiguous():
            raise QuantlmError(f"{name}: g_idx is not contiguous; quantlm loads static-group GPTQ only")
        return QuantizedLinear(q, scale, zero, b, layout.group_size, layout.sym)

    def quantization_config(self, layout, recipe):
        return {
            "quant_method": "gptq",
            "checkpoint_format": "gptq",
            "bits": layout.bits,
            "group_size": layout.group_size,
            "desc_act": False,  # act-order ran with static groups: g_idx is contiguous, no reordering needed
            "sym": layout.sym,
            "damp_percent": recipe.get("damp"),
            "true_sequential": recipe.get("true_sequential"),
            "static_groups": recipe.get("static_groups"),
            "quantlm_act_order": recipe.get("act_order"),
            "modules_in_block_to_quantize": None,
        }

    def claims(self, config):
        return (config.get("quantization_config") or {}).get("quant_method") == "gptq"

    def layout_from_config(self, config):
        qc = config["quantization_config"]
        if qc.get("checkpoint_format", "gptq") != "gptq":
            raise QuantlmError(f"GPTQ checkpoint_format {qc.get('checkpoint_format')!r} is not supported; "
                               "quantlm reads the v1 'gptq' layout")
        try:
            return Layout("quantlm", "gptq", bits=int(qc["bits"]), group_size=int(qc.get("group_size", -1)),
                          sym=bool(qc.get("sym", True)))
        except (KeyError, TypeError, ValueError):
            raise QuantlmError("gptq quantization_config needs integer bits and group_size") from None


GPTQ_FORMAT = register(GPTQ())
