"""llama.cpp's names for a LLaMA model's tensors (and back), the q/k row permutation from HF's rotate-half RoPE
layout to llama.cpp's interleaved pairs, and the ``llama.*`` hyperparameters of a config."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from quantlm.architectures import ARCHITECTURES, architecture_for
from quantlm.errors import QuantlmError

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
FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
              "Q3_K": 11, "Q6_K": 18, "BF16": 32, "TQ1_0": 36, "TQ2_0": 37}
# gguf-py's own round-to-nearest quantizers, for plain float weights written as a block type on request
RTN_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0")


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


def hparams(config: Mapping) -> dict:
    def need(key):
        if config.get(key) is None:
            raise QuantlmError(f"config has no {key!r}; write_gguf needs a LLaMA config.json")
        return int(config[key])

    arch = architecture_for({"model_type": ARCH, **config}, "config.json")
    if arch.gguf_arch != ARCH:
        raise QuantlmError(f"model_type {arch.model_type!r}: the GGUF export writes "
                           f"{', '.join(a.model_type for a in ARCHITECTURES.values() if a.gguf_arch == ARCH)} models")
    if config.get("hidden_act", "silu") != "silu":
        raise QuantlmError(f"hidden_act {config['hidden_act']!r}: llama.cpp's LLaMA uses silu")
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise QuantlmError(f"rope type {rope_type!r} is not supported by the GGUF export; only plain RoPE")
    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    head_dim = int(config.get("head_dim") or hidden // heads)  # the one default, as specs.ModelSpec.head_dim
    return {
        "n_layer": need("num_hidden_layers"), "hidden": hidden, "ffn": need("intermediate_size"),
        "n_head": heads, "n_head_kv": int(config.get("num_key_value_heads") or heads), "head_dim": head_dim,
        "n_ctx": int(config.get("max_position_embeddings") or 2048), "vocab": need("vocab_size"),
        "eps": float(config.get("rms_norm_eps", 1e-6)),
        "theta": float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        "tied": bool(config.get("tie_word_embeddings", False)),
    }
