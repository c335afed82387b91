"""Interop: every family's GGUF export (tests/test_gguf_families.py's configs) loaded and run by llama.cpp itself
(llama-cpp-python), against transformers running the weights the file holds; the NLL tolerances are
tests/test_llamacpp.py's. Run in the environment `.ci/llamacpp.sh` builds; skipped where llama_cpp is missing.

The tiny byte-level BPE tokenizer is written as ``tokenizer.ggml.pre = gpt-2`` for every family: llama.cpp picks
the pre-tokenizer from that key, not from the architecture, and gpt-2 is the regex this tokenizer was built with
(a family's own pre-tokenizer name, e.g. qwen2, would split text differently from transformers).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_families import _SMALL
from test_gguf_families import GGUF_FAMILY_CONFIGS
from test_llamacpp import N_CTX, NLL_TOL, _llama, _mean_nll

pytestmark = pytest.mark.interop
llama_cpp = pytest.importorskip("llama_cpp")

# Llama 3's rope scaling (rope_freqs.weight) moves the NLL only if attention depends on position: at the default
# initializer_range 0.02 attention is near uniform and dropping the factors moved the NLL by 1.8e-5 (measured), far
# inside the F16 tolerance; at 0.1 it moves it by 4.5e-2 (test_llamacpp_needs_the_llama3_rope_factors)
SHARPER = {"llama3": dict(initializer_range=0.1)}
TEXT = slice(250_000, 250_500)  # 228 tokens of the tiny tokenizer: past llama3's original_max_position_embeddings 64


def _quantized(state: dict, config: dict) -> dict:
    """Every block linear weight as its 4-bit, group-32 round-to-nearest QuantizedLinear (Q4_0 exactly)."""
    from quantlm.architectures import architecture_for
    from quantlm.gptq.solver import rtn_quantize
    from quantlm.quantized import QuantizedLinear

    block_map = architecture_for(config).block_map
    out = {}
    for name, t in state.items():
        if block_map.block_linear_of(name) is not None and name.endswith(".weight"):
            r = rtn_quantize(t.float(), bits=4, group_size=32, sym=True, name=name)
            out[name] = QuantizedLinear(r.q, r.scale, r.zero, 4, 32, True).stored(name)
        else:
            out[name] = t
    return out


def _both(family: str, variant: str, tmp_path, tokenizer_dir, text: str, edit=None):
    """(llama.cpp logits, transformers logits, ids) of the family's test model on ``text``: the GGUF written from
    the model's config.json (changed by ``edit`` where given), transformers running the model's own config."""
    from gguf_tiny import dequantized_state, load_tensors, save_random_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from quantlm.formats.gguf import write_gguf

    cls, extra = GGUF_FAMILY_CONFIGS[family]
    config = cls(**{**_SMALL, **extra, **SHARPER.get(family, {})})
    src = save_random_model(tmp_path / family, tokenizer_dir, config, seed=3)
    config, state = load_tensors(src)
    tensors = state if variant == "F16" else _quantized(state, config)
    path = tmp_path / f"{family}-{variant}.gguf"
    # general.name not "phi3...": llama.cpp then expects Phi-3's own special tokens (<|end|>, ...) in the vocabulary
    report = write_gguf(path, edit(config) if edit else config, tensors, src, model_name=f"tiny-{variant}")
    assert report["file_type"] == variant and not report["changes"]
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).float().eval()
    missing, unexpected = model.load_state_dict(dequantized_state(tensors), strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    if model.config.tie_word_embeddings:
        model.tie_weights()

    ids = AutoTokenizer.from_pretrained(src)(text)["input_ids"]
    original = (config.get("rope_parameters") or {}).get("original_max_position_embeddings") or 64
    assert 3 * original < len(ids) <= N_CTX  # well past a scaled rope's original context
    llm = _llama(path)
    assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) == ids
    llm.eval(ids)
    got = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].float()
    return got, want, ids


@pytest.mark.parametrize("variant", ["F16", "Q4_0"])
@pytest.mark.parametrize("family", list(GGUF_FAMILY_CONFIGS))
def test_llamacpp_runs_each_family_like_transformers(family, variant, tmp_path, tiny_tokenizer_dir, corpus_text):
    got, want, ids = _both(family, variant, tmp_path, tiny_tokenizer_dir, corpus_text[TEXT])
    nll_cpp, nll_hf = _mean_nll(got, ids), _mean_nll(want, ids)
    print(f"{family} {variant}: NLL llama.cpp {nll_cpp:.6f} transformers {nll_hf:.6f} diff "
          f"{abs(nll_cpp - nll_hf):.2e} max |logit diff| {float((got - want).abs().max()):.2e}")
    assert abs(nll_cpp - nll_hf) < NLL_TOL[variant]
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) > 0.9


def test_llamacpp_needs_the_llama3_rope_factors(tmp_path, tiny_tokenizer_dir, corpus_text):
    """The llama3 model written as plain RoPE (same rope_theta, no rope_freqs.weight) fails the test above: the
    factors are what makes llama.cpp's frequencies transformers'."""
    def plain(config):
        return {**config, "rope_parameters": {"rope_type": "default",
                                              "rope_theta": config["rope_parameters"]["rope_theta"]}}

    got, want, ids = _both("llama3", "F16", tmp_path, tiny_tokenizer_dir, corpus_text[TEXT], edit=plain)
    nll_cpp, nll_hf = _mean_nll(got, ids), _mean_nll(want, ids)
    print(f"llama3 F16 without rope_freqs: NLL llama.cpp {nll_cpp:.6f} transformers {nll_hf:.6f} diff "
          f"{abs(nll_cpp - nll_hf):.2e}")
    assert abs(nll_cpp - nll_hf) > 10 * NLL_TOL["F16"]
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) < 0.9
