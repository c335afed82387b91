"""Calibration windows: every source type, seeded determinism, short-text errors, the shipped sample."""

from __future__ import annotations

import json
import re

import pytest
import torch

from quantlm.calibration import calibration_tokens, default_calibration_path, load_documents, sample_windows
from quantlm.errors import QuantlmError
from quantlm.hf_checkpoint import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def docs(corpus_text):
    return [p for p in corpus_text[:60_000].split("\n\n") if p.strip()]


def test_shipped_sample_is_small_and_the_default(tok):
    path = default_calibration_path()
    assert path.is_file() and path.stat().st_size <= 1_000_000
    assert (path.parent / "README.md").is_file()
    docs = load_documents(None)
    assert len(docs) > 300
    x = calibration_tokens(tok, None, 4, 64, seed=0)
    assert x.shape == (4, 64) and x.dtype == torch.int64


def test_windows_are_seeded_and_deterministic(tok, docs):
    a = sample_windows(tok, docs, 6, 32, seed=1)
    b = sample_windows(tok, docs, 6, 32, seed=1)
    c = sample_windows(tok, docs, 6, 32, seed=2)
    assert a.shape == (6, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert int(a.max()) < len(tok)


def test_one_document_or_wikitext_layout_still_depends_on_the_seed(tmp_path, tok, corpus_text):
    # a text without paragraph breaks is one document: the seed must still move the windows
    one = tmp_path / "one.txt"
    one.write_text(re.sub(r"\n\s*\n", "\n", corpus_text[:40_000]))
    assert len(load_documents(one)) == 1
    a, b = (calibration_tokens(tok, one, 4, 32, seed=s) for s in (0, 1))
    assert not torch.equal(a, b) and torch.equal(a, calibration_tokens(tok, one, 4, 32, seed=0))
    # two documents that each fill every window: the seed must do more than pick one of two starts
    two = [corpus_text[:20_000], corpus_text[20_000:40_000]]
    windows = {tuple(sample_windows(tok, two, 4, 32, seed=s)[0].tolist()) for s in range(4)}
    assert len(windows) > 2
    # WikiText's files separate paragraphs by lines holding one space: those are documents too
    wiki = tmp_path / "wiki.tokens"
    wiki.write_text(" \n = Title = \n \n First paragraph . \n \n Second paragraph . \n")
    assert load_documents(wiki) == [" \n = Title = ", " First paragraph . ", " Second paragraph . \n"]


def test_windows_come_from_the_tokenized_text(tok):
    docs = ["alpha beta gamma " * 30, "delta epsilon " * 30]
    x = sample_windows(tok, docs, 2, 16, seed=0)
    allowed = set(tok("alpha beta gamma delta epsilon ", add_special_tokens=False)["input_ids"])
    allowed |= {tok.eos_token_id} if tok.eos_token_id is not None else set()
    full = set()
    for d in docs:
        full |= set(tok(d, add_special_tokens=False)["input_ids"])
    assert set(x.flatten().tolist()) <= full | allowed


def test_short_text_overlaps_and_too_short_text_fails(tok):
    docs = ["The quick brown fox jumps over the lazy dog. " * 6]
    n = len(tok(docs[0], add_special_tokens=False)["input_ids"])
    x = sample_windows(tok, docs, 8, n // 2, seed=0)  # fewer than 8 x n/2 tokens: overlapping windows
    assert x.shape == (8, n // 2)
    assert torch.equal(x, sample_windows(tok, docs, 8, n // 2, seed=0))
    with pytest.raises(QuantlmError, match="shorter than one window"):
        sample_windows(tok, docs, 1, n + 1, seed=0)


def test_every_source_type(tmp_path, tok, docs):
    import pandas as pd

    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(docs))
    parquet = tmp_path / "c.parquet"
    pd.DataFrame({"text": docs}).to_parquet(parquet)
    import datasets

    ds_dir = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(ds_dir))
    for src in (jsonl, txt, parquet, ds_dir):
        assert load_documents(src) == docs, src
    ref = calibration_tokens(tok, jsonl, 4, 32, seed=3)
    for src in (txt, parquet, ds_dir):
        assert torch.equal(calibration_tokens(tok, src, 4, 32, seed=3), ref)


def test_bad_sources(tmp_path, tok):
    with pytest.raises(QuantlmError, match="does not exist"):
        load_documents(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(QuantlmError, match="'text' field"):
        load_documents(bad)
    notjson = tmp_path / "nj.jsonl"
    notjson.write_text("hello\n")
    with pytest.raises(QuantlmError, match="not valid JSON"):
        load_documents(notjson)
    odd = tmp_path / "x.csv"
    odd.write_text("a,b\n")
    with pytest.raises(QuantlmError, match="unknown file type"):
        load_documents(odd)
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(QuantlmError, match="save_to_disk"):
        load_documents(tmp_path / "plain_dir")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(QuantlmError, match="no text"):
        calibration_tokens(tok, empty, 1, 8)
