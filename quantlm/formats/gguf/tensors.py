"""Writing a GGUF file: HF-named tensors (plain, ``QuantizedLinear`` or ``TernaryWeight``) packed into exact llama.cpp
block types, renamed, q/k rows permuted, with the hyperparameters and the tokenizer; written to a temporary
sibling and renamed into place."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from quantlm.atomic import atomic_path
from quantlm.dtypes import ST_DTYPES
from quantlm.errors import QuantlmError
from quantlm.formats.gguf import blocks as gb
from quantlm.formats.gguf.header import read_gguf_header
from quantlm.formats.gguf.names import FILE_TYPE, RTN_TYPES, gguf_name, hparams, rope_permutation
from quantlm.formats.gguf.tokenizer import tokenizer_metadata
from quantlm.quantized import QuantizedLinear, TernaryWeight


@contextlib.contextmanager
def _quiet(logger: str):
    """gguf-py logs every file it writes at INFO (temporary names included); quantlm reports the file itself."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        log.setLevel(level)


def _float_array(t: Tensor, type_name: str) -> tuple[np.ndarray, object]:
    import gguf

    if type_name == "F32":
        return t.detach().to(torch.float32).cpu().numpy(), None
    if type_name == "F16":
        return t.detach().to(torch.float16).cpu().numpy(), None
    if type_name == "BF16":
        b = t.detach().to(torch.bfloat16).cpu().contiguous().view(torch.int16).numpy().view(np.uint8)
        return b.reshape(*t.shape[:-1], -1), gguf.GGMLQuantizationType.BF16
    raise QuantlmError(f"float_type {type_name!r}: use F16, BF16 or F32")


def _pick_type(w, hf_name: str, linear_type, float_type: str, kquant_grouped: bool, merge: bool) -> str:
    chosen = linear_type.get(hf_name) if isinstance(linear_type, Mapping) else linear_type
    if chosen is not None:
        gb.ggml_type(chosen)
        return chosen
    if isinstance(w, (QuantizedLinear, TernaryWeight)):
        return gb.choose_type(w, kquant_grouped=kquant_grouped, merge_shard_scales=merge, name=hf_name)
    return float_type


def write_gguf(path: str | os.PathLike, config: Mapping, tensors: Mapping[str, Tensor | QuantizedLinear | TernaryWeight],
               tokenizer_dir: str | os.PathLike, *, float_type: str = "F16",
               linear_type: str | Mapping[str, str] | None = None, kquant_grouped: bool = False,
               merge_shard_scales: bool = False, metadata: Mapping[str, bool | int | str] | None = None,
               model_name: str | None = None) -> dict:
    """Write a GGUF for llama.cpp; return a report of what went where.

    config: the HF config.json as a dict, of a family with a GGUF writer (``names.GGUF_FAMILIES``: its llama.cpp
    architecture, tensor names, q/k permutation, norm offset and extra keys). tensors: HF names (``model.layers.N.self_attn.q_proj.weight``, ...)
    to plain tensors, ``QuantizedLinear`` or ``TernaryWeight``. Tensors the family computes from the config
    (``names.hparams``' ``tensors``: ``rope_freqs.weight`` for a Llama 3 rope) are added, F32. Norms are stored
    F32; other plain tensors (embedding, LM head, unquantized linears) as ``float_type`` (F16, the Spectra convention; BF16, F32).
    Quantized linears go into the smallest exact block type (``gguf_blocks.choose_type``) unless
    ``linear_type`` names one (for every linear, or per HF name in a mapping); a plain float linear given a
    block type is quantized by gguf-py's round-to-nearest (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/TQ1_0/TQ2_0), reported as
    such. ``kquant_grouped`` / ``merge_shard_scales``: the opt-ins of ``gguf_blocks.encode``; what they
    changed is in the report. ``metadata``: extra key/value pairs for the header (quantlm's ``quantlm.*`` keys); ``model_name``: the
    ``general.name`` (default: the file's stem). A tied LM head (``tie_word_embeddings``) is omitted; an untied config without
    ``lm_head.weight`` is an error. Nothing is written unless every tensor can be.

    Report: {"path", "file_type", "quantization_version", "tensors": [{"name", "source", "type", "shape"
    (HF [out, in]), "nbytes", "exact", "scale_error", "weight_error", "note"}], "payload_bytes",
    "file_bytes", "header_bytes", "changes": the tensors whose weights differ from the input (opt-ins,
    round-to-nearest, fp16 rounding of quantized weights written as float)}.
    """
    import gguf

    hp = hparams(config)
    fam = hp["family"]
    if float_type not in gb.FLOAT_TYPES:
        raise QuantlmError(f"float_type {float_type!r}: use one of {', '.join(gb.FLOAT_TYPES)}")
    tied = hp["tied"]
    if not tied and "lm_head.weight" not in tensors:
        raise QuantlmError("config says the LM head is not tied (tie_word_embeddings false) but no lm_head.weight "
                           "was given; pass the whole state dict")
    entries = []  # (gguf name, array, raw ggml type or None, report row)
    linear_weights: dict[str, int] = {}
    for hf_name, w in tensors.items():
        name = gguf_name(hf_name, fam)
        if name is None or (name == "output.weight" and tied):
            continue
        is_norm = name.endswith("_norm.weight")
        is_linear = name.startswith("blk.") and not is_norm and name.endswith(".weight")
        if is_norm or name.endswith(".bias"):
            type_name = "F32"
        elif is_linear:
            type_name = _pick_type(w, hf_name, linear_type, float_type, kquant_grouped, merge_shard_scales)
        else:
            type_name = float_type
        row = {"name": name, "source": hf_name, "type": type_name, "exact": True, "scale_error": 0.0,
               "weight_error": 0.0, "note": ""}
        raw = None
        if is_norm and fam.norm_offset and not isinstance(w, (QuantizedLinear, TernaryWeight)):
            w = w.detach().to(torch.float32) + fam.norm_offset  # llama.cpp multiplies by the stored weight
            row["note"] = f"norm weight + {fam.norm_offset:g} (the family's (1 + w) RMSNorm)"
        if isinstance(w, (QuantizedLinear, TernaryWeight)):
            if not is_linear:
                raise QuantlmError(f"{hf_name}: only block linear weights may be quantized for GGUF")
            row["shape"] = list(w.shape)
            if type_name in gb.FLOAT_TYPES:
                ref = w.stored(hf_name).dequantize() if isinstance(w, QuantizedLinear) else w.dequantize()
                arr, raw = _float_array(ref, type_name)
                rounded = ref.to(ST_DTYPES[type_name])
                err = float((rounded.to(torch.float32) - ref).abs().max()) if ref.numel() else 0.0
                row.update(exact=err == 0.0, weight_error=err, note=f"dequantized to {type_name}")
            else:
                enc = gb.encode(w, type_name, name=hf_name, kquant_grouped=kquant_grouped,
                                merge_shard_scales=merge_shard_scales)
                arr, raw = enc.data, gguf.GGMLQuantizationType[type_name]
                row.update(exact=enc.exact, scale_error=enc.scale_error, weight_error=enc.weight_error, note=enc.note)
        else:
            t = w.detach().cpu()
            row["shape"] = list(t.shape)
            if type_name in gb.FLOAT_TYPES:
                arr, raw = _float_array(t, type_name)
            elif type_name in RTN_TYPES:
                gb.bytes_per_row(type_name, t.shape[-1], hf_name)  # the width check, with the layer's name
                src = t.to(torch.float16).to(torch.float32).numpy()
                raw = gguf.GGMLQuantizationType[type_name]
                arr = gguf.quants.quantize(src, raw)
                err = float(np.abs(gguf.quants.dequantize(arr, raw).reshape(src.shape) - src).max()) if src.size else 0.0
                row.update(exact=False, weight_error=err,
                           note=f"round-to-nearest {type_name} by gguf-py (from the fp16 weights)")
            else:
                raise QuantlmError(f"{hf_name}: a plain float weight cannot be written as {type_name} (gguf-py "
                                   f"quantizes only {', '.join(RTN_TYPES)}); quantize it with quantlm first")
        if fam.rope_permute and name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = hp["n_head"] if ".attn_q." in name else hp["n_head_kv"]
            arr = arr[rope_permutation(arr.shape[0], heads).numpy()]
        if is_linear:
            linear_weights[type_name] = linear_weights.get(type_name, 0) + int(np.prod(row["shape"]))
        row["nbytes"] = int(arr.nbytes)
        entries.append((name, np.ascontiguousarray(arr), raw, row))
    for name, t in hp["tensors"].items():  # computed from the config (Llama 3 rope factors): F32, not a weight
        arr = t.to(torch.float32).numpy()
        row = {"name": name, "source": "config.json", "type": "F32", "shape": list(arr.shape), "nbytes": int(arr.nbytes),
               "exact": True, "scale_error": 0.0, "weight_error": 0.0, "note": "from the config's rope parameters"}
        entries.append((name, arr, None, row))
    missing = {"token_embd.weight", "output_norm.weight"} - {e[0] for e in entries}
    if missing:
        raise QuantlmError(f"tensors lack {', '.join(sorted(missing))}: pass the whole model's state dict")
    main_type = max(linear_weights, key=linear_weights.get) if linear_weights else float_type
    quantized = main_type not in gb.FLOAT_TYPES
    tok_meta = tokenizer_metadata(tokenizer_dir, hp["vocab"])

    path = Path(path)
    with atomic_path(path) as tmp, _quiet("gguf.gguf_writer"):
        writer = gguf.GGUFWriter(str(tmp), fam.arch)
        writer.add_name(model_name or path.stem)
        writer.add_block_count(hp["n_layer"])
        writer.add_context_length(hp["n_ctx"])
        writer.add_embedding_length(hp["hidden"])
        writer.add_feed_forward_length(hp["ffn"])
        writer.add_head_count(hp["n_head"])
        writer.add_head_count_kv(hp["n_head_kv"])
        writer.add_rope_freq_base(hp["theta"])
        writer.add_layer_norm_rms_eps(hp["eps"])
        writer.add_vocab_size(hp["vocab"])
        writer.add_rope_dimension_count(hp["head_dim"])
        if hp["head_dim"] * hp["n_head"] != hp["hidden"]:
            writer.add_key_length(hp["head_dim"])
            writer.add_value_length(hp["head_dim"])
        for key, val in hp["floats"].items():
            writer.add_float32(f"{fam.arch}.{key}", val)
        for key, val in hp["ints"].items():
            writer.add_uint32(f"{fam.arch}.{key}", val)
        for key, val in hp["bools"].items():
            writer.add_array(f"{fam.arch}.{key}", [bool(v) for v in val])
        writer.add_file_type(FILE_TYPE.get(main_type, 1))
        if quantized:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, val in {**tok_meta, **dict(metadata or {})}.items():
            if isinstance(val, bool):
                writer.add_bool(key, val)
            elif isinstance(val, int):
                (writer.add_int32 if val < 0 else writer.add_uint32)(key, val)
            elif isinstance(val, str):
                writer.add_string(key, val)
            elif key.endswith("token_type"):
                writer.add_array(key, [int(v) for v in val])
            elif key.endswith("scores"):
                writer.add_key_value(key, [float(v) for v in val], gguf.GGUFValueType.ARRAY,
                                     sub_type=gguf.GGUFValueType.FLOAT32)
            else:
                writer.add_array(key, val)
        for name, arr, raw, _row in entries:
            writer.add_tensor(name, arr, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        header = read_gguf_header(tmp)
    rows = [e[3] for e in entries]
    return {"path": str(path), "file_type": main_type, "quantization_version": gguf.GGML_QUANT_VERSION if quantized
            else None, "tensors": rows, "payload_bytes": header["payload_bytes"], "file_bytes": header["file_bytes"],
            "header_bytes": header["header_bytes"],
            "changes": [{k: r[k] for k in ("name", "type", "scale_error", "weight_error", "note")}
                        for r in rows if not r["exact"]]}
