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

import json
import logging
import os
import re
from pathlib import Path

import torch

from quantlm.errors import QuantlmError
from quantlm.paths import calibration_dir

log = logging.getLogger(__name__)

DEFAULT_CALIBRATION = "c4_sample.jsonl"


def default_calibration_path() -> Path:
    return calibration_dir() / DEFAULT_CALIBRATION


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise QuantlmError(f"{path}:{lineno}: not valid JSON; calibration jsonl needs one "
                                   "object per line with a 'text' field") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise QuantlmError(f"{path}:{lineno}: no 'text' string field; calibration jsonl needs "
                                   "one object per line with a 'text' field")
            texts.append(row["text"])
    return texts


def _read_parquet(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if "text" not in table.column_names:
        raise QuantlmError(f"{path}: no 'text' column (columns: {', '.join(table.column_names)}); "
                           "calibration parquet needs a 'text' column")
    return [t for t in table.column("text").to_pylist() if isinstance(t, str)]


def _read_datasets_dir(path: Path) -> list[str]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else sorted(ds)[0]
        ds = ds[split]
    if "text" not in ds.column_names:
        raise QuantlmError(f"{path}: dataset has no 'text' column (columns: {', '.join(ds.column_names)})")
    return list(ds["text"])


def load_documents(source: str | os.PathLike | None = None) -> list[str]:
    """The non-empty documents of a calibration source (see the module docstring for the formats)."""
    path = Path(source) if source else default_calibration_path()
    if not path.exists():
        raise QuantlmError(f"calibration source {path} does not exist; pass a .txt, .jsonl, .parquet file "
                           "or a datasets directory with --calib")
    if path.is_dir():
        if not ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            raise QuantlmError(f"{path}: a calibration directory must be a datasets.save_to_disk directory "
                               "(state.json or dataset_dict.json); pass a file otherwise")
        texts = _read_datasets_dir(path)
    elif path.suffix == ".jsonl":
        texts = _read_jsonl(path)
    elif path.suffix == ".parquet":
        texts = _read_parquet(path)
    elif path.suffix in (".txt", ".text", ".raw", ".tokens", ""):  # .raw/.tokens: WikiText's file names
        texts = re.split(r"\n[ \t]*\n", path.read_text(encoding="utf-8"))
    else:
        raise QuantlmError(f"{path}: unknown calibration file type {path.suffix!r}; use .txt, .jsonl or .parquet")
    return [t for t in texts if t.strip()]


def sample_windows(tokenizer, documents: list[str], nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``[nsamples, seqlen]`` int64 token windows drawn from ``documents`` with ``seed`` (see module doc)."""
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
