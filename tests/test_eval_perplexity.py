"""Perplexity against an independent computation, windows, datasets and error paths."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from quantlm.errors import QuantlmError
from quantlm.eval.datasets import TextSource, load_text_source
from quantlm.eval.perplexity import perplexity, resolve_window
from quantlm.hf_checkpoint import load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)


def _direct_ppl(model, tokenizer, text: str, window: int) -> tuple[float, int]:
    """Independent reference: HF's own loss (mean over window-1 shifted targets) per window, one at a time."""
    ids = tokenizer(text)["input_ids"]
    total, count = 0.0, 0
    for start in range(0, len(ids) - window + 1, window):
        chunk = torch.tensor([ids[start: start + window]])
        with torch.no_grad():
            loss = model(input_ids=chunk, labels=chunk).loss
        total += float(loss) * (window - 1)
        count += window - 1
    return math.exp(total / count), count


def test_matches_direct_computation(lm, corpus_text):
    model, tok = lm
    text = corpus_text[:12_000]
    ref, count = _direct_ppl(model, tok, text, 64)
    got = perplexity(model, tok, TextSource.from_text(text), window=64, batch_size=1, progress=False)
    assert got["tokens"] == count and got["window"] == 64 and got["stride"] == 64
    assert got["ppl"] == pytest.approx(ref, rel=1e-5)
    assert got["windows"] * 64 + got["dropped_tokens"] == got["corpus_tokens"]
    batched = perplexity(model, tok, TextSource.from_text(text), window=64, batch_size=5, progress=False)
    assert batched["ppl"] == pytest.approx(got["ppl"], rel=1e-5)
    assert got["dataset"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()


def test_raw_text_file_and_jsonl(lm, corpus_text, tmp_path):
    model, tok = lm
    txt = tmp_path / "a.txt"
    txt.write_text(corpus_text[:5000])
    jl = tmp_path / "b.jsonl"
    jl.write_text("".join(json.dumps({"text": corpus_text[i: i + 2000]}) + "\n" for i in (0, 2000)))
    for path in (txt, jl):
        r = perplexity(model, tok, str(path), window=32, progress=False)
        assert r["dataset"]["path"] == str(path.resolve()) and r["ppl"] > 1 and r["tokens"] > 0
    # a raw string of text is scored as text
    r = perplexity(model, tok, corpus_text[:3000], window=32, progress=False)
    assert r["dataset"]["name"] == "text"


def test_wikitext2_shipped(lm):
    model, tok = lm
    src = load_text_source("wikitext2")
    assert src.sha256 == "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"
    r = perplexity(model, tok, src, limit_windows=2, progress=False)
    assert r["window"] == 256 and r["windows"] == 2 and r["limited"] and r["tokens"] == 2 * 255
    assert math.isfinite(r["ppl"]) and r["ppl"] > 1


def test_default_window_is_context_capped_at_2048(lm):
    model, _ = lm
    assert resolve_window(model, None) == 256
    cfg = model.config
    old = cfg.max_position_embeddings
    try:
        cfg.max_position_embeddings = 4096
        assert resolve_window(model, None) == 2048
    finally:
        cfg.max_position_embeddings = old


def test_errors(lm, tmp_path):
    model, tok = lm
    with pytest.raises(QuantlmError, match="longer than the model context"):
        perplexity(model, tok, "wikitext2", window=512, progress=False)
    with pytest.raises(QuantlmError, match="does not exist|neither a known name"):
        perplexity(model, tok, str(tmp_path / "missing.txt"), window=32, progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(QuantlmError, match="empty"):
        perplexity(model, tok, str(empty), window=32, progress=False)
    with pytest.raises(QuantlmError, match="fewer than one window"):
        perplexity(model, tok, TextSource.from_text("just a few words"), window=64, progress=False)
    with pytest.raises(QuantlmError, match="neither a known name"):
        load_text_source("wikitext3")


class _BareLM(torch.nn.Module):
    """A torch module returning logits directly, with no config (like a packed-format loader may build)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids):
        return self.inner(input_ids=input_ids).logits


def test_loaded_torch_module_without_config(lm, corpus_text):
    model, tok = lm
    bare = _BareLM(model)
    text = TextSource.from_text(corpus_text[:6000])
    ref = perplexity(model, tok, text, window=64, progress=False)
    got = perplexity(bare, tok, text, window=64, batch_size=2, progress=False)
    assert got["ppl"] == pytest.approx(ref["ppl"], rel=1e-5)
    with pytest.raises(QuantlmError, match="pass --window"):
        perplexity(bare, tok, text, progress=False)
