"""GGUF files for llama.cpp: a LLaMA model's tensors and tokenizer written with gguf-py, and the header read back.

:func:`write_gguf` takes HF-named tensors (plain tensors, ``QuantizedLinear`` or ``TernaryWeight``), packs
each quantized linear into an exact llama.cpp block type (:mod:`quantlm.formats.gguf_blocks`), renames the
tensors to llama.cpp's names, permutes the q and k rows from HF's rotate-half RoPE layout to llama.cpp's
interleaved pairs, and adds the ``llama.*`` hyperparameters and the tokenizer's vocabulary. The file is
written to a temporary sibling and renamed into place.

:func:`read_gguf_header` parses the header only (metadata and tensor table) and says where every tensor's
bytes are and how many there are, so a file's size can be accounted without reading its weights.

:class:`GGUFFormat` is the ``gguf`` entry of the format registry: for a linear of a given shape under a layout it
declares the one tensor the file stores (its ggml type: the layout's, or the smallest exact one for the recipe),
so ``quantlm.accounting`` predicts a GGUF export's size from config + recipe, and it writes a whole model as
``<out>/model.gguf`` with its ``quantlm.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from quantlm.atomic import atomic_path
from quantlm.errors import QuantlmError
from quantlm.formats import gguf_blocks as gb
from quantlm.formats.registry import LOG2_3, Format, Layout, TensorSpec, register
from quantlm.hf_checkpoint import block_map_for
from quantlm.metadata import model_label
from quantlm.quantized import QuantizedLinear, TernaryWeight
from quantlm.specs import spec_from_config

ARCH = "llama"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
_SKIP = re.compile(r"(rotary_emb\.inv_freq|\.g_idx)$")
# general.file_type from the type holding most linear weights (informational in llama.cpp)
_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
              "Q3_K": 11, "Q6_K": 18, "BF16": 32, "TQ1_0": 36, "TQ2_0": 37}
# gguf-py's own round-to-nearest quantizers, for plain float weights written as a block type on request
_RTN_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0")


def gguf_name(hf_name: str) -> str | None:
    """llama.cpp's name for an HF LLaMA tensor name; None for tensors GGUF does not store (rotary inv_freq)."""
    if _SKIP.search(hf_name):
        return None
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    m = _LAYER.match(hf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    raise QuantlmError(f"{hf_name}: not a tensor of a LLaMA model; GGUF export covers LlamaForCausalLM "
                       "(embed_tokens, layers.N.{self_attn,mlp,*_layernorm}, norm, lm_head)")


_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_HF_LAYER_NAMES = {v: k for k, v in _LAYER_NAMES.items()}
_HF_TOP_NAMES = {v: k for k, v in _TOP_NAMES.items()}


def hf_name(name: str) -> str | None:
    """The HF LLaMA tensor name of a llama.cpp tensor name (the inverse of :func:`gguf_name`); None if unknown."""
    if name in _HF_TOP_NAMES:
        return _HF_TOP_NAMES[name]
    m = _GGUF_LAYER.match(name)
    if m and m.group(2) in _HF_LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_HF_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def rope_permutation(rows: int, n_head: int) -> Tensor:
    """Row order taking HF's rotate-half q/k rows to llama.cpp's interleaved pairs: new = old[perm].

    Within each head of d rows, HF keeps the pairs' first halves in rows 0..d/2-1 and the second halves in
    d/2..d-1; llama.cpp wants pair i in rows 2i, 2i+1. So new row 2i + j of a head is old row j*d/2 + i.
    """
    if rows % (2 * n_head):
        raise QuantlmError(f"{rows} q/k rows do not split into {n_head} heads of even size")
    half = rows // n_head // 2
    idx = torch.arange(rows).view(n_head, 2, half)  # old rows, [head, j, i]
    return idx.transpose(1, 2).reshape(rows)  # [head, i, j] -> old row


def _hparams(config: Mapping) -> dict:
    def need(key):
        if config.get(key) is None:
            raise QuantlmError(f"config has no {key!r}; write_gguf needs a LLaMA config.json")
        return int(config[key])

    model_type = config.get("model_type", ARCH)
    if model_type != ARCH:
        raise QuantlmError(f"model_type {model_type!r}: GGUF export writes LLaMA models only")
    if config.get("hidden_act", "silu") != "silu":
        raise QuantlmError(f"hidden_act {config['hidden_act']!r}: llama.cpp's LLaMA uses silu")
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise QuantlmError(f"rope type {rope_type!r} is not supported by the GGUF export; only plain RoPE")
    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    head_dim = int(config.get("head_dim") or hidden // heads)
    return {
        "n_layer": need("num_hidden_layers"), "hidden": hidden, "ffn": need("intermediate_size"),
        "n_head": heads, "n_head_kv": int(config.get("num_key_value_heads") or heads), "head_dim": head_dim,
        "n_ctx": int(config.get("max_position_embeddings") or 2048), "vocab": need("vocab_size"),
        "eps": float(config.get("rms_norm_eps", 1e-6)),
        "theta": float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        "tied": bool(config.get("tie_word_embeddings", False)),
    }


# ---------------------------------------------------------------------------------------------------------
# Tokenizer metadata


_BYTE_PIECE = re.compile(r"^<0x[0-9A-F]{2}>$")
_SPACE = "\u2581"  # SentencePiece's visible space


def _spm_prefix(tj: dict) -> bool | None:
    """For a SentencePiece-style tokenizer.json: whether it adds the dummy space prefix (None: not that style).

    Two HF forms: a Metaspace pre-tokenizer (transformers 5's conversion of a tokenizer.model) or the older
    normalizer Sequence[Prepend("\u2581"), Replace(" ", "\u2581")] with no pre-tokenizer.
    """
    pre, norm = tj.get("pre_tokenizer") or {}, tj.get("normalizer") or {}
    if pre.get("type") == "Metaspace" and pre.get("replacement", _SPACE) == _SPACE and not norm:
        if pre.get("split", True):
            raise QuantlmError("a Metaspace pre-tokenizer with split=True cuts words apart before BPE, which "
                               "llama.cpp's SentencePiece tokenizer does not; tokens would differ")
        scheme = pre.get("prepend_scheme", "always" if pre.get("add_prefix_space", True) else "never")
        return scheme in ("first", "always")
    if not pre and norm.get("type") == "Sequence":
        steps = [(n.get("type"), n.get("prepend"), (n.get("pattern") or {}).get("String"), n.get("content"))
                 for n in norm.get("normalizers", [])]
        replace = ("Replace", None, " ", _SPACE)
        if steps == [replace]:
            return False
        if steps == [("Prepend", _SPACE, None, None), replace]:
            return True
    return None


def tokenizer_metadata(tokenizer_dir: str | os.PathLike, vocab_size: int) -> dict:
    """GGUF tokenizer keys for an HF tokenizer directory, the token list padded to ``vocab_size``.

    Two kinds, each in the form llama.cpp reproduces exactly:
    * byte-level BPE (ByteLevel pre-tokenizer with its GPT-2 regex, e.g. GPT-NeoX's and quantlm's own):
      ``tokenizer.ggml.model`` = gpt2, ``pre`` = gpt-2, tokens, merges ("a b");
    * SentencePiece BPE with byte fallback (LLaMA-style; tokenizer.model as transformers converts it, with a
      Metaspace pre-tokenizer, or the older Prepend/Replace normalizer): ``model`` = llama, tokens, scores
      (-rank of the merge that makes each token: llama.cpp merges the best-scored pair, as BPE merges the
      lowest rank), ``add_space_prefix``.
    Both: token_type (1 normal, 2 unknown, 3 control for special added tokens, 4 user-defined for other
    added tokens, 5 unused padding, 6 byte for <0xXX> pieces), the special ids transformers reports, and
    whether it adds bos/eos (found by tokenizing). The tokenizer.json is read from the directory, or
    produced by transformers from tokenizer.model when absent. Other tokenizers: a QuantlmError.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    path = Path(tokenizer_dir) / "tokenizer.json"
    if path.is_file():
        tj = json.loads(path.read_text(encoding="utf-8"))
    elif getattr(tok, "backend_tokenizer", None) is not None:
        tj = json.loads(tok.backend_tokenizer.to_str())
    else:
        raise QuantlmError(f"{tokenizer_dir}: no tokenizer.json and transformers gives no fast tokenizer for it")
    model = tj.get("model") or {}
    pre = tj.get("pre_tokenizer") or {}
    byte_level = pre.get("type") == "ByteLevel"
    spm_prefix = None if byte_level else _spm_prefix(tj)
    if model.get("type") != "BPE" or not (byte_level or spm_prefix is not None):
        raise QuantlmError(f"{path}: GGUF export takes byte-level BPE or SentencePiece-style BPE tokenizers; this "
                           f"one has model {model.get('type')!r}, pre_tokenizer {pre.get('type')!r} and normalizer "
                           f"{(tj.get('normalizer') or {}).get('type')!r}")
    if byte_level:
        if not pre.get("use_regex", True) or pre.get("add_prefix_space"):
            raise QuantlmError(f"{path}: ByteLevel without its GPT-2 regex or with add_prefix_space=True has no "
                               "llama.cpp gpt2 equivalent; tokens would differ")
        if tj.get("normalizer") is not None:
            raise QuantlmError(f"{path}: a normalizer ({tj['normalizer'].get('type')}) has no llama.cpp gpt2 "
                               "equivalent; tokens would differ")
    elif not model.get("byte_fallback"):
        raise QuantlmError(f"{path}: a SentencePiece-style BPE without byte_fallback maps unknown characters to "
                           "<unk>, which llama.cpp does differently; tokens would differ")

    tokens: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    types = {i: 1 for i in tokens}
    for added in tj.get("added_tokens", []):
        tokens[int(added["id"])] = added["content"]
        types[int(added["id"])] = 3 if added.get("special") else 4
    if model.get("unk_token") in model["vocab"]:
        types[int(model["vocab"][model["unk_token"]])] = 2
    n = max(tokens) + 1 if tokens else 0
    if n > vocab_size:
        raise QuantlmError(f"{path}: the tokenizer has {n} tokens, more than the model's vocab_size {vocab_size}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    token_list = [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    type_list = [types.get(i, 5) for i in range(vocab_size)]
    if byte_level:
        meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": token_list,
                "tokenizer.ggml.token_type": type_list, "tokenizer.ggml.merges": merges}
    else:
        rank: dict[str, int] = {}
        for r, m in enumerate(merges):
            rank.setdefault(m.replace(" ", "", 1), r)
        type_list = [6 if _BYTE_PIECE.match(t) and ty != 5 else ty for t, ty in zip(token_list, type_list, strict=True)]
        meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
                "tokenizer.ggml.tokens": token_list,
                # a piece no merge makes (single characters, bytes, specials) is never a merge result in
                # transformers: the lowest score keeps llama.cpp from preferring it
                "tokenizer.ggml.scores": [-float(rank[t]) if t in rank else -1e9 for t in token_list],
                "tokenizer.ggml.token_type": type_list, "tokenizer.ggml.add_space_prefix": bool(spm_prefix)}
    for key, tid in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("unknown", tok.unk_token_id),
                     ("padding", tok.pad_token_id)):
        if tid is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = int(tid)
    plain = tok("a b", add_special_tokens=False)["input_ids"]
    full = tok("a b")["input_ids"]
    meta["tokenizer.ggml.add_bos_token"] = bool(len(full) > len(plain) and full[0] == tok.bos_token_id)
    meta["tokenizer.ggml.add_eos_token"] = bool(len(full) > len(plain) and full[-1] == tok.eos_token_id)
    return meta


# ---------------------------------------------------------------------------------------------------------
# Writing


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
    """Write a LLaMA GGUF for llama.cpp; return a report of what went where.

    config: the HF config.json as a dict. tensors: HF names (``model.layers.N.self_attn.q_proj.weight``, ...)
    to plain tensors, ``QuantizedLinear`` or ``TernaryWeight``. Norms are stored F32; other plain tensors
    (embedding, LM head, unquantized linears) as ``float_type`` (F16, the Spectra convention; BF16, F32).
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

    hp = _hparams(config)
    if float_type not in gb.FLOAT_TYPES:
        raise QuantlmError(f"float_type {float_type!r}: use one of {', '.join(gb.FLOAT_TYPES)}")
    tied = hp["tied"]
    if not tied and "lm_head.weight" not in tensors:
        raise QuantlmError("config says the LM head is not tied (tie_word_embeddings false) but no lm_head.weight "
                           "was given; pass the whole state dict")
    entries = []  # (gguf name, array, raw ggml type or None, report row)
    linear_weights: dict[str, int] = {}
    for hf_name, w in tensors.items():
        name = gguf_name(hf_name)
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
        if isinstance(w, (QuantizedLinear, TernaryWeight)):
            if not is_linear:
                raise QuantlmError(f"{hf_name}: only block linear weights may be quantized for GGUF")
            row["shape"] = list(w.shape)
            if type_name in gb.FLOAT_TYPES:
                ref = w.stored(hf_name).dequantize() if isinstance(w, QuantizedLinear) else w.dequantize()
                arr, raw = _float_array(ref, type_name)
                rounded = ref.to({"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[type_name])
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
            elif type_name in _RTN_TYPES:
                gb.bytes_per_row(type_name, t.shape[-1], hf_name)  # the width check, with the layer's name
                src = t.to(torch.float16).to(torch.float32).numpy()
                raw = gguf.GGMLQuantizationType[type_name]
                arr = gguf.quants.quantize(src, raw)
                err = float(np.abs(gguf.quants.dequantize(arr, raw).reshape(src.shape) - src).max()) if src.size else 0.0
                row.update(exact=False, weight_error=err,
                           note=f"round-to-nearest {type_name} by gguf-py (from the fp16 weights)")
            else:
                raise QuantlmError(f"{hf_name}: a plain float weight cannot be written as {type_name} (gguf-py "
                                   f"quantizes only {', '.join(_RTN_TYPES)}); quantize it with quantlm first")
        if name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = hp["n_head"] if ".attn_q." in name else hp["n_head_kv"]
            arr = arr[rope_permutation(arr.shape[0], heads).numpy()]
        if is_linear:
            linear_weights[type_name] = linear_weights.get(type_name, 0) + int(np.prod(row["shape"]))
        row["nbytes"] = int(arr.nbytes)
        entries.append((name, np.ascontiguousarray(arr), raw, row))
    missing = {"token_embd.weight", "output_norm.weight"} - {e[0] for e in entries}
    if missing:
        raise QuantlmError(f"tensors lack {', '.join(sorted(missing))}: pass the whole model's state dict")
    main_type = max(linear_weights, key=linear_weights.get) if linear_weights else float_type
    quantized = main_type not in gb.FLOAT_TYPES
    tok_meta = tokenizer_metadata(tokenizer_dir, hp["vocab"])

    path = Path(path)
    with atomic_path(path) as tmp, _quiet("gguf.gguf_writer"):
        writer = gguf.GGUFWriter(str(tmp), ARCH)
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
        writer.add_file_type(_FILE_TYPE.get(main_type, 1))
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


# ---------------------------------------------------------------------------------------------------------
# Reading the header


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_CHUNK = 1 << 16


class _HeaderStream:
    """Sequential little-endian reads from a file, fetched in 64 KiB chunks (so at most one chunk past the header)."""

    def __init__(self, f):
        self.f = f
        self.buf = b""
        self.pos = 0  # absolute offset of the next byte to parse
        self.base = 0  # absolute offset of buf[0]

    def take(self, n: int) -> bytes:
        start = self.pos - self.base
        while len(self.buf) - start < n:
            more = self.f.read(max(_CHUNK, n))
            if not more:
                raise QuantlmError(f"{self.f.name}: truncated GGUF header at byte {self.pos}")
            self.buf = self.buf[start:] + more
            self.base = self.pos
            start = 0
        self.pos += n
        return self.buf[start:start + n]

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("<Q")).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.unpack("<I"), self.unpack("<Q")
            if itype in _SCALARS:
                fmt = _SCALARS[itype]
                size = struct.calcsize(fmt)
                return list(struct.unpack(f"<{count}{fmt[1]}", self.take(size * count)))
            return [self.value(itype) for _ in range(count)]
        raise QuantlmError(f"{self.f.name}: unknown GGUF value type {vtype} at byte {self.pos}")


def read_gguf_header(path: str | os.PathLike) -> dict:
    """The header of a GGUF file (metadata and tensor table), parsed without reading tensor data.

    Returns a dict:
      path, version, alignment (general.alignment or 32), file_bytes (size on disk);
      metadata: {key: value} (arrays as lists), metadata_bytes (the key/value section),
      tensor_info_bytes (the tensor table), header_bytes (offset of the data section: magic, counts,
      metadata, tensor table and the padding to the alignment);
      tensors: [{name, type (ggml type name), type_id, shape (HF order, [out, in]), ne (ggml order),
      n_elements, nbytes (from shape and type: blocks * bytes per block), offset (absolute byte offset of
      its data)}], in file order;
      payload_bytes: sum of the tensors' nbytes (so 8 * payload_bytes is the weights' bits);
      padding_bytes: file_bytes - header_bytes - payload_bytes (alignment padding between tensors);
      consistent: every tensor lies inside the file, in order, without overlap, and the file ends at the
      last tensor's aligned end.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    file_bytes = path.stat().st_size
    with open(path, "rb") as f:
        s = _HeaderStream(f)
        if s.take(4) != b"GGUF":
            raise QuantlmError(f"{path}: not a GGUF file (bad magic)")
        version = s.unpack("<I")
        if version < 2:
            raise QuantlmError(f"{path}: GGUF version {version} is too old (need 2 or later)")
        n_tensors, n_kv = s.unpack("<Q"), s.unpack("<Q")
        kv_start = s.pos
        metadata = {}
        for _ in range(n_kv):
            key = s.string()
            metadata[key] = s.value(s.unpack("<I"))
        ti_start = s.pos
        infos = []
        for _ in range(n_tensors):
            name = s.string()
            n_dims = s.unpack("<I")
            ne = [s.unpack("<Q") for _ in range(n_dims)]
            type_id, offset = s.unpack("<I"), s.unpack("<Q")
            infos.append((name, ne, type_id, offset))
        ti_end = s.pos
    alignment = int(metadata.get("general.alignment", 32))
    data_start = -(-ti_end // alignment) * alignment
    tensors, payload, end, consistent = [], 0, data_start, True
    for name, ne, type_id, offset in infos:
        try:
            qtype = GGMLQuantizationType(type_id)
            block, size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise QuantlmError(f"{path}: tensor {name} has unknown ggml type {type_id}") from None
        n = int(np.prod(ne)) if ne else 1
        nbytes = n // block * size
        start = data_start + offset
        consistent &= start >= end and start + nbytes <= file_bytes and offset % alignment == 0
        end = -(-(start + nbytes) // alignment) * alignment
        payload += nbytes
        tensors.append({"name": name, "type": qtype.name, "type_id": type_id, "shape": list(reversed(ne)),
                        "ne": ne, "n_elements": n, "nbytes": nbytes, "offset": start})
    consistent &= end == file_bytes or (not tensors and data_start >= file_bytes)
    return {"path": str(path), "version": version, "alignment": alignment, "file_bytes": file_bytes,
            "metadata": metadata, "metadata_bytes": ti_start - kv_start, "tensor_info_bytes": ti_end - ti_start,
            "header_bytes": data_start, "tensors": tensors, "payload_bytes": payload,
            "padding_bytes": file_bytes - data_start - payload, "consistent": bool(consistent)}


# ---------------------------------------------------------------------------------------------------------
# The gguf entry of the format registry

GGUF_FILE = "model.gguf"
_ALLOWED = {"floatlm": gb.FLOAT_TYPES + _RTN_TYPES, "quantlm": gb.FLOAT_TYPES + gb.LINEAR_TYPES,
            "trilm": gb.FLOAT_TYPES + gb.TERNARY_TYPES}


def quantlm_keys(layout: Layout) -> dict:
    """The ``quantlm.*`` header keys: what the file's block linears are (family, bits, group size, shards), so a
    GGUF file alone is accounted under every convention (``quantlm size FILE.gguf``)."""
    keys: dict = {"quantlm.family": layout.family}
    if layout.family == "quantlm":
        keys.update({"quantlm.bits": layout.bits, "quantlm.group_size": layout.group_size, "quantlm.sym": layout.sym})
    if layout.family == "trilm":
        keys["quantlm.model_parallel"] = layout.mp
    return keys


class GGUFFormat(Format):
    """A whole LLaMA model as one llama.cpp GGUF file: block linears in a ggml block type (bit-exact from GPTQ codes
    or ternary weights), embedding and head in the float type, norms F32."""

    name = "gguf"
    families = ("floatlm", "quantlm", "trilm")
    container = "gguf"

    def check(self, layout):
        if layout.float_dtype not in gb.FLOAT_TYPES:
            raise QuantlmError(f"GGUF float type {layout.float_dtype!r}: use one of {', '.join(gb.FLOAT_TYPES)}")
        t = layout.gguf_type
        if t:
            gb.ggml_type(t)
            if t not in _ALLOWED[layout.family]:
                raise QuantlmError(f"a {layout.family}'s block linears cannot be written as {t}; GGUF types for a "
                                   f"{layout.family}: {', '.join(_ALLOWED[layout.family])}")
        if layout.kquant_grouped and layout.family != "quantlm":
            raise QuantlmError("kquant_grouped re-quantizes the group scales of GPTQ codes; it applies to a QuantLM")
        if layout.merge_shard_scales and layout.family != "trilm":
            raise QuantlmError("merge_shard_scales merges TriLM scale shards; it applies to a TriLM")

    def describe(self, layout):
        default = {"floatlm": layout.float_dtype, "quantlm": "the smallest exact type", "trilm": "TQ1_0"}
        opts = [o for o, on in (("K-quant scales re-quantized", layout.kquant_grouped),
                                ("straddling shard scales merged", layout.merge_shard_scales)) if on]
        return (f"GGUF: block linears {layout.gguf_type or default[layout.family]}, embedding and head "
                f"{layout.float_dtype}, norms F32" + "".join(f", {o}" for o in opts))

    def linear_type(self, out: int, in_features: int, layout: Layout, kind: str, name: str = "") -> str:
        """The ggml type of a block linear of this shape: the layout's ``gguf_type`` (checked to hold it exactly,
        or with the layout's opt-ins), else the float type for a FloatLM and the smallest exact type otherwise
        (``gguf_blocks.choose_type``: Q4_0 for <= 4-bit codes, ..., TQ1_0 for a TriLM). From shapes alone."""
        name = name or f"a [{out}, {in_features}] block linear"
        t = layout.gguf_type
        if layout.family == "floatlm":
            t = t or layout.float_dtype
            if t not in gb.FLOAT_TYPES:
                gb.bytes_per_row(t, in_features, name)
            return t
        if t in gb.FLOAT_TYPES:
            return t
        w = gb.shaped((out, in_features), bits=layout.bits if layout.family == "quantlm" else None, sym=layout.sym,
                      group_size=layout.group_size, mp=layout.mp, kind=kind)
        opts = {"kquant_grouped": layout.kquant_grouped, "merge_shard_scales": layout.merge_shard_scales}
        if not t:
            return gb.choose_type(w, name=name, **opts)
        gb.check_fits(w, t, name=name, **opts)
        return t

    def linear_tensors(self, out, in_features, layout, kind):
        t = self.linear_type(out, in_features, layout, kind)
        params = out * in_features
        if t in gb.FLOAT_TYPES:
            code_bits = LOG2_3 + 16.0 * layout.mp / params if layout.family == "trilm" else None
            return [TensorSpec(".weight", t, (out, in_features), "weight", params, code_bits)]
        info = {"quantlm": layout.bits, "trilm": LOG2_3}.get(layout.family)  # a FloatLM's RTN blocks: as stored
        code_bits = None if info is None else info + gb.scale_bits_per_weight(t)
        return [TensorSpec(".weight", "U8", (out, gb.bytes_per_row(t, in_features)), "codes", params, code_bits)]

    def norm_dtype(self, layout):
        return "F32"

    def preflight(self, model_dir, config, layout):
        """Before any compute: a LLaMA config llama.cpp runs, a type for every linear, a tokenizer it reproduces."""

        _hparams(config)
        block_map = block_map_for(config, str(model_dir))
        for rel, (out_f, in_f) in spec_from_config(config, str(model_dir)).linear_shapes().items():
            self.linear_type(out_f, in_f, layout, block_map.shard_kind(rel), f"{block_map.layers_path}.N.{rel}")
        tokenizer_metadata(model_dir, int(config["vocab_size"]))

    def write(self, out, config, dense, linears, layout, block_map, meta, tokenizer_dir=None):
        """``out/model.gguf``: every tensor of ``dense`` and ``linears``, each linear in :meth:`linear_type`.
        Returns the payload bytes and what ``quantlm.json`` records about the file (the writer checks the size
        against the accounting and writes ``quantlm.json``)."""
        if tokenizer_dir is None:
            raise QuantlmError("a GGUF file embeds the tokenizer: pass the directory holding the model's tokenizer")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tensors, types = dict(dense), {}
        for name, value in linears.items():
            out_f, in_f = value.shape
            types[name + ".weight"] = self.linear_type(out_f, in_f, layout, block_map.shard_kind(name), name)
            tensors[name + ".weight"] = value
        label = meta.model
        if meta.producer == "quantize":

            label = model_label(out, meta)
        report = write_gguf(out / GGUF_FILE, config, tensors, tokenizer_dir, float_type=layout.float_dtype,
                            linear_type=types, kquant_grouped=layout.kquant_grouped,
                            merge_shard_scales=layout.merge_shard_scales, metadata=quantlm_keys(layout),
                            model_name=label or None)
        counts: dict[str, int] = {}
        for t in types.values():
            counts[t] = counts.get(t, 0) + 1
        info = {"changes": report["changes"],
                "gguf": {"file": GGUF_FILE, "file_type": report["file_type"], "linear_types": counts,
                         "payload_bytes": report["payload_bytes"], "header_bytes": report["header_bytes"],
                         "file_bytes": report["file_bytes"]}}
        return {"payload_bytes": report["payload_bytes"], "info": info}


GGUF = register(GGUFFormat())
