"""The one dtype table: safetensors dtype names, the names recipes use (float32, bfloat16, float16), torch dtypes,
and bits per element."""

from __future__ import annotations

import torch

# safetensors dtype names <-> torch dtypes, and bits per element
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
DTYPE_BITS = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
    "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U64": 64, "U32": 32, "U16": 16, "U8": 8, "BOOL": 8,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
FLOAT_ST = ("F64", "F32", "F16", "BF16")  # the safetensors float dtypes a weight may be stored in
# the float dtypes recipes name (activation, forward, weights and training dtypes) -> safetensors names
FLOAT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
# ... -> torch dtypes, and bytes per element
TORCH_FLOATS = {name: ST_DTYPES[st] for name, st in FLOAT_DTYPES.items()}
FLOAT_BYTES = {name: DTYPE_BITS[st] // 8 for name, st in FLOAT_DTYPES.items()}


def st_dtype(t: torch.Tensor) -> str:
    return TORCH_TO_ST[t.dtype]


ST_TO_FLOAT = {st: name for name, st in FLOAT_DTYPES.items()}


def float_name(dtype: torch.dtype, default: str = "float32") -> str:
    """The recipe name of a torch float dtype (``default`` for any other)."""
    return next((name for name, dt in TORCH_FLOATS.items() if dt == dtype), default)
