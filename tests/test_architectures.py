"""Architectures as data, proven from outside: LLaMAs with biases on every block linear and with a head width other
than hidden / heads quantize, size and export to every format, and each export reloads (transformers and quantlm's
loader; GGUF through gguf-py) with the dequantized model's logits; a model_type outside the table gets one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from quantlm import accounting as acc
from quantlm.architectures import ARCHITECTURES, architecture_for
from quantlm.cli import main
from quantlm.errors import QuantlmError
from quantlm.quantize import QuantRecipe, quantize_model
from quantlm.recipes import replace_fields
from quantlm.specs import spec_from_config

FORMATS = ("unpacked", "gptq", "compressed-tensors", "gguf")
BIASED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj")


def recipe() -> QuantRecipe:
    return replace_fields(QuantRecipe(), bits=4, group_size=64, nsamples=4, seqlen=32, formats=FORMATS)


@pytest.fixture(scope="module")
def biased(tmp_path_factory, tiny_tokenizer_dir):
    from gguf_tiny import save_tiny_llama

    src = save_tiny_llama(tmp_path_factory.mktemp("arch") / "biased", tiny_tokenizer_dir, attention_bias=True,
                          mlp_bias=True)
    return src, quantize_model(src, recipe(), tmp_path_factory.mktemp("q") / "biased", progress=False)


@pytest.fixture(scope="module")
def wide_heads(tmp_path_factory, tiny_tokenizer_dir):
    from gguf_tiny import save_tiny_llama

    # 4 heads of 96: the query width (384) is not the hidden size (256)
    src = save_tiny_llama(tmp_path_factory.mktemp("arch") / "heads", tiny_tokenizer_dir, head_dim=96)
    return src, quantize_model(src, recipe(), tmp_path_factory.mktemp("q") / "heads", progress=False)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _gguf_weights(path) -> dict[str, np.ndarray]:
    gguf = pytest.importorskip("gguf")
    return {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            for t in gguf.GGUFReader(str(path)).tensors}


def _check_exports(src, rep):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from quantlm.formats.gguf import gguf_name, rope_permutation
    from quantlm.formats.loader import QuantLinear, load_model

    config = json.loads((src / "config.json").read_text())
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    unpacked = AutoModelForCausalLM.from_pretrained(rep["paths"]["unpacked"], dtype=torch.float32)
    ref = _logits(unpacked, ids)
    for fmt in ("gptq", "compressed-tensors"):
        packed = load_model(rep["paths"][fmt])
        qls = {n: m for n, m in packed.named_modules() if isinstance(m, QuantLinear)}
        assert len(qls) == 2 * len(BIASED)
        for name, ql in qls.items():
            dense = unpacked.get_submodule(name)
            assert torch.equal(ql.dequantize().half(), dense.weight.half()), (fmt, name)
            assert (ql.bias is None) == (dense.bias is None), (fmt, name)
            if dense.bias is not None:
                assert torch.equal(ql.bias, dense.bias), (fmt, name)
        torch.testing.assert_close(_logits(packed, ids), ref, rtol=0, atol=1e-2)
    # GGUF: every tensor, biases included, is the dequantized model's (q/k rows in llama.cpp's order)
    weights = _gguf_weights(f"{rep['paths']['gguf']}/model.gguf")
    state = load_file(f"{rep['paths']['unpacked']}/model.safetensors")
    gptq = load_model(rep["paths"]["gptq"])
    for hf, t in state.items():
        name = gguf_name(hf)
        got = weights[name].reshape(t.shape)
        is_linear = hf.endswith(".weight") and ".layers." in hf and "norm" not in hf
        want = (gptq.get_submodule(hf[: -len(".weight")]).dequantize() if is_linear else t.float()).numpy()
        if ".attn_q." in name or ".attn_k." in name:
            heads = config["num_attention_heads"] if ".attn_q." in name else config["num_key_value_heads"]
            want = want[rope_permutation(want.shape[0], heads).numpy()]
        if t.dtype == torch.float16 and not is_linear and "norm" not in hf and ".bias" not in hf:
            np.testing.assert_array_equal(got, want, err_msg=hf)
        else:
            np.testing.assert_allclose(got, want, rtol=0, atol=0 if is_linear else 1e-3, err_msg=hf)
    # sizes: the stored files equal what the config and recipe predict
    for fmt in FORMATS:
        measured = acc.budget(rep["paths"][fmt])
        layout = recipe().layout(fmt)
        predicted = acc.budget(src / "config.json", layout=layout)
        assert measured.total_bits("exact") == predicted.total_bits("exact"), fmt


def test_biases_survive_quantize_and_every_export(biased):
    src, rep = biased
    from safetensors.torch import load_file

    original = load_file(f"{src}/model.safetensors")
    state = load_file(f"{rep['paths']['unpacked']}/model.safetensors")
    biases = [k for k in original if k.endswith(".bias")]
    assert len(biases) == 2 * len(BIASED)
    for k in biases:
        assert torch.equal(state[k].float(), original[k].half().float()), k
    _check_exports(src, rep)
    spec = spec_from_config(json.loads((src / "config.json").read_text()), "biased")
    assert set(spec.biased_linears) == set(BIASED)
    budget = acc.budget(rep["paths"]["gptq"])
    assert budget.role_params("bias") == 2 * sum(spec.linear_shapes()[lin][0] for lin in BIASED)
    # the paper convention counts block linears and embeddings; biases, like norms, are not among them
    assert budget.role_bits("bias", "paper") == 0 and budget.role_bits("bias", "exact") > 0


def test_head_width_other_than_hidden_over_heads(wide_heads):
    src, rep = wide_heads
    spec = spec_from_config(json.loads((src / "config.json").read_text()), "heads")
    assert spec.head_dim == 96 and spec.linear_shapes()["self_attn.q_proj"] == (384, 256)
    assert spec.linear_shapes()["self_attn.o_proj"] == (256, 384) and spec.linear_shapes()["self_attn.k_proj"] == (192, 256)
    assert {m["name"].split(".", 3)[-1]: tuple(m["shape"]) for m in rep["modules"]}["self_attn.o_proj"] == (256, 384)
    _check_exports(src, rep)


def test_a_model_type_outside_the_table_gets_one_line(tmp_path, capsys):
    config = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 64}
    with pytest.raises(QuantlmError) as e:
        architecture_for(config, "m")
    msg = str(e.value)
    assert "\n" not in msg and "'mixtral' is not supported" in msg
    assert all(t in msg for t in ARCHITECTURES)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    for argv in (["quantize", str(tmp_path / "m"), "--out", str(tmp_path / "o")], ["size", str(tmp_path / "m")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "'mixtral' is not supported; quantlm handles llama" in err[0], err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny random Qwen2 (biases on q, k and v, always; none on o or the MLP)."""
    from gguf_tiny import save_random_model
    from transformers import Qwen2Config

    config = Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    return save_random_model(tmp_path_factory.mktemp("arch") / "qwen2", tiny_tokenizer_dir, config, seed=3)


def test_qwen2_is_one_table_entry(qwen2, tmp_path):
    """A second family through every safetensors job with no code of its own: quantize (its q/k/v biases kept),
    reload with the dequantized model's logits, sizes exact; its GGUF export (llama.cpp's qwen2) sizes exactly too."""
    from transformers import AutoModelForCausalLM

    from quantlm.formats.loader import QuantLinear, load_model

    config = json.loads((qwen2 / "config.json").read_text())
    spec = spec_from_config(config, "qwen2")
    assert spec.model_type == "qwen2" and set(spec.biased_linears) == {f"self_attn.{x}_proj" for x in "qkv"}
    fmts = ("unpacked", "gptq", "compressed-tensors")
    recipe = replace_fields(QuantRecipe(), bits=4, group_size=64, nsamples=4, seqlen=32, formats=fmts)
    rep = quantize_model(qwen2, recipe, tmp_path / "q", progress=False)
    unpacked = AutoModelForCausalLM.from_pretrained(rep["paths"]["unpacked"], dtype=torch.float32)
    assert type(unpacked).__name__ == "Qwen2ForCausalLM"
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    ref = _logits(unpacked, ids)
    for fmt in ("gptq", "compressed-tensors"):
        packed = load_model(rep["paths"][fmt])
        q = packed.model.layers[1].self_attn.q_proj
        assert isinstance(q, QuantLinear) and torch.equal(q.bias, unpacked.model.layers[1].self_attn.q_proj.bias)
        assert packed.model.layers[1].self_attn.o_proj.bias is None
        torch.testing.assert_close(_logits(packed, ids), ref, rtol=0, atol=1e-2)
    for fmt in fmts:
        measured = acc.budget(rep["paths"][fmt])
        assert measured.total_bits("exact") == acc.budget(qwen2 / "config.json", layout=recipe.layout(fmt)).total_bits(
            "exact"), fmt
    assert acc.budget(rep["paths"]["gptq"]).role_params("bias") == 2 * (128 + 2 * 64)
    g = replace_fields(recipe, formats=("gguf",))  # its tensors and llama.cpp run: tests/test_gguf_families.py
    gguf_dir = quantize_model(qwen2, g, tmp_path / "g", progress=False)["paths"]["gguf"]
    assert acc.budget(gguf_dir).total_bits("exact") == acc.budget(qwen2 / "config.json",
                                                                    layout=g.layout("gguf")).total_bits("exact")
