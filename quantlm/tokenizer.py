"""A byte-level BPE tokenizer trained on local text and saved as a Hugging Face tokenizer directory.

Spectra uses the GPT-NeoX-20B tokenizer; the CPU-scale models of quantlm train their own small vocabulary
(no hub access), with the same byte-level scheme so any text round-trips.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from quantlm.errors import QuantlmError

SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike | None = None):
    """Train a byte-level BPE on ``texts``; return a ``PreTrainedTokenizerFast`` (saved to ``out_dir`` if given)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise QuantlmError(f"vocab_size={vocab_size} is too small for a byte-level BPE; use at least 512")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=SPECIAL_TOKENS[0], bos_token=SPECIAL_TOKENS[0],
        pad_token=SPECIAL_TOKENS[1], model_max_length=1 << 30,
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(out_dir)
    return fast
