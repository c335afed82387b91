"""GGUF export of every family with a writer (quantlm.formats.gguf.names.GGUF_FAMILIES): a small random model of each
family (tests/test_families.py's configs) quantized and exported as GGUF reads back through quantlm's header reader
and gguf-py's GGUFReader with llama.cpp's architecture, keys and tensor names; the file holds the QuantLM's
dequantized weights bit for bit (q/k rows permuted only where llama.cpp runs normal RoPE; Gemma norms + 1; a Llama 3
rope's factors as ``rope_freqs.weight``, transformers' inv_freq ratio), and ``quantlm size`` of the file equals the
prediction from config.json. llama.cpp itself: tests/test_llamacpp_families.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_families import _SMALL, FAMILIES

from quantlm import accounting as acc
from quantlm.errors import QuantlmError
from quantlm.quantize import QuantRecipe, quantize_model
from quantlm.recipes import replace_fields

gguf = pytest.importorskip("gguf")

# the test configs as llama.cpp runs them: Mistral without a sliding window (llama.cpp's llama has none), Gemma with
# query_pre_attn_scalar = head_dim (llama.cpp scales attention by 1/sqrt(head_dim)); the refusals are tested below
EXPORTABLE = {"mistral": dict(sliding_window=None), "gemma2": dict(query_pre_attn_scalar=32),
              "gemma3_text": dict(query_pre_attn_scalar=32)}
GGUF_FAMILY_CONFIGS = {name: (cls, {**extra, **EXPORTABLE.get(name, {})}) for name, (cls, extra) in FAMILIES.items()}
# llama.cpp architecture and the keys each family adds (beyond the shared ones)
EXPECTED = {
    "llama3": ("llama", {"llama.rope.freq_base": 500000.0}),  # and rope_freqs.weight; no rope.scaling.* key
    "mistral": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"qwen3.attention.key_length": 32}),
    "olmo2": ("olmo2", {}),
    "gemma2": ("gemma2", {"gemma2.attn_logit_softcapping": 50.0, "gemma2.final_logit_softcapping": 30.0,
                          "gemma2.attention.sliding_window": 16}),
    "gemma3_text": ("gemma3", {"gemma3.attention.sliding_window": 16, "gemma3.rope.freq_base_swa": 10000.0,
                               "gemma3.rope.freq_base": 1e6,
                               "gemma3.attention.sliding_window_pattern": [True, False, True]}),
    "granite": ("granite", {"granite.attention.scale": 0.0078125, "granite.embedding_scale": 12.0,
                            "granite.residual_scale": 0.22, "granite.logit_scale": 8.0}),
    "phi3": ("phi3", {}),
}
PERMUTED = {"llama3", "mistral", "granite"}  # llama.cpp's normal-RoPE archs; the others run NEOX RoPE on HF's layout
FAST = dict(bits=4, group_size=32, nsamples=4, seqlen=32, method="rtn")


@pytest.fixture(scope="module", params=list(GGUF_FAMILY_CONFIGS))
def exported(request, tmp_path_factory, tiny_tokenizer_dir):
    from gguf_tiny import save_random_model

    name = request.param
    cls, extra = GGUF_FAMILY_CONFIGS[name]
    root = tmp_path_factory.mktemp("ggfam")
    src = save_random_model(root / name, tiny_tokenizer_dir, cls(**{**_SMALL, **extra}), seed=3)
    recipe = replace_fields(QuantRecipe(), formats=("unpacked", "gptq", "gguf"), **FAST)
    rep = quantize_model(src, recipe, root / "q", progress=False)
    return name, src, rep, recipe


def test_every_exportable_family_is_tested():
    from quantlm.formats.gguf.names import GGUF_FAMILIES
    from quantlm.specs import rope_type_of

    configs = [cls(**{**_SMALL, **extra}).to_dict() for cls, extra in GGUF_FAMILY_CONFIGS.values()]
    assert set(EXPECTED) == set(GGUF_FAMILY_CONFIGS)
    assert set(GGUF_FAMILIES) - {"llama"} <= {c["model_type"] for c in configs}  # plain llama: tests/test_gguf.py
    assert {(c["model_type"], rope_type_of(c)) for c in configs} >= {
        (mt, t) for mt, fam in GGUF_FAMILIES.items() for t, _ in fam.rope_factors}  # every rope scaling written


def _hf_rope_factors(model_dir) -> np.ndarray:
    """What llama.cpp must divide RoPE's plain inverse frequencies by to get transformers' (the model's rotary
    inv_freq): the ratio base^(-2i/d) / inv_freq."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    inv_freq = AutoModelForCausalLM.from_config(config).model.rotary_emb.inv_freq.double()
    d = config.head_dim
    plain = config.rope_parameters["rope_theta"] ** -(torch.arange(0, d, 2, dtype=torch.float64) / d)
    return (plain / inv_freq).numpy()


def test_the_export_reads_back_with_llamacpp_names_keys_and_the_quantlm_weights(exported):
    from safetensors.torch import load_file

    from quantlm.formats.gguf import hf_name, read_gguf_header, rope_permutation
    from quantlm.formats.gguf.names import GGUF_FAMILIES, ROPE_FREQS, gguf_name
    from quantlm.formats.loader import load_model

    name, src, rep, _ = exported
    config = json.loads((src / "config.json").read_text())
    fam = GGUF_FAMILIES[config["model_type"]]
    arch, keys = EXPECTED[name]
    path = f"{rep['paths']['gguf']}/model.gguf"
    md = read_gguf_header(path)["metadata"]
    assert md["general.architecture"] == fam.arch == arch
    for k, v in {f"{arch}.block_count": 3, f"{arch}.embedding_length": 64, f"{arch}.attention.head_count": 4,
                 f"{arch}.attention.head_count_kv": 2, f"{arch}.feed_forward_length": 128, **keys}.items():
        assert md[k] == pytest.approx(v), k
    reader = gguf.GGUFReader(path)
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == arch
    state = load_file(str(src / "model.safetensors"))  # the source model (fp32): norms and float tensors
    tied = config.get("tie_word_embeddings", False)
    want_names = {gguf_name(k, fam) for k in state if not (tied and k == "lm_head.weight")} - {None}
    if name == "llama3":  # the rope scaling as llama.cpp's per-frequency divisors, F32 [head_dim / 2]
        want_names.add(ROPE_FREQS)
        (factors,) = [t for t in reader.tensors if t.name == ROPE_FREQS]
        assert factors.tensor_type == gguf.GGMLQuantizationType.F32 and list(factors.shape) == [8]
        np.testing.assert_allclose(np.asarray(factors.data), _hf_rope_factors(src), rtol=1e-6)
        assert not [k for k in md if ".rope.scaling." in k]
    assert {t.name for t in reader.tensors} == want_names
    assert {t["name"] for t in read_gguf_header(path)["tensors"]} == want_names
    gptq = load_model(rep["paths"]["gptq"])
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            continue
        hf = hf_name(t.name, arch)
        assert gguf_name(hf, fam) == t.name
        got = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        got = got.reshape([int(n) for n in reversed(t.shape)])
        if fam.rope_permute and t.name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = config["num_attention_heads"] if ".attn_q." in t.name else config["num_key_value_heads"]
            got = got[torch.argsort(rope_permutation(got.shape[0], heads)).numpy()]
        is_linear = t.name.startswith("blk.") and t.name.endswith(".weight") and "norm" not in t.name
        if is_linear:  # the QuantLM's codes: bit for bit its dequantized weights
            np.testing.assert_array_equal(got, gptq.get_submodule(hf[: -len(".weight")]).dequantize().numpy(), hf)
        elif "norm" in t.name:  # F32, plus the family's offset
            np.testing.assert_array_equal(got, (state[hf].float() + fam.norm_offset).numpy(), hf)
        else:  # embedding, head (F16), biases (F32)
            dt = torch.float32 if hf.endswith(".bias") else torch.float16
            np.testing.assert_array_equal(got, state[hf].to(dt).float().numpy(), hf)
    assert (name in PERMUTED) == fam.rope_permute


def test_the_size_of_the_gguf_is_predicted_from_config(exported):
    from quantlm.cli import main

    name, src, rep, recipe = exported
    measured = acc.budget(f"{rep['paths']['gguf']}/model.gguf")
    predicted = acc.budget(src / "config.json", layout=recipe.layout("gguf"))
    assert measured.total_bits("exact") == predicted.total_bits("exact"), name
    rope = [[(r.name, r.shape, r.dtype, r.params) for r in b.records if r.role == "rope"] for b in (measured, predicted)]
    assert rope[0] == rope[1] == ([("rope_freqs.weight", (8,), "F32", 0)] if name == "llama3" else []), name
    assert measured.total_bits("paper") == predicted.total_bits("paper"), name
    assert {r.storage for r in measured.records if r.role == "block_linear"} == {"Q4_0"}
    assert main(["size", f"{rep['paths']['gguf']}/model.gguf"]) == 0


@pytest.mark.parametrize("name, extra, why", [
    ("mistral", dict(sliding_window=16), "sliding_window 16 < max_position_embeddings 256"),
    ("gemma2", dict(query_pre_attn_scalar=256), "query_pre_attn_scalar 256 differs from head_dim 32"),
    ("gemma2", dict(query_pre_attn_scalar=32, layer_types=["full_attention"] * 3), "layer_types"),
    ("gemma3_text", dict(query_pre_attn_scalar=32, final_logit_softcapping=30.0), "no logit soft-capping"),
    ("phi3", dict(partial_rotary_factor=0.5), "partial_rotary_factor 0.5"),
    ("qwen3", dict(attention_bias=True), "attention_bias"),
    ("llama3", dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0}),
     "rope type 'linear'"),
    ("qwen2", dict(rope_parameters={**FAMILIES["llama3"][1]["rope_parameters"]}), "rope type 'llama3'"),
])
def test_configs_llamacpp_cannot_run_are_refused_in_one_line(name, extra, why):
    from quantlm.formats.gguf.names import hparams

    cls, base = FAMILIES[name]
    config = cls(**{**_SMALL, **base, **extra}).to_dict()
    if name == "phi3":  # transformers 5 keeps it among the rope parameters
        config["rope_parameters"] = {**config["rope_parameters"], "partial_rotary_factor": 0.5}
    with pytest.raises(QuantlmError, match="GGUF") as e:
        hparams(config)
    assert why in str(e.value) and "\n" not in str(e.value)
