"""Every dense decoder family of the architecture table, each a small random model from a realistic config built
with transformers (its own head width, GQA, biases, norms, tying, sliding windows, rope scaling, multipliers):
GPTQ and RTN quantize; every export reloads in transformers and in quantlm's packed loader with the dequantized
model's logits; the exact size of each export is 8 x its payload and the prediction from config.json; evaluation of
the packed and unpacked exports agree. The calibration capture gives every block its own masks and rotary tables."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import transformers as T

from quantlm import accounting as acc
from quantlm.architectures import ARCHITECTURES, architecture_for
from quantlm.errors import QuantlmError
from quantlm.eval.recipe import EvalRecipe
from quantlm.eval.run import evaluate
from quantlm.gptq.pipeline import capture_block_inputs
from quantlm.hf_checkpoint import load_causal_lm
from quantlm.quantize import QuantRecipe, quantize_model
from quantlm.recipes import replace_fields

_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, **_IDS)
# name -> (config class, what makes the family itself: head width, tying, windows, norms, multipliers)
FAMILIES = {
    "llama3": (T.LlamaConfig, dict(tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral": (T.MistralConfig, dict(sliding_window=16)),
    "qwen2": (T.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3": (T.Qwen3Config, dict(head_dim=32, tie_word_embeddings=True)),
    "olmo2": (T.Olmo2Config, dict()),
    "gemma2": (T.Gemma2Config, dict(head_dim=32, sliding_window=16)),
    "gemma3_text": (T.Gemma3TextConfig, dict(head_dim=32, sliding_window=16,
                                             layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "granite": (T.GraniteConfig, dict(embedding_multiplier=12.0, residual_multiplier=0.22,
                                      attention_multiplier=0.0078125, logits_scaling=8.0, attention_bias=True)),
    "phi3": (T.Phi3Config, dict()),
}
FORMATS = ("unpacked", "gptq", "compressed-tensors")


def test_every_table_entry_has_a_family_test():
    assert {architecture_for(FAMILIES[f][0](**_SMALL).to_dict()).model_type for f in FAMILIES} | {"llama"} == set(
        ARCHITECTURES)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, tiny_tokenizer_dir):
    from gguf_tiny import save_random_model

    cls, extra = FAMILIES[request.param]
    src = save_random_model(tmp_path_factory.mktemp("fam") / request.param, tiny_tokenizer_dir,
                            cls(**{**_SMALL, **extra}), seed=3)
    return request.param, src


def _payload_bytes(path) -> int:
    total = 0
    for f in Path(path).glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
        total += f.stat().st_size - 8 - n
    return total


def test_the_capture_gives_every_block_its_own_masks_and_rotary_tables(family):
    """Blocks run one after another on the captured inputs reproduce the model's own hidden states (sliding-window
    and full-attention layers, local and global rotary tables included)."""
    name, src = family
    model = load_causal_lm(src)
    tokens = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    hidden, per_block = capture_block_inputs(model, ARCHITECTURES[model.config.model_type].block_map, tokens, 2,
                                             torch.device("cpu"))
    with torch.no_grad():
        reference = model(tokens, output_hidden_states=True).hidden_states
        h = hidden[0]
        for i, layer in enumerate(model.model.layers):
            h = layer(h, **per_block[2][i])
            h = h[0] if isinstance(h, tuple) else h
            if i + 1 < len(model.model.layers):  # the last entry of hidden_states is after the final norm
                torch.testing.assert_close(h, reference[i + 1], rtol=1e-5, atol=1e-5, msg=f"{name} block {i}")


def test_quantize_export_reload_size_and_eval(family, tmp_path, corpus_text):
    from transformers import AutoModelForCausalLM

    from quantlm.formats.loader import load_model

    name, src = family
    recipe = replace_fields(QuantRecipe(), bits=4, group_size=32, nsamples=4, seqlen=32, formats=FORMATS)
    rep = quantize_model(src, recipe, tmp_path / "q", progress=False)
    unpacked = AutoModelForCausalLM.from_pretrained(rep["paths"]["unpacked"], dtype=torch.float32)
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = unpacked(ids).logits
        assert not torch.equal(ref, AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits)
        for fmt in ("gptq", "compressed-tensors"):
            torch.testing.assert_close(load_model(rep["paths"][fmt])(ids).logits, ref, rtol=0, atol=2e-3,
                                       msg=f"{name} {fmt}")
    for fmt in FORMATS:
        measured = acc.budget(rep["paths"][fmt])
        assert measured.total_bits("exact") == 8 * _payload_bytes(rep["paths"][fmt]), (name, fmt)
        predicted = acc.budget(src / "config.json", layout=recipe.layout(fmt))
        assert measured.total_bits("exact") == predicted.total_bits("exact"), (name, fmt)
    # the same model evaluated from its packed and its unpacked export
    (tmp_path / "t.txt").write_text(corpus_text[:6000])
    ev = EvalRecipe(ppl=(str(tmp_path / "t.txt"),), window=32, ppl_limit_windows=4)
    ppl = [evaluate(rep["paths"][f], ev, progress=False)["metrics"]["t"]["ppl"] for f in ("unpacked", "gptq")]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-3)
    # round-to-nearest through the same path
    rtn = quantize_model(src, replace_fields(recipe, method="rtn", formats=("unpacked",)), tmp_path / "r",
                         progress=False)
    assert json.loads((tmp_path / "r" / "unpacked" / "quantlm.json").read_text())["method"] == "rtn"
    assert rtn["paths"]["unpacked"]


def test_families_without_a_gguf_writer_are_refused_in_one_line(family, tmp_path):
    from quantlm.formats.gguf.names import hparams

    name, src = family
    try:  # a family with a GGUF writer is refused when llama.cpp's graph cannot run this config (see names.py)
        hparams(json.loads((src / "config.json").read_text()))
        pytest.skip("this config is exported (tests/test_gguf_families.py)")
    except QuantlmError:
        pass
    recipe = replace_fields(QuantRecipe(), bits=4, group_size=32, nsamples=4, seqlen=32, formats=("gguf",))
    with pytest.raises(QuantlmError) as e:
        quantize_model(src, recipe, tmp_path / "g", progress=False)
    assert "\n" not in str(e.value) and "GGUF" in str(e.value) and not (tmp_path / "g").exists()
