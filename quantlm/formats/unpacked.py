"""``unpacked``: a plain fp16 LLaMA checkpoint with the dequantized weights (what Spectra released)."""

from __future__ import annotations

from pathlib import Path

from quantlm.formats.common import (
    StoredLinear,
    write_checkpoint,
)


def write_unpacked(out: Path, model, linears: dict[str, StoredLinear], meta: dict,
                   tokenizer_dir: Path | None = None) -> Path:
    """Write ``model`` with every quantized linear replaced by its fp16 dequantized weight into ``out``."""
    return write_checkpoint(out, model, linears, meta, tokenizer_dir, fmt="unpacked",
                            linear_tensors=lambda name, lin: {name + ".weight": lin.dequantize()})
