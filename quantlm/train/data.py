"""Training data: local text corpora -> one cached, memory-mapped token file -> packed fixed-length sequences.

* Inputs: ``.txt`` files (one document each), ``.jsonl``/``.json`` and ``.parquet`` files (one document per
  record, read from ``text_field``), or a folder written by ``datasets.Dataset.save_to_disk``.
* Tokens: every document followed by EOS, concatenated in input order and stored once as a flat uint16/uint32
  file (plus a JSON meta file) in the cache, keyed by the corpus contents and the tokenizer, so corpora larger
  than RAM are memory-mapped and every model of a suite reads the very same tokens.
* Split: the last ``heldout_fraction`` of the tokens is the validation part (``heldout_token_ids``).
* Order: the training part is cut into non-overlapping sequences of ``seq_len`` tokens, visited in a seeded
  random permutation per epoch; the order depends only on (corpus, tokenizer, seq_len, seed), so a FloatLM and
  a TriLM of one suite see the same sequences in the same order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from quantlm import digests, paths, textdocs
from quantlm.atomic import write_json
from quantlm.errors import QuantlmError
from quantlm.hf_checkpoint import load_tokenizer
from quantlm.outputs import output_dir
from quantlm.textdocs import RECORD_SUFFIXES, is_datasets_dir
from quantlm.tokenizer import train_bpe_tokenizer

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")  # the text files a corpus folder contributes


# ------------------------------------------------------------------------------------------- inputs

def resolve_path(path: str | os.PathLike) -> Path:
    """An absolute path, a path relative to the current folder, or the data shipped with quantlm (data/...)."""
    return paths.resolve_input(path)


def corpus_sources(paths: tuple[str, ...] | list[str]) -> list[Path]:
    """The corpus inputs in a fixed order: files, or `datasets` folders, sorted within each folder."""
    out: list[Path] = []
    for raw in paths:
        p = resolve_path(raw)
        if not p.exists():
            raise QuantlmError(f"corpus path {raw!r} does not exist (looked at {p}); fix the path in the recipe")
        if is_datasets_dir(p):
            out.append(p)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES + RECORD_SUFFIXES)
            if not found:
                raise QuantlmError(f"corpus folder {p} holds no .txt/.jsonl/.json/.parquet files")
            out.extend(found)
        elif p.suffix in TEXT_SUFFIXES + RECORD_SUFFIXES:
            out.append(p)
        else:
            raise QuantlmError(f"corpus file {p} has an unsupported type; use .txt, .jsonl, .json or .parquet")
    return out


def iter_documents(sources: list[Path], text_field: str = "text") -> Iterator[str]:
    """Every document of the corpus, in order (a whole .txt file is one document)."""
    for src in sources:
        yield from textdocs.iter_documents(src, text_field)


def fingerprint(sources: list[Path], *extra: str) -> str:
    """A content hash of the corpus inputs (and any extra settings), naming its cached files."""
    files = [(f.name, f) for s in sources for f in (sorted(p for p in s.rglob("*") if p.is_file()) if s.is_dir()
                                                      else [s])]
    h = hashlib.sha256(digests.files_sha256(files).encode())
    for e in extra:
        h.update(e.encode())
    return h.hexdigest()[:16]


def cache_dir(recipe) -> Path:
    if recipe.cache_dir:
        return paths.resolve_output(recipe.cache_dir)
    return paths.cache_dir()


# ---------------------------------------------------------------------------------------- tokenizer

def _tokenizer_hash(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def load_or_train_tokenizer(recipe, sources: list[Path] | None = None):
    """The recipe's tokenizer: a local HF folder, or a byte-level BPE trained on the corpus and cached."""
    if recipe.tokenizer:
        path = resolve_path(recipe.tokenizer)
        if not path.is_dir():
            raise QuantlmError(f"tokenizer folder {path} does not exist; give an HF tokenizer folder or leave "
                               "tokenizer empty to train a BPE on the corpus")
        tok = load_tokenizer(path)
    else:
        sources = sources if sources is not None else corpus_sources(recipe.corpus)
        key = fingerprint(sources, f"bpe{recipe.tokenizer_vocab}", recipe.text_field, str(recipe.heldout_fraction))
        path = cache_dir(recipe) / "tokenizers" / f"bpe{recipe.tokenizer_vocab}-{key}"
        if not (path / "tokenizer.json").is_file():
            # Train only on the text before the held-out part, so validation text stays unseen.
            docs = list(iter_documents(sources, recipe.text_field))
            budget = int(sum(len(d) for d in docs) * (1 - recipe.heldout_fraction))
            texts = []
            for d in docs:
                texts.append(d[:budget])
                budget -= len(texts[-1])
                if budget <= 0:
                    break
            log.info("training a %d-token BPE tokenizer on %d characters", recipe.tokenizer_vocab,
                     sum(len(t) for t in texts))
            try:
                with output_dir(path) as tmp:
                    train_bpe_tokenizer(texts, recipe.tokenizer_vocab, tmp)
            except QuantlmError:
                if not (path / "tokenizer.json").is_file():  # not merely another process finishing first
                    raise
        tok = load_tokenizer(path)
    if tok.eos_token_id is None:
        raise QuantlmError(f"tokenizer {path} has no EOS token; documents need a separator")
    return tok


# ------------------------------------------------------------------------------------------- tokens

@dataclass(frozen=True)
class TokenCorpus:
    """All corpus tokens (memory-mapped) and where the held-out part starts."""

    tokens: np.ndarray  # 1-D uint16/uint32 memmap
    heldout_start: int
    path: Path

    @property
    def train_tokens(self) -> np.ndarray:
        return self.tokens[: self.heldout_start]

    @property
    def heldout_tokens(self) -> np.ndarray:
        return self.tokens[self.heldout_start:]


def _write_token_file(docs: Iterator[str], tokenizer, out: Path) -> tuple[int, str]:
    vocab = len(tokenizer)
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32
    eos = tokenizer.eos_token_id
    n, batch = 0, []
    with open(out, "wb") as f:
        def flush():
            nonlocal n
            if not batch:
                return
            for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                arr = np.asarray(ids + [eos], dtype=dtype)
                f.write(arr.tobytes())
                n += arr.size
            batch.clear()
        for d in docs:
            if not d.strip():
                continue  # an empty document adds nothing, not even a separator
            batch.append(d)
            if len(batch) >= 256:
                flush()
        flush()
    return n, np.dtype(dtype).name


def load_token_corpus(recipe, tokenizer=None) -> TokenCorpus:
    """Tokenize the recipe's corpus once (cached by content and tokenizer) and memory-map it."""
    sources = corpus_sources(recipe.corpus)
    tokenizer = tokenizer if tokenizer is not None else load_or_train_tokenizer(recipe, sources)
    key = fingerprint(sources, recipe.text_field, _tokenizer_hash(tokenizer))
    folder = cache_dir(recipe) / "tokens" / key
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        log.info("tokenizing the corpus (%d inputs) into %s", len(sources), folder)
        try:
            with output_dir(folder) as tmp:
                n, dtype = _write_token_file(iter_documents(sources, recipe.text_field), tokenizer, tmp / "tokens.bin")
                write_json(tmp / "meta.json", {"num_tokens": n, "dtype": dtype, "sources": [str(s) for s in sources],
                                               "text_field": recipe.text_field, "vocab": len(tokenizer)})
        except QuantlmError:
            if not meta_path.is_file():
                raise
    meta = json.loads(meta_path.read_text())
    n = int(meta["num_tokens"])
    if n == 0:
        raise QuantlmError(f"the corpus {list(recipe.corpus)} is empty; give files that contain text")
    tokens = np.memmap(folder / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(n,))
    heldout = max(1, int(round(n * recipe.heldout_fraction)))
    return TokenCorpus(tokens=tokens, heldout_start=n - heldout, path=folder)


def heldout_token_ids(recipe) -> torch.Tensor:
    """The validation tokens of a recipe's corpus (the last ``heldout_fraction``), as int64 ids."""
    corpus = load_token_corpus(recipe)
    return torch.from_numpy(np.asarray(corpus.heldout_tokens, dtype=np.int64))


def heldout_text(recipe) -> str:
    """The validation part as text (decoded from the held-out tokens; byte-level BPE decodes losslessly)."""
    tok = load_or_train_tokenizer(recipe)
    return tok.decode(heldout_token_ids(recipe).tolist())


# ---------------------------------------------------------------------------------------- sequences

class PackedSequences:
    """Non-overlapping ``seq_len`` windows of the training tokens, in a seeded per-epoch random order."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.num_sequences = len(tokens) // seq_len
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.num_sequences, generator=g), epoch
        return self._perm

    def sequence(self, global_index: int) -> torch.Tensor:
        """The ``global_index``-th sequence of the training stream (epochs follow each other)."""
        epoch, i = divmod(global_index, self.num_sequences)
        start = int(self._order(epoch)[i]) * self.seq_len
        return torch.from_numpy(np.asarray(self.tokens[start:start + self.seq_len], dtype=np.int64))

    def batch(self, first: int, count: int) -> torch.Tensor:
        """(count, seq_len) int64: sequences ``first .. first + count - 1`` of the stream."""
        return torch.stack([self.sequence(first + k) for k in range(count)])


def heldout_windows(tokens: np.ndarray, seq_len: int, max_tokens: int = 0) -> torch.Tensor:
    """(n, seq_len) non-overlapping windows of the held-out tokens, for the validation loss."""
    n = len(tokens) // seq_len
    if max_tokens:
        n = min(n, max(1, max_tokens // seq_len))
    return torch.from_numpy(np.asarray(tokens[: n * seq_len], dtype=np.int64)).view(n, seq_len)
