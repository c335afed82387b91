"""Perplexity corpora read from local files: the shipped test sets (WikiText-2, PTB, LAMBADA, a C4 slice)
or any user text / jsonl file. Every corpus carries its path and sha256 so each number can be traced.

How each named corpus is joined into one text follows the GPTQ ``datautils`` protocol that QuantLM papers
(Spectra included) report against:
- wikitext2: rows of the HF ``wikitext-2-raw-v1`` test split joined with "\\n\\n" (a row is a line of
  ``wiki.test.raw`` with its newline, blank " " lines being empty rows);
- ptb: the sentences (lines, stripped) joined with a space;
- c4: the documents' ``text`` joined with a space (our 500-document slice, not GPTQ's exact shard);
- lambada: the passages joined with "\\n\\n".
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from quantlm.digests import file_sha256 as sha256_file
from quantlm.errors import QuantlmError
from quantlm.paths import data_dir
from quantlm.textdocs import iter_documents, read_text_file

EVAL_DATA_ENV = "QUANTLM_EVAL_DATA"


@dataclass(frozen=True)
class TextSource:
    """One evaluation text: its name, where it came from, and the exact string that gets tokenized."""

    name: str
    text: str
    path: str | None = None
    sha256: str | None = None
    join: str = "as-is"

    @classmethod
    def from_text(cls, text: str, name: str = "text") -> TextSource:
        return cls(name=name, text=text, path=None, sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())

    def describe(self) -> dict:
        return {"name": self.name, "path": self.path, "sha256": self.sha256, "join": self.join,
                "chars": len(self.text)}


def eval_data_roots() -> list[Path]:
    """Folders searched for evaluation files: ``$QUANTLM_EVAL_DATA`` (colon-separated) first, then data/eval."""
    roots = [Path(p) for p in os.environ.get(EVAL_DATA_ENV, "").split(os.pathsep) if p]
    return roots + [data_dir() / "eval"]


def find_eval_file(relative: str, what: str) -> Path:
    """The first existing ``root/relative`` over :func:`eval_data_roots`; a clear error otherwise."""
    for root in eval_data_roots():
        p = root / relative
        if p.is_file():
            return p
    raise QuantlmError(f"{what}: data file {relative} not found under {', '.join(map(str, eval_data_roots()))}; "
                       f"put it there or point ${EVAL_DATA_ENV} at a folder holding {relative}")


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise QuantlmError(f"dataset file {path} does not exist; pass an existing text or jsonl file")
    text = read_text_file(path)
    if not text.strip():
        raise QuantlmError(f"dataset file {path} is empty; pass a file with text in it")
    return text


def _jsonl_texts(path: Path, field: str = "text") -> list[str]:
    texts = list(iter_documents(path, field))
    if not any(t.strip() for t in texts):
        raise QuantlmError(f"{path}: no non-empty {field!r} values; pass a jsonl file with text in it")
    return texts


def _wikitext2(path: Path) -> str:
    rows = ["" if line == " " else line + "\n" for line in _read_text(path).split("\n")[:-1]]
    return "\n\n".join(rows)


def _ptb(path: Path) -> str:
    return " ".join(line.strip() for line in _read_text(path).splitlines())


# name -> (file under the eval data roots, how to join it, joiner description)
PPL_DATASETS = {
    "wikitext2": ("wikitext2/wiki.test.raw", _wikitext2, "GPTQ: HF rows joined with '\\n\\n'"),
    "ptb": ("ptb/ptb.test.txt", _ptb, "GPTQ: sentences joined with ' '"),
    "c4": ("c4/c4_validation_500.jsonl", lambda p: " ".join(_jsonl_texts(p)), "documents joined with ' '"),
    "lambada": ("lambada_openai/lambada_test.jsonl", lambda p: "\n\n".join(_jsonl_texts(p)),
                "passages joined with '\\n\\n'"),
}


def corpus_path(name_or_path: str | os.PathLike) -> Path:
    """The file a perplexity corpus is read from: a named one under the eval data roots (an error naming the roots
    when absent), else the path as given."""
    key = str(name_or_path)
    if key in PPL_DATASETS:
        return find_eval_file(PPL_DATASETS[key][0], f"perplexity dataset {key!r}")
    return Path(key)


def load_text_source(name_or_path: str | os.PathLike) -> TextSource:
    """A named corpus (``wikitext2``, ``ptb``, ``c4``, ``lambada``) or a user ``.txt`` / ``.jsonl`` file."""
    key = str(name_or_path)
    path = corpus_path(key)
    if key in PPL_DATASETS:
        _, reader, join = PPL_DATASETS[key]
        return TextSource(name=key, text=reader(path), path=str(path), sha256=sha256_file(path), join=join)
    if not path.exists():
        raise QuantlmError(f"perplexity dataset {key!r} is neither a known name ({', '.join(PPL_DATASETS)}) "
                           "nor an existing file; pass one of those names or the path of a .txt/.jsonl file")
    if path.is_dir():
        raise QuantlmError(f"{path} is a directory; pass a .txt or .jsonl file")
    if path.suffix in (".jsonl", ".json"):
        text, join = "\n\n".join(_jsonl_texts(path)), "jsonl 'text' fields joined with '\\n\\n'"
    else:
        text, join = _read_text(path), "file as-is"
    return TextSource(name=path.stem, text=text, path=str(path.resolve()), sha256=sha256_file(path), join=join)
