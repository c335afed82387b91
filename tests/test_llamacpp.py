"""Interop: quantlm's GGUF exports run by llama.cpp itself (llama-cpp-python), against transformers.

Run in the separate environment that `.ci/llamacpp.sh` builds; skipped where llama_cpp is missing. The model
is a tiny random LLaMA (hidden 256, FFN 512, GQA 4/2 heads) whose widths every GGUF type accepts; the
reference is transformers running the weights the file holds (quantlm's dequantized weights, which
tests/test_gguf.py shows equal gguf-py's decoding of the file bit for bit).

Tolerances: llama.cpp's CPU kernels round activations (to fp16 for F16 weights, to 8-bit Q8_0/Q8_K blocks
for quantized weights) and keep an fp16 KV cache, so logits agree to a tolerance, not exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.interop
llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

N_CTX = 256
# |mean NLL (llama.cpp) - mean NLL (transformers)|, nats per token; the F16 bound is the criterion
NLL_TOL = {"F16": 1e-3, "Q8_0": 5e-3, "Q4_0": 1e-2, "Q6_K": 1e-2, "Q3_K": 1e-2, "Q2_K": 1e-2, "TQ1_0": 1e-2, "TQ2_0": 1e-2}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer_dir):
    from gguf_tiny import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("llamacpp-llama"), tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def sample_text(corpus_text):
    return corpus_text[250_000:250_500]  # past the 200k characters the tokenizer was trained on


def _tensors(state, variant):
    from gguf_tiny import quantize_linears, ternarize_linears

    if variant == "F16":
        return state, {}
    if variant in ("TQ1_0", "TQ2_0"):
        return ternarize_linears(state, mp=1), {"linear_type": variant}
    bits, group, opts = {"Q8_0": (8, 128, {}), "Q4_0": (4, 128, {}), "Q6_K": (6, -1, {}), "Q2_K": (2, -1, {}),
                         "Q3_K": (3, 32, {"linear_type": "Q3_K", "kquant_grouped": True})}[variant]
    return quantize_linears(state, bits=bits, group_size=group), opts


def _file_weights(path, names):
    """The fp32 weights of a GGUF file (gguf-py's decoding, q/k rows un-permuted), under HF names."""
    from quantlm.formats.gguf import gguf_name, read_gguf_header, rope_permutation

    md = read_gguf_header(path)["metadata"]
    to_hf = {gguf_name(n): n for n in names}
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        w = w.reshape([int(n) for n in reversed(t.shape)])
        if ".attn_q." in t.name or ".attn_k." in t.name:
            heads = md["llama.attention.head_count" + ("_kv" if ".attn_k." in t.name else "")]
            w = w[torch.argsort(rope_permutation(w.shape[0], heads))]
        out[to_hf[t.name]] = w
    return out


def _mean_nll(logits: torch.Tensor, ids: list[int]) -> float:
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    return float(-logp.gather(1, torch.tensor(ids[1:])[:, None]).mean())


def _llama(path):
    return llama_cpp.Llama(str(path), n_ctx=N_CTX, logits_all=True, n_threads=1, n_threads_batch=1, verbose=False)


@pytest.mark.parametrize("variant", list(NLL_TOL))
def test_llamacpp_runs_the_export_like_transformers(tiny_dir, tmp_path, sample_text, variant):
    from gguf_tiny import dequantized_state, hf_model, load_tensors
    from transformers import AutoTokenizer

    from quantlm.formats.gguf import write_gguf

    cfg, state = load_tensors(tiny_dir)
    tensors, opts = _tensors(state, variant)
    path = tmp_path / f"tiny-{variant}.gguf"
    report = write_gguf(path, cfg, tensors, tiny_dir, **opts)
    assert report["file_type"] == variant
    # the reference: exact types hold quantlm's dequantized weights; the K-quant opt-in what the file holds
    ref_state = _file_weights(path, tensors) if report["changes"] else dequantized_state(tensors)
    model = hf_model(tiny_dir, ref_state)

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ids = tok(sample_text)["input_ids"]
    assert 64 < len(ids) <= N_CTX
    llm = _llama(path)
    assert llm.tokenize(sample_text.encode("utf-8"), add_bos=True, special=False) == ids
    assert llm.detokenize(ids).decode("utf-8") == sample_text

    llm.eval(ids)
    got = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].float()
    nll_cpp, nll_hf = _mean_nll(got, ids), _mean_nll(want, ids)
    print(f"{variant}: NLL llama.cpp {nll_cpp:.6f} transformers {nll_hf:.6f} diff {abs(nll_cpp - nll_hf):.2e} "
          f"max |logit diff| {float((got - want).abs().max()):.2e} bytes {report['file_bytes']}")
    assert abs(nll_cpp - nll_hf) < NLL_TOL[variant]
    # K-quant dot products quantize the activations to 8 bits (Q8_K): on this random, near-flat model (NLL ~ 7)
    # that flips near-tied top-1s; measured 0.899 (Q3_K, Q2_K) on an AVX2 build of llama.cpp 0.3.36
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) > (0.85 if variant.endswith("_K") else 0.9)

    if variant == "F16":  # greedy decoding: the same 24 tokens
        prompt, steps = ids[:12], 24
        llm.reset()
        llm.eval(prompt)
        seq_cpp = list(prompt)
        for _ in range(steps):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            seq_cpp.append(nxt)
            llm.eval([nxt])
        seq_hf = list(prompt)
        with torch.no_grad():
            for _ in range(steps):
                seq_hf.append(int(model(input_ids=torch.tensor([seq_hf])).logits[0, -1].argmax()))
        assert seq_cpp == seq_hf


@pytest.mark.parametrize("kind", ["sentencepiece", "metaspace-bpe"])
def test_llamacpp_tokenizes_sentencepiece_like_transformers(tmp_path, corpus_text, kind):
    """LLaMA-style vocabularies: a real SentencePiece BPE (converted by transformers) and a Metaspace BPE built
    with `tokenizers`, exported as llama.cpp's SentencePiece ("llama") vocabulary with merge-rank scores.

    Known difference: a text that begins with a space gets one more prefix space in llama.cpp (as in the
    sentencepiece library itself) than in transformers' Metaspace, which skips the prefix then.
    """
    from gguf_tiny import hf_model, load_tensors, metaspace_bpe_dir, save_tiny_llama, train_sentencepiece_dir
    from transformers import AutoTokenizer

    from quantlm.formats.gguf import write_gguf

    if kind == "sentencepiece":
        pytest.importorskip("sentencepiece")
        pytest.importorskip("google.protobuf")  # transformers' conversion of tokenizer.model
        tok_dir = train_sentencepiece_dir(tmp_path / "tok", corpus_text[:200_000])
    else:
        tok_dir = metaspace_bpe_dir(tmp_path / "tok", corpus_text[:200_000])
    model_dir = save_tiny_llama(tmp_path / "model", tok_dir, layers=1)
    cfg, state = load_tensors(model_dir)
    path = tmp_path / "spm.gguf"
    write_gguf(path, cfg, state, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = corpus_text[250_000:256_000].lstrip()
    llm = _llama(path)
    for sample in (text, "Hello world, Anne Elliot's sister.\nNew line \u00e9 \u4e2d  two  spaces 12345"):
        ids = tok(sample)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert llm.tokenize(sample.encode("utf-8"), add_bos=True, special=False) == ids
        # llama-cpp-python's detokenize keeps the prefix space that transformers' decoder strips
        assert llm.detokenize(ids[1:]).decode("utf-8").removeprefix(" ") == sample
    ids = tok(text)["input_ids"][:N_CTX]
    llm.eval(ids)
    got = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    from gguf_tiny import dequantized_state

    with torch.no_grad():
        want = hf_model(model_dir, dequantized_state(state))(input_ids=torch.tensor([ids])).logits[0].float()
    assert abs(_mean_nll(got, ids) - _mean_nll(want, ids)) < NLL_TOL["F16"]


# ---------------------------------------------------------------------------------------------------------
# Through the commands: a trained TriLM exported with `quantlm export`, and `quantlm bench`


@pytest.fixture(scope="module")
def trained_trilm(tmp_path_factory):
    """trilm-tiny (hidden 256, FFN 768: whole TQ blocks, one scale shard) trained briefly on the shipped corpus."""
    from quantlm import recipes
    from quantlm.paths import recipes_dir
    from quantlm.train.recipe import TrainRecipe
    from quantlm.train.run import train

    recipe = recipes.load(recipes_dir() / "trilm-tiny.yaml", expect=TrainRecipe)
    return train(recipe, tmp_path_factory.mktemp("trilm") / "run", progress=False,
                 overrides={"steps": 60, "warmup_steps": 6, "checkpoint_interval": 0})


@pytest.mark.parametrize("variant", ["TQ1_0", "TQ2_0"])
def test_llamacpp_runs_a_trained_trilm_exported_by_the_command(trained_trilm, tmp_path, corpus_text, variant):
    from gguf_tiny import hf_model, load_tensors
    from transformers import AutoTokenizer

    from quantlm.cli import main

    out = tmp_path / variant
    assert main(["export", str(trained_trilm), "--format", "gguf", "--type", variant, "--out", str(out)]) == 0
    cfg, state = load_tensors(trained_trilm)
    # what the file holds: gamma * W_t with fp16 scales, the embedding and head in fp16, norms in fp32
    ref = {k: v.float() if "norm" in k else v.half().float() for k, v in state.items()}
    exact = {k: w for k, w in _file_weights(out / "model.gguf", ref).items() if ".mlp." in k or ".self_attn." in k}
    for k, w in exact.items():
        assert torch.equal(w, ref[k]), k  # lossless: the trained TriLM's ternary weights, bit for bit
    model = hf_model(trained_trilm, ref)
    tok = AutoTokenizer.from_pretrained(trained_trilm)
    text = corpus_text[-3000:-2000]  # the held-out tail of the corpus
    ids = tok(text)["input_ids"][:N_CTX]
    llm = _llama(out / "model.gguf")
    assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)[:N_CTX] == ids
    llm.eval(ids)
    got = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].float()
    nll_cpp, nll_hf = _mean_nll(got, ids), _mean_nll(want, ids)
    print(f"trained TriLM {variant}: NLL llama.cpp {nll_cpp:.5f} transformers {nll_hf:.5f}")
    assert abs(nll_cpp - nll_hf) < NLL_TOL[variant]


def test_bench_measures_each_model_in_its_own_process(tiny_dir, tmp_path):
    from gguf_tiny import load_tensors, quantize_linears

    from quantlm.deploy import BenchSettings, bench
    from quantlm.formats.gguf import write_gguf

    cfg, state = load_tensors(tiny_dir)
    q4 = tmp_path / "q4.gguf"
    write_gguf(q4, cfg, quantize_linears(state, bits=4, group_size=128), tiny_dir)
    settings = BenchSettings(prompt_tokens=32, decode_tokens=16, repeats=2)
    f16, q = bench([tiny_dir, q4], settings, progress=False)  # a checkpoint (exported on the fly) and a file
    assert (f16["file_type"], q["file_type"]) == ("F16", "Q4_0") and f16["exported"] and not q["exported"]
    assert q["gguf_bytes"] == q4.stat().st_size < f16["gguf_bytes"]
    for r in (f16, q):
        assert r["decode_tok_s"] > 0 and r["prompt_tok_s"] > 0 and len(r["decode_tok_s_all"]) == 2
        assert r["rss_base_mb"] < r["rss_mb"] < 1000  # the child's own peak, not the parent's
        assert r["threads"] == 1 and r["bits_per_weight"] == 8 * r["payload_bytes"] / r["params"]
