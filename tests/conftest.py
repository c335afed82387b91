"""Shared fixtures: a tiny random LLaMA checkpoint with its own tokenizer, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if not _has_cuda():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def corpus_text() -> str:
    from quantlm.paths import data_dir

    return (data_dir() / "corpus" / "austen-persuasion.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, corpus_text) -> Path:
    from quantlm.tokenizer import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer([corpus_text[:200_000]], vocab_size=512, out_dir=out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A randomly initialised 2-block LLaMA (hidden 64, GQA 4/2 heads) saved as an HF directory, fp32."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
    )
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out
