"""llama.cpp's names for a decoder's tensors (and back), per family, the q/k row permutation from HF's rotate-half
RoPE layout to llama.cpp's interleaved pairs, and each family's ``<arch>.*`` hyperparameters.

Families are data: :data:`GGUF_FAMILIES` gives, per ``model_type`` of :mod:`quantlm.architectures` whose
``gguf_arch`` is set, llama.cpp's architecture name, the block tensor names, whether q/k rows are permuted (llama.cpp
runs LLaMA-style "normal" RoPE on interleaved pairs and NEOX RoPE, as HF does, on halves), what is added to the norm
weights (Gemma's ``(1 + w)`` RMSNorm: llama.cpp multiplies by the stored weight), the activation its graph uses,
the extra keys written from config fields, the rope types it writes (plain RoPE, and those llama.cpp applies as
per-frequency factors in ``rope_freqs.weight``) and the config values llama.cpp's graph cannot express (refused).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from quantlm.architectures import ARCHITECTURES, architecture_for
from quantlm.errors import QuantlmError
from quantlm.specs import rope_type_of

ARCH = "llama"  # the default family (and the architecture of a GGUF file without general.architecture)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_LLAMA_LAYER = (
    ("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"), ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"),
)
_QK_NORMS = (("self_attn.q_norm", "attn_q_norm"), ("self_attn.k_norm", "attn_k_norm"))
_LINEARS = tuple(p for p in _LLAMA_LAYER if "proj" in p[0])
# Gemma 2/3: a norm before and after attention and MLP; llama.cpp's ffn_norm is the pre-MLP one
_GEMMA_NORMS = (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "post_attention_norm"),
                ("pre_feedforward_layernorm", "ffn_norm"), ("post_feedforward_layernorm", "post_ffw_norm"))
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
ROPE_FREQS = "rope_freqs.weight"  # gguf's MODEL_TENSOR.ROPE_FREQS: F32 [head_dim / 2], one for all blocks
EXTRA_ROLES = {ROPE_FREQS: "rope"}  # the accounting role of the tensors computed from the config
_SKIP = re.compile(r"(rotary_emb\.inv_freq|\.g_idx)$")
# general.file_type from the type holding most linear weights (informational in llama.cpp)
FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
              "Q3_K": 11, "Q6_K": 18, "BF16": 32, "TQ1_0": 36, "TQ2_0": 37}
# gguf-py's own round-to-nearest quantizers, for plain float weights written as a block type on request
RTN_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0")

# ------------------------------------------------------------------------------- config readers for the table


def _rope(config: Mapping, layer_type: str = "full_attention") -> dict:
    """The rope parameters of a config (transformers 5's ``rope_parameters``, per layer type for Gemma 3, or the
    older ``rope_scaling`` + ``rope_theta``)."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if layer_type in rope and isinstance(rope[layer_type], Mapping):
        rope = dict(rope[layer_type])
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return rope


def _head_dim(config: Mapping) -> int:
    return int(config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"]))


def _llama3_factors(config: Mapping) -> Tensor:
    """Llama 3.1's rope scaling as llama.cpp applies it: per frequency, the divisor of RoPE's inverse frequency
    base^(-2i/d). With wavelength 2 pi / inv_freq and the original context L: wavelengths shorter than
    L / high_freq_factor are kept (1), longer than L / low_freq_factor divided by ``factor``, and in between the
    scaled frequency is interpolated, s = (L / wavelength - low) / (high - low), inv_freq * ((1 - s) / factor + s)."""
    rope = _rope(config)
    need = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    lacks = [k for k in need if rope.get(k) is None]
    if lacks:
        raise QuantlmError(f"rope type 'llama3' lacks {', '.join(lacks)}; add them to the config's rope_parameters")
    factor, low, high = (float(rope[k]) for k in need[:3])
    if not high > low:
        raise QuantlmError(f"rope type 'llama3': high_freq_factor {high:g} must exceed low_freq_factor {low:g}; "
                           "fix the config's rope_parameters")
    ctx, d = float(rope["original_max_position_embeddings"]), _head_dim(config)
    inv_freq = float(rope["rope_theta"]) ** -(torch.arange(0, d, 2, dtype=torch.float64) / d)
    wavelength = 2 * math.pi / inv_freq
    s = (ctx / wavelength - low) / (high - low)
    between = 1.0 / ((1.0 - s) / factor + s)
    divisor = torch.where(wavelength < ctx / high, 1.0, torch.where(wavelength > ctx / low, factor, between))
    return divisor.to(torch.float32)


def _layer_types(config: Mapping, every: int) -> str | None:
    """None if the config's sliding/full layers are llama.cpp's fixed pattern (every ``every``-th layer full)."""
    n = int(config["num_hidden_layers"])
    want = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)]
    got = list(config.get("layer_types") or want)
    return None if got == want else (f"layer_types {got} differ from llama.cpp's fixed pattern (every {every}"
                                     f"{'nd' if every == 2 else 'th'} layer full attention, the others sliding)")


def _query_scalar(config: Mapping) -> str | None:
    """Gemma's attention scale 1/sqrt(query_pre_attn_scalar): llama.cpp uses 1/sqrt(head_dim) (27B aside)."""
    scalar, hd = config.get("query_pre_attn_scalar"), _head_dim(config)
    return None if scalar in (None, hd) else (f"query_pre_attn_scalar {scalar} differs from head_dim {hd}; llama.cpp "
                                              "scales attention by 1/sqrt(head_dim)")


def _no_softcap(config: Mapping) -> str | None:
    caps = {k: config.get(k) for k in ("attn_logit_softcapping", "final_logit_softcapping") if config.get(k)}
    return f"{caps}: llama.cpp's gemma3 has no logit soft-capping" if caps else None


def _local_theta(config: Mapping) -> float:
    """The sliding layers' rope_theta (Gemma 3: ``rope_parameters["sliding_attention"]`` or the older
    ``rope_local_base_freq``)."""
    rope = config.get("rope_parameters") or {}
    if isinstance(rope.get("sliding_attention"), Mapping):
        return float(rope["sliding_attention"].get("rope_theta", 10000.0))
    return float(config.get("rope_local_base_freq") or 10000.0)


def _full_rotary(config: Mapping) -> str | None:
    f = _rope(config).get("partial_rotary_factor", config.get("partial_rotary_factor")) or 1.0
    return None if float(f) == 1.0 else f"partial_rotary_factor {f}: the GGUF export writes full-width RoPE"


def _no_bias(config: Mapping) -> str | None:
    return "attention_bias true: llama.cpp's qwen3 has no q/k/v/o biases" if config.get("attention_bias") else None


def _f(field: str) -> Callable[[Mapping], float | None]:
    return lambda config: None if config.get(field) is None else float(config[field])


def _sliding_layers(config: Mapping) -> list[bool] | None:
    """Per layer, whether it attends through the sliding window (transformers' ``layer_types``)."""
    types = config.get("layer_types")
    return None if not types else [t == "sliding_attention" for t in types]


def _window(config: Mapping) -> int | None:
    return None if config.get("sliding_window") is None else int(config["sliding_window"])


@dataclass(frozen=True)
class GGUFFamily:
    """How one decoder family is written for llama.cpp.

    arch: llama.cpp's architecture name. layer: (HF block-relative path, llama.cpp name) per block tensor.
    rope_permute: q/k rows (and biases) go from HF's rotate-half halves to interleaved pairs (llama.cpp's "normal"
    RoPE); False for the archs llama.cpp runs with NEOX RoPE (halves, as HF). norm_offset: added to every norm
    weight. activations: the config's activation values llama.cpp's graph computes (read from ``act_field``).
    floats / ints: (key suffix after ``<arch>.``, config reader) written when the reader gives a value.
    checks: readers giving a reason the config cannot be run by llama.cpp (None: fine).
    rope_factors: (rope_type, reader) for the rope scalings llama.cpp applies as per-frequency divisors of the
    inverse frequencies: the reader gives the F32 [head_dim / 2] ``rope_freqs.weight``. Plain RoPE ("default") is
    always written; any other rope type is refused.
    """

    arch: str
    layer: tuple[tuple[str, str], ...]
    rope_permute: bool = True
    norm_offset: float = 0.0
    activations: tuple[str, ...] = ("silu",)
    act_field: str = "hidden_act"
    floats: tuple[tuple[str, Callable[[Mapping], float | None]], ...] = ()
    ints: tuple[tuple[str, Callable[[Mapping], int | None]], ...] = ()
    bools: tuple[tuple[str, Callable[[Mapping], list[bool] | None]], ...] = ()  # arrays of bools (one per layer)
    checks: tuple[Callable[[Mapping], str | None], ...] = ()
    rope_factors: tuple[tuple[str, Callable[[Mapping], Tensor]], ...] = ()


_GEMMA_ACT = ("gelu_pytorch_tanh", "gelu_tanh")  # llama.cpp's ggml_gelu is the tanh approximation
GGUF_FAMILIES: dict[str, GGUFFamily] = {
    # Llama 3.1+ rope scaling: llama.cpp's llama divides its frequencies by rope_freqs (as convert_hf_to_gguf.py
    # writes it), with no rope.scaling.* key (a scaling factor key would scale every frequency again)
    "llama": GGUFFamily("llama", _LLAMA_LAYER, rope_factors=(("llama3", _llama3_factors),)),
    # MistralForCausalLM is written as llama.cpp's llama (as convert_hf_to_gguf.py does); its llama graph has no
    # sliding window: a window shorter than the context is refused in hparams below
    "mistral": GGUFFamily("llama", _LLAMA_LAYER),
    "qwen2": GGUFFamily("qwen2", _LLAMA_LAYER, rope_permute=False),
    "qwen3": GGUFFamily("qwen3", _LLAMA_LAYER + _QK_NORMS, rope_permute=False, checks=(_no_bias,)),
    "olmo2": GGUFFamily("olmo2", _LINEARS + _QK_NORMS + (("post_attention_layernorm", "post_attention_norm"),
                                                         ("post_feedforward_layernorm", "post_ffw_norm")),
                        rope_permute=False),
    "gemma2": GGUFFamily("gemma2", _LINEARS + _GEMMA_NORMS, rope_permute=False, norm_offset=1.0,
                         activations=_GEMMA_ACT, act_field="hidden_activation",
                         floats=(("attn_logit_softcapping", _f("attn_logit_softcapping")),
                                 ("final_logit_softcapping", _f("final_logit_softcapping"))),
                         ints=(("attention.sliding_window", _window),),
                         checks=(_query_scalar, lambda c: _layer_types(c, 2))),
    "gemma3_text": GGUFFamily("gemma3", _LINEARS + _GEMMA_NORMS + _QK_NORMS, rope_permute=False, norm_offset=1.0,
                              activations=_GEMMA_ACT, act_field="hidden_activation",
                              floats=(("rope.freq_base_swa", _local_theta),),
                              ints=(("attention.sliding_window", _window),),
                              bools=(("attention.sliding_window_pattern", _sliding_layers),),
                              checks=(_query_scalar, _no_softcap)),
    "granite": GGUFFamily("granite", _LLAMA_LAYER,
                          floats=(("attention.scale", _f("attention_multiplier")),
                                  ("embedding_scale", _f("embedding_multiplier")),
                                  ("residual_scale", _f("residual_multiplier")), ("logit_scale", _f("logits_scaling")))),
    # Phi-3 keeps its fused projections: attn_qkv, and ffn_up holding [gate; up] (llama.cpp's swiglu halves it)
    "phi3": GGUFFamily("phi3", (("input_layernorm", "attn_norm"), ("self_attn.qkv_proj", "attn_qkv"),
                                ("self_attn.o_proj", "attn_output"), ("post_attention_layernorm", "ffn_norm"),
                                ("mlp.gate_up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")),
                       rope_permute=False, checks=(_full_rotary,)),
}


def gguf_family(config_or_type: Mapping | str) -> GGUFFamily:
    """The GGUF family of a config (or ``model_type``); one line naming the families with a writer otherwise."""
    if isinstance(config_or_type, str):
        arch = ARCHITECTURES.get(config_or_type) or architecture_for({"model_type": config_or_type})
    else:
        arch = architecture_for({"model_type": ARCH, **config_or_type}, "config.json")
    fam = GGUF_FAMILIES.get(arch.model_type) if arch.gguf_arch else None
    if fam is None:
        raise QuantlmError(f"model_type {arch.model_type!r}: the GGUF export writes "
                           f"{', '.join(a.model_type for a in ARCHITECTURES.values() if a.gguf_arch)} models")
    return fam


def _families_of(arch: str) -> list[GGUFFamily]:
    return [f for f in GGUF_FAMILIES.values() if f.arch == arch]


def gguf_name(hf_name: str, family: GGUFFamily | str = ARCH) -> str | None:
    """llama.cpp's name for an HF tensor name of ``family`` (a GGUFFamily or a model_type); None for tensors GGUF
    does not store (rotary inv_freq)."""
    fam = gguf_family(family) if isinstance(family, str) else family
    if _SKIP.search(hf_name):
        return None
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    m = _LAYER.match(hf_name)
    names = dict(fam.layer)
    if m and m.group(2) in names:
        return f"blk.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"
    raise QuantlmError(f"{hf_name}: not a tensor the GGUF {fam.arch} export knows; it writes embed_tokens, norm, "
                       f"lm_head and layers.N.{{{','.join(p for p, _ in fam.layer)}}}")


_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def hf_name(name: str, arch: str = ARCH) -> str | None:
    """The HF tensor name of a llama.cpp tensor name in a file of llama.cpp architecture ``arch`` (the inverse of
    :func:`gguf_name`); None if unknown."""
    if name in (hf := {v: k for k, v in _TOP_NAMES.items()}):
        return hf[name]
    m = _GGUF_LAYER.match(name)
    for fam in _families_of(arch):
        back = {v: k for k, v in fam.layer}
        if m and m.group(2) in back:
            return f"model.layers.{m.group(1)}.{back[m.group(2)]}.{m.group(3)}"
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
    """The hyperparameters a GGUF file of this config holds (``family``: its :class:`GGUFFamily`, ``floats`` and
    ``ints``: the family's extra keys, ``tensors``: the F32 tensors computed from the config, e.g. ``rope_freqs.weight``
    for a Llama 3 rope); a config llama.cpp's graph for the family cannot run is one line."""
    def need(key):
        if config.get(key) is None:
            raise QuantlmError(f"config has no {key!r}; write_gguf needs the model's config.json")
        return int(config[key])

    fam = gguf_family(config)
    mt = architecture_for({"model_type": ARCH, **config}).model_type
    act = config.get(fam.act_field) or config.get("hidden_act") or fam.activations[0]
    if act not in fam.activations:
        raise QuantlmError(f"{fam.act_field} {act!r}: llama.cpp's {fam.arch} uses {fam.activations[0]}; "
                           "the GGUF export cannot write this model")
    for check in fam.checks:
        problem = check(config)
        if problem:
            raise QuantlmError(f"{mt}: {problem}; the GGUF export cannot write this model")
    rope = _rope(config)
    rope_type = rope_type_of(config)
    written = ("default", *(t for t, _ in fam.rope_factors))
    if rope_type not in written:
        raise QuantlmError(f"rope type {rope_type!r} is not supported by the GGUF {fam.arch} export; it writes "
                           f"{' and '.join(repr(t) for t in written)} RoPE")
    factors = dict(fam.rope_factors)
    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    n_ctx = int(config.get("max_position_embeddings") or 2048)
    window = config.get("sliding_window")
    if fam.arch == "llama" and window is not None and int(window) < n_ctx:
        raise QuantlmError(f"{mt}: sliding_window {window} < max_position_embeddings {n_ctx}; llama.cpp runs "
                           "MistralForCausalLM as llama with full attention, so the GGUF export cannot write it")
    return {
        "family": fam, "n_layer": need("num_hidden_layers"), "hidden": hidden, "ffn": need("intermediate_size"),
        "n_head": heads, "n_head_kv": int(config.get("num_key_value_heads") or heads), "head_dim": _head_dim(config),
        "n_ctx": n_ctx, "vocab": need("vocab_size"),
        "eps": float(config.get("rms_norm_eps", 1e-6)),
        "theta": float(rope.get("rope_theta", 10000.0)),
        "tied": bool(config.get("tie_word_embeddings", False)),
        "floats": {k: v for k, r in fam.floats if (v := r(config)) is not None},
        "ints": {k: v for k, r in fam.ints if (v := r(config)) is not None},
        "bools": {k: v for k, r in fam.bools if (v := r(config)) is not None},
        "tensors": {ROPE_FREQS: factors[rope_type](config)} if rope_type in factors else {},
    }


def rope_tensors(model_type: str, rope_type: str, head_dim: int) -> dict[str, tuple[int, ...]]:
    """The tensors (llama.cpp name: shape) a GGUF of this family and rope type holds beyond the model's own: the
    accounting's declaration of what :func:`hparams` gives the writer."""
    fam = GGUF_FAMILIES.get(model_type)
    return {ROPE_FREQS: (head_dim // 2,)} if fam and rope_type in dict(fam.rope_factors) else {}
