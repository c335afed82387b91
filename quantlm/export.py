"""The export job: re-write an existing checkpoint in another storage format, losslessly.

An unpacked TriLM packs to ``ternary-1.6`` / ``ternary-2`` (and back to ``unpacked``); a packed QuantLM export
(gptq or compressed-tensors) converts to the other packed format or to the dequantized ``unpacked`` one. Every
value goes through the registry: decoded by the source format, encoded by the target, so a round trip is exact.
Any of them also exports to ``gguf`` (llama.cpp): a FloatLM as F16, a TriLM as TQ1_0 / TQ2_0, a packed QuantLM in
the block type that holds its GPTQ codes exactly.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from quantlm import validate
from quantlm.accounting import checkpoint_layout
from quantlm.checkpoint_writer import write_checkpoint, written_changes
from quantlm.errors import QuantlmError
from quantlm.formats.gguf import GGUF_FILE
from quantlm.formats.loader import read_linears
from quantlm.formats.registry import Layout, formats_for, get_format
from quantlm.hf_checkpoint import block_map_for, read_config
from quantlm.metadata import ModelMeta, read_meta
from quantlm.outputs import check_output, output_dir
from quantlm.quantized import QuantizedLinear, TernaryWeight
from quantlm.versions import library_versions

# the Layout fields an export may set on its target (the rest are its format's options)
LAYOUT_FIELDS = {f.name for f in dataclasses.fields(Layout)} - {"options", "family", "format"}


def export_model(model_dir: str | os.PathLike, fmt: str, out_dir: str | os.PathLike, *,
                 overwrite: bool = False, options: dict | None = None) -> dict:
    """Write the checkpoint in ``model_dir`` to ``out_dir`` in format ``fmt``; returns a short report.

    ``options``: layout fields of the target (``float_dtype``) and its format's options (for gguf ``gguf_type``,
    ``kquant_grouped``, ``merge_shard_scales``). The report's ``changes`` lists what an opt-in changed in the weights (empty when
    the export is lossless)."""

    src, out = Path(model_dir), Path(out_dir)
    if src.suffix == ".gguf" or (src.is_dir() and (src / GGUF_FILE).is_file() and not (src / "config.json").is_file()):
        readable = sorted({f for fam in ("floatlm", "quantlm", "trilm") for f in formats_for(fam)} - {"gguf"})
        raise QuantlmError(f"{src} is already GGUF; quantlm export takes a Hugging Face checkpoint directory "
                           f"(config.json and safetensors weights: {', '.join(readable)}) and writes any of those "
                           "or gguf: export from the checkpoint the GGUF file was made from")
    config = read_config(src)
    block_map = block_map_for(config, str(src))
    source = checkpoint_layout(src, config)
    get_format(fmt)
    if fmt not in formats_for(source.family):
        raise QuantlmError(f"{src} holds a {source.family}; it exports to {', '.join(formats_for(source.family))}, "
                           f"not {fmt}")
    check_output(out, overwrite, protect=[src])
    validate.check_checkpoint(src, config)
    # layout fields (float_dtype) apart from the target format's own options (gguf: gguf_type, ...)
    opts = dict(options or {})
    fields = {k: opts.pop(k) for k in list(opts) if k in LAYOUT_FIELDS}
    target = dataclasses.replace(source, format=fmt, options=opts, **fields)  # the target format's own checks
    if source.family == "quantlm" and source.format == "unpacked" and fmt != "unpacked":
        raise QuantlmError(f"{src} is a dequantized (unpacked) QuantLM: its integer codes are gone; export from its "
                           "gptq or compressed-tensors sibling, or quantize again with --formats " + fmt)
    get_format(fmt).preflight(src, config, target)
    dense, linears = read_linears(src, config, source, block_map)
    for name, value in list(linears.items()):
        if source.family == "trilm" and not isinstance(value, TernaryWeight):
            linears[name] = TernaryWeight.from_dense(value, source.mp, block_map.shard_kind(name), name)
        elif source.family == "floatlm" or (source.family == "quantlm" and not isinstance(value, QuantizedLinear)):
            linears[name] = value  # dense weights stay dense (unpacked to unpacked)
    old = read_meta(src)
    meta = ModelMeta(producer="export", family=source.family, format=fmt, model=old.model if old else src.name,
                     preset=old.preset if old else None, source_model=str(src.resolve()), bits=source.bits,
                     group_size=source.group_size if source.family == "quantlm" else None,
                     sym=source.sym if source.family == "quantlm" else None, seed=old.seed if old else None,
                     method=old.method if old else None, settings=old.settings if old else {},
                     info={"exported_from": source.format}, versions=library_versions())
    with output_dir(out, overwrite=overwrite, protect=[src]) as tmp:
        write_checkpoint(tmp, config, dense, linears, target, block_map, meta, src)
        changes = written_changes(tmp)
    return {"source": str(src), "from": source.format, "to": fmt, "out": str(out), "family": source.family,
            "layout": target.describe(), "changes": changes}
