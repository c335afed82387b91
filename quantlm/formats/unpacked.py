"""``unpacked``: a plain fp16 LLaMA checkpoint with the dequantized weights (what Spectra released)."""

from __future__ import annotations

from pathlib import Path

from quantlm.formats.common import (
    StoredLinear,
    copy_tokenizer,
    dense_state_dict,
    save_safetensors,
    write_config,
    write_meta,
)


def write_unpacked(out: Path, model, linears: dict[str, StoredLinear], meta: dict,
                   tokenizer_dir: Path | None = None) -> Path:
    """Write ``model`` with every quantized linear replaced by its fp16 dequantized weight into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = dense_state_dict(model, skip=set(linears))
    for name, lin in linears.items():
        tensors[name + ".weight"] = lin.dequantize()
        bias = model.get_submodule(name).bias
        if bias is not None:
            tensors[name + ".bias"] = bias.detach().half().cpu().clone()
    save_safetensors(tensors, out)
    write_config(model, out)
    copy_tokenizer(tokenizer_dir, out)
    write_meta(out, {**meta, "format": "unpacked"})
    return out
