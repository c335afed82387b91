"""Interop: our gptq and compressed-tensors exports loaded by the real libraries, logits vs quantlm's own.

Run in the separate environment that `.ci/interop.sh` builds (transformers + optimum + GPTQModel 7.6.0 +
compressed-tensors); skipped where those libraries are missing. The model is a tiny random LLaMA whose
widths (128, 256) the GPTQModel kernels accept; the 172-wide case is covered by quantlm's own tests.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from quantlm.formats.loader import QuantLinear
from quantlm.formats.loader import load_model as load_quantized
from quantlm.quantize import QuantRecipe, quantize_model
from quantlm.recipes import replace_fields

pytestmark = pytest.mark.interop
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


@pytest.fixture(scope="module")
def interop_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    out = tmp_path_factory.mktemp("interop-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def _export(model_dir, tmp_path, fmt, bits, sym=True, **options):
    recipe = replace_fields(QuantRecipe(), bits=bits, group_size=32, sym=sym, nsamples=4, seqlen=32,
                            formats=("unpacked", fmt), **options)
    return quantize_model(model_dir, recipe, tmp_path / f"{fmt}-{bits}", progress=False)["paths"]


def _load_in_transformers(path, fmt: str):
    """A packed 4-bit export loaded by transformers itself: gptq through optimum + GPTQModel's torch kernel,
    compressed-tensors through its library (skipped where the library is not installed)."""
    pytest.importorskip("optimum" if fmt == "gptq" else "compressed_tensors")
    if fmt == "gptq":
        pytest.importorskip("gptqmodel")
    from transformers import AutoModelForCausalLM, GPTQConfig

    kwargs = {"quantization_config": GPTQConfig(bits=4, backend="torch")} if fmt == "gptq" else {}
    return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32, local_files_only=True,
                                                **kwargs)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_gptq_loads_in_transformers_optimum_gptqmodel(interop_model_dir, tmp_path, bits):
    pytest.importorskip("optimum")
    pytest.importorskip("gptqmodel")
    from transformers import AutoModelForCausalLM, GPTQConfig

    paths = _export(interop_model_dir, tmp_path, "gptq", bits)
    ref = _logits(load_quantized(paths["unpacked"]), IDS)
    torch.testing.assert_close(_logits(load_quantized(paths["gptq"]), IDS), ref, rtol=0, atol=1e-3)
    # GPTQModel's plain torch kernel dequantizes to fp16 weights, as our unpacked checkpoint stores them:
    # the logits must agree to fp32 rounding. The auto-selected kernel (at 4 bits TorchAtenLinear, which
    # computes in bf16) is checked at bf16 precision.
    for backend, atol in (("torch", 1e-4), (None, 2e-2)):
        kwargs = {"quantization_config": GPTQConfig(bits=bits, backend=backend)} if backend else {}
        ext = AutoModelForCausalLM.from_pretrained(paths["gptq"], device_map="cpu", dtype=torch.float32,
                                                   local_files_only=True, **kwargs)
        q_proj = ext.model.layers[0].self_attn.q_proj
        assert type(q_proj).__module__.startswith("gptqmodel"), type(q_proj)  # really loaded packed
        torch.testing.assert_close(_logits(ext, IDS), ref, rtol=0, atol=atol, msg=lambda m, b=backend: f"{b}: {m}")


ASYM_BUG = ("compressed-tensors 0.20.0 + transformers 5.23: the model is initialised with an unpacked "
            "weight_zero_point [out, G] (the meta-device compress path skips zero-point packing) while "
            "pack-quantized checkpoints store it packed [ceil(out*b/32), G]: from_pretrained fails with a size "
            "mismatch (llm-compressor's own asymmetric outputs have the same layout)")


@pytest.mark.parametrize("bits, sym", [(3, True), (4, True), (6, True), (8, True),
                                       pytest.param(4, False, marks=pytest.mark.xfail(reason=ASYM_BUG, strict=True, raises=RuntimeError))])
def test_compressed_tensors_loads_in_transformers(interop_model_dir, tmp_path, bits, sym):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    paths = _export(interop_model_dir, tmp_path, "compressed-tensors", bits, sym)
    ours = load_quantized(paths["compressed-tensors"])
    # the library's own packer agrees with ours, word for word, on our codes (signed, offset by 2**(b-1))
    tensors = load_file(f"{paths['compressed-tensors']}/model.safetensors")
    ql = ours.model.layers[1].mlp.down_proj
    assert isinstance(ql, QuantLinear)
    codes = ql.quantized().q
    signed = (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    words = tensors["model.layers.1.mlp.down_proj.weight_packed"]
    assert torch.equal(pack_to_int32(signed, bits), words)
    assert torch.equal(unpack_from_int32(words, bits, torch.Size(codes.shape)), signed)

    ext = AutoModelForCausalLM.from_pretrained(paths["compressed-tensors"], device_map="cpu", dtype=torch.float32,
                                               local_files_only=True)
    cfg = json.load(open(f"{paths['compressed-tensors']}/config.json"))
    assert cfg["quantization_config"]["format"] == "pack-quantized"
    ref = _logits(load_quantized(paths["unpacked"]), IDS)
    torch.testing.assert_close(_logits(ext, IDS), ref, rtol=0, atol=1e-3)
    torch.testing.assert_close(_logits(ours, IDS), ref, rtol=0, atol=1e-3)
    # and transformers saw the quantized weights, not a random init: its dense weight equals ours
    torch.testing.assert_close(ext.model.layers[1].mlp.down_proj.weight.float(), ql.dequantize(), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def biased_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    """The interop LLaMA with biases on every block linear (attention_bias, mlp_bias), random and non-zero."""
    from gguf_tiny import save_random_model
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
                         architectures=["LlamaForCausalLM"])
    return save_random_model(tmp_path_factory.mktemp("interop-biased"), tiny_tokenizer_dir, config, seed=2,
                             norms=False)


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_biases_load_in_the_real_libraries(biased_model_dir, tmp_path, fmt):
    """A LLaMA with attention_bias and mlp_bias: each packed export loads in transformers (GPTQModel's torch kernel
    for gptq, compressed-tensors) with its biases and the dequantized model's logits."""
    paths = _export(biased_model_dir, tmp_path, fmt, 4)
    unpacked = load_quantized(paths["unpacked"])
    ref = _logits(unpacked, IDS)
    ext = _load_in_transformers(paths[fmt], fmt)
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
        theirs = ext.model.layers[1].get_submodule(name).bias
        mine = unpacked.model.layers[1].get_submodule(name).bias
        assert theirs is not None and torch.equal(theirs.float(), mine.float()), name
    torch.testing.assert_close(_logits(ext, IDS), ref, rtol=0, atol=1e-3)


@pytest.fixture(scope="module", params=["qwen2", "mistral", "qwen3", "olmo2", "gemma2", "gemma3_text", "granite",
                                        "phi3", "llama3"])
def family_model_dir(request, tmp_path_factory, tiny_tokenizer_dir):
    from gguf_tiny import save_random_model
    from test_families import _SMALL, FAMILIES

    cls, extra = FAMILIES[request.param]
    return request.param, save_random_model(tmp_path_factory.mktemp(f"interop-{request.param}"), tiny_tokenizer_dir,
                                            cls(**{**_SMALL, **extra}), seed=3, norms=False)


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_every_family_s_exports_load_in_the_real_libraries(family_model_dir, tmp_path, fmt):
    """Every family of the table: its packed exports load in transformers (GPTQModel's torch kernel,
    compressed-tensors) as the family's own class, with the dequantized model's logits."""
    name, model_dir = family_model_dir
    paths = _export(model_dir, tmp_path, fmt, 4)
    unpacked = load_quantized(paths["unpacked"])
    ref = _logits(unpacked, IDS)
    ext = _load_in_transformers(paths[fmt], fmt)
    assert type(ext).__name__ == type(unpacked).__name__, name
    torch.testing.assert_close(_logits(ext, IDS), ref, rtol=0, atol=1e-3, msg=name)


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_negative_scales_of_the_signed_absmax_grid_load_in_the_real_libraries(interop_model_dir, tmp_path, fmt):
    """llama.cpp's grid puts the peak's sign in the scale: GPTQModel's kernel and compressed-tensors take the
    negative scales as they are, with the dequantized model's logits."""
    paths = _export(interop_model_dir, tmp_path, fmt, 4, signed_absmax=True)
    ref = _logits(load_quantized(paths["unpacked"]), IDS)
    ext = _load_in_transformers(paths[fmt], fmt)
    torch.testing.assert_close(_logits(ext, IDS), ref, rtol=0, atol=1e-3)
