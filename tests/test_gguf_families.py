"""GGUF export of every family with a writer (quantlm.formats.gguf.names.GGUF_FAMILIES): a small random model of each
family (tests/test_families.py's configs) quantized and exported as GGUF reads back through quantlm's header reader
and gguf-py's GGUFReader with llama.cpp's architecture, keys and tensor names; the file holds the QuantLM's
dequantized weights bit for bit (q/k rows permuted only where llama.cpp runs normal RoPE; Gemma norms + 1), and
``quantlm size`` of the file equals the prediction from config.json. llama.cpp itself: tests/test_llamacpp_families.py.
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
GGUF_FAMILY_CONFIGS = {name: (cls, {**extra, **EXPORTABLE.get(name, {})})
                       for name, (cls, extra) in FAMILIES.items() if name != "llama3"}
# llama.cpp architecture and the keys each family adds (beyond the shared ones)
EXPECTED = {
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
PERMUTED = {"mistral", "granite"}  # llama.cpp's normal-RoPE archs; the others run NEOX RoPE on HF's layout
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

    assert set(GGUF_FAMILIES) - {"llama"} == set(EXPECTED) == set(GGUF_FAMILY_CONFIGS)


def test_the_export_reads_back_with_llamacpp_names_keys_and_the_quantlm_weights(exported):
    from safetensors.torch import load_file

    from quantlm.formats.gguf import hf_name, read_gguf_header, rope_permutation
    from quantlm.formats.gguf.names import GGUF_FAMILIES, gguf_name
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
    assert {t.name for t in reader.tensors} == want_names
    assert {t["name"] for t in read_gguf_header(path)["tensors"]} == want_names
    gptq = load_model(rep["paths"]["gptq"])
    for t in reader.tensors:
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
    assert {r.storage for r in measured.records if r.role == "block_linear"} == {"Q4_0"}
    assert main(["size", f"{rep['paths']['gguf']}/model.gguf"]) == 0


@pytest.mark.parametrize("name, extra, why", [
    ("mistral", dict(sliding_window=16), "sliding_window 16 < max_position_embeddings 256"),
    ("gemma2", dict(query_pre_attn_scalar=256), "query_pre_attn_scalar 256 differs from head_dim 32"),
    ("gemma2", dict(query_pre_attn_scalar=32, layer_types=["full_attention"] * 3), "layer_types"),
    ("gemma3_text", dict(query_pre_attn_scalar=32, final_logit_softcapping=30.0), "no logit soft-capping"),
    ("phi3", dict(partial_rotary_factor=0.5), "partial_rotary_factor 0.5"),
    ("qwen3", dict(attention_bias=True), "attention_bias"),
    ("llama3", dict(), "rope type 'llama3'"),
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
