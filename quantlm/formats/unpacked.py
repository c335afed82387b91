"""``unpacked``: plain dense weights (a FloatLM, a dequantized QuantLM as Spectra released it, or an unpacked TriLM
whose block weights are gamma * W_t), loadable by transformers anywhere."""

from __future__ import annotations

from quantlm.dtypes import FLOAT_DTYPES, ST_DTYPES
from quantlm.formats.registry import LOG2_3, Format, Layout, TensorSpec, register
from quantlm.hf_checkpoint import is_trilm
from quantlm.quantized import QuantizedLinear, TernaryWeight


class Unpacked(Format):
    name = "unpacked"
    families = ("floatlm", "quantlm", "trilm")

    def describe(self, layout: Layout) -> str:
        what = {"floatlm": "weights", "quantlm": "dequantized weights", "trilm": "gamma*W_t (as Spectra released)"}
        return f"{layout.float_dtype.lower()} {what[layout.family]}"

    def linear_tensors(self, out, in_features, layout, kind):
        params = out * in_features
        # an unpacked TriLM weight carries the trits plus one scale per shard; other dense weights: as stored
        code_bits = LOG2_3 + 16.0 * layout.mp / params if layout.family == "trilm" else None
        return [TensorSpec(".weight", layout.float_dtype, (out, in_features), "weight", params, code_bits)]

    def encode(self, name, value, layout):
        dtype = ST_DTYPES[layout.float_dtype]
        if isinstance(value, (QuantizedLinear, TernaryWeight)):
            value = value.dequantize(dtype)
        return {name + ".weight": value.detach().to("cpu", dtype).contiguous()}

    def decode(self, read, name, out, in_features, layout, kind):
        return read(name + ".weight")

    def layout_from_config(self, config):
        dtype = FLOAT_DTYPES.get(str(config.get("dtype") or config.get("torch_dtype")), "F16")
        if is_trilm(config):
            return Layout("trilm", "unpacked", mp=int(config.get("pretraining_model_parallel") or 1), float_dtype=dtype)
        meta = config.get("quantlm_quantization") or {}
        if meta.get("bits"):  # a dequantized QuantLM export records what it was quantized to
            return Layout("quantlm", "unpacked", bits=int(meta["bits"]), group_size=int(meta.get("group_size", -1)),
                          sym=bool(meta.get("sym", True)), float_dtype=dtype)
        return Layout("floatlm", "unpacked", float_dtype=dtype)


UNPACKED = register(Unpacked())
