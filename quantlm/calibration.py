"""Calibration windows for GPTQ: seeded samples of N windows of L tokens from local text.

Sources (local only): a ``.txt`` file (paragraphs separated by blank or whitespace-only lines are the
documents), a ``.jsonl``
file with a ``text`` field, a ``.parquet`` file with a ``text`` column, or a directory written by
``datasets.Dataset.save_to_disk`` (a ``text`` column). Without a source, the C4 sample shipped in
``calibration/`` is used.

Sampling: the documents are shuffled with the seed and tokenized in that order with the model's own
tokenizer (documents joined by the EOS token when the tokenizer has one) until N*L tokens are collected;
the stream is cut into N windows of exactly L tokens, so every window weighs the same. When the first
document alone holds N*L tokens (e.g. a text without paragraph breaks), or the text has fewer than N*L
tokens (but at least L), the N windows are drawn at seeded random offsets instead, which may overlap:
that is how GPTQ samples WikiText-2, and it keeps different seeds from giving the same windows. The same
seed, source and tokenizer always give the same tensor.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from quantlm.errors import QuantlmError
from quantlm.paths import calibration_dir
from quantlm.recipes import doc
from quantlm.textdocs import iter_documents

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_CALIBRATION = "c4_sample.jsonl"


@dataclass(frozen=True)
class CalibrationSettings:
    """Which text calibrates the Hessians: source, windows, length and seed (Spectra: 512 x 2048 tokens)."""

    data: str = doc("calibration text: .txt/.jsonl/.parquet file or a datasets directory; empty for the shipped "
                    "C4 sample", "")
    nsamples: int = doc("calibration windows", 512)
    seqlen: int = doc("tokens per calibration window", 2048)
    seed: int = doc("seed of the window sampling (Spectra averages 3 seeds)", 0)

    def __post_init__(self):
        if self.nsamples <= 0 or self.seqlen <= 0:
            raise QuantlmError(f"nsamples={self.nsamples}, seqlen={self.seqlen}: both must be positive")

    def source_path(self) -> Path:
        return Path(self.data) if self.data else default_calibration_path()


def default_calibration_path() -> Path:
    return calibration_dir() / DEFAULT_CALIBRATION


def load_documents(source: str | os.PathLike | None = None) -> list[str]:
    """The non-empty documents of a calibration source (see the module docstring for the formats)."""
    path = Path(source) if source else default_calibration_path()
    if not path.exists():
        raise QuantlmError(f"calibration source {path} does not exist; pass a .txt, .jsonl, .parquet file "
                           "or a datasets directory with --calib")
    return [t for t in iter_documents(path, paragraphs=True) if t.strip()]


def sample_windows(tokenizer, documents: list[str], nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``[nsamples, seqlen]`` int64 token windows drawn from ``documents`` with ``seed`` (see module doc)."""
    import torch

    if nsamples <= 0 or seqlen <= 0:
        raise QuantlmError(f"nsamples={nsamples}, seqlen={seqlen}: both must be positive")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(documents), generator=gen).tolist()
    eos = getattr(tokenizer, "eos_token_id", None)
    need = nsamples * seqlen
    stream: list[int] = []
    used = 0
    for i in order:
        used += 1
        ids = tokenizer(documents[i], add_special_tokens=False)["input_ids"]
        if stream and eos is not None:
            stream.append(eos)
        stream.extend(ids)
        if len(stream) >= need:
            break
    if len(stream) < seqlen:
        raise QuantlmError(f"calibration text has {len(stream)} tokens, shorter than one window of {seqlen}; "
                           "use a longer text (--calib) or a smaller --seqlen")
    tokens = torch.tensor(stream, dtype=torch.int64)
    if len(stream) >= need and used > 1:
        return tokens[:need].view(nsamples, seqlen).clone()
    # one document filled every window (or the text is short): cutting from its start would make the seed
    # choose only which document, so the windows start at seeded offsets instead
    if len(stream) < need:
        log.warning("calibration text has %d tokens < %d x %d: drawing overlapping windows",
                    len(stream), nsamples, seqlen)
    starts = torch.randint(0, len(stream) - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


def calibration_tokens(tokenizer, source: str | os.PathLike | None, nsamples: int, seqlen: int,
                       seed: int = 0) -> torch.Tensor:
    """Load ``source`` (default: the shipped sample) and draw ``nsamples`` windows of ``seqlen`` tokens."""
    docs = load_documents(source)
    if not docs:
        raise QuantlmError(f"calibration source {source or default_calibration_path()} has no text")
    return sample_windows(tokenizer, docs, nsamples, seqlen, seed)
