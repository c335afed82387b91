"""The one reader of local text documents, used by calibration, training and evaluation.

Formats: ``.txt``-like files (UTF-8; a whole file is one document, or with ``paragraphs=True`` the blocks between
blank or whitespace-only lines are), ``.jsonl`` (one object per line), ``.json`` (a list of objects or strings),
``.parquet`` (a column) and folders written by ``datasets.Dataset.save_to_disk`` (a column; the ``train`` split of
a DatasetDict, else its first split). Records take their text from ``text_field``. Every problem (missing path,
binary or non-UTF-8 bytes, bad JSON, a missing field) is a ``QuantlmError`` naming the file and the fix.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from quantlm.errors import QuantlmError

TEXT_SUFFIXES = (".txt", ".md", ".text", ".raw", ".tokens", "")  # .raw/.tokens: WikiText's file names
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
_PARAGRAPH = re.compile(r"\n[ \t]*\n")


def is_datasets_dir(p: Path) -> bool:
    return p.is_dir() and any((p / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))


_MAGIC = {b"\x1f\x8b": "gzip-compressed", b"BZh": "bzip2-compressed", b"PK\x03\x04": "a zip archive",
          b"\xfd7zXZ": "xz-compressed", b"(\xb5/\xfd": "zstd-compressed", b"PAR1": "a parquet file"}


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise QuantlmError(f"{what} {path} does not exist; check the path")
    if path.is_dir():
        raise QuantlmError(f"{what} {path} is a directory; pass a text file")
    if not os.access(path, os.R_OK):
        raise QuantlmError(f"{what} {path} is not readable (permission denied); fix its permissions")


def _decode(path: Path, raw: bytes, what: str, offset: int = 0, line: int | None = None) -> str:
    for magic, kind in _MAGIC.items():
        if offset == 0 and raw.startswith(magic):
            raise QuantlmError(f"{what} {path} is {kind}, not text; decompress or convert it to a UTF-8 text file")
    nul = raw.find(b"\x00")
    if nul >= 0:
        at = line if line is not None else raw.count(b"\n", 0, nul) + 1
        raise QuantlmError(f"{what} {path} is binary, not text (NUL byte at offset {offset + nul}, line {at}); "
                           "pass a UTF-8 text file")
    try:
        return raw.decode("utf-8-sig" if offset == 0 else "utf-8")
    except UnicodeDecodeError as e:
        at = line if line is not None else raw.count(b"\n", 0, e.start) + 1
        raise QuantlmError(f"{what} {path} is not UTF-8 (byte 0x{raw[e.start]:02x} at offset {offset + e.start}, "
                           f"line {at}); convert it, e.g. iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8"
                           f"{path.suffix}") from None


def read_text_file(path: str | os.PathLike, what: str = "text file") -> str:
    """The whole file as text; a one-line ``QuantlmError`` for a missing, unreadable, binary, compressed or
    non-UTF-8 file (naming the path, the byte, its offset and line, and the fix). A UTF-8 BOM is dropped."""
    path = Path(path)
    _check_file(path, what)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise QuantlmError(f"{what} {path} cannot be read ({e.strerror})") from None
    return _decode(path, raw, what)


def iter_lines(path: str | os.PathLike, what: str = "text file") -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a large text file, read as a stream, with ``read_text_file``'s errors."""
    path = Path(path)
    _check_file(path, what)
    offset = 0
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                yield lineno, _decode(path, raw, what, offset, lineno)
                offset += len(raw)
    except OSError as e:
        raise QuantlmError(f"{what} {path} cannot be read ({e.strerror})") from None


def _record_texts(records, text_field: str, where: str) -> Iterator[str]:
    for i, rec in enumerate(records, 1):
        if isinstance(rec, str):
            yield rec
        elif isinstance(rec, dict) and isinstance(rec.get(text_field), str):
            yield rec[text_field]
        else:
            raise QuantlmError(f"{where}: record {i} has no string {text_field!r} field; each record needs one "
                               "(or set text_field to the field that holds the text)")


def _jsonl(path: Path, text_field: str) -> Iterator[str]:
    for lineno, line in iter_lines(path, "jsonl file"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise QuantlmError(f"{path}:{lineno}: not valid JSON ({e.msg}); a jsonl file has one object per "
                               f"line with a {text_field!r} field") from None
        yield from _record_texts([row], text_field, f"{path}:{lineno}")


def _column(table_columns: list[str], text_field: str, where: Path) -> None:
    if text_field not in table_columns:
        raise QuantlmError(f"{where}: no {text_field!r} column (columns: {', '.join(table_columns)}); name the "
                           "text column (text_field)")


def iter_documents(path: str | os.PathLike, text_field: str = "text", *, paragraphs: bool = False) -> Iterator[str]:
    """Every document of one file or datasets folder, in order (see the module docstring for the rules)."""
    path = Path(path)
    if not path.exists():
        raise QuantlmError(f"{path} does not exist; pass a .txt, .jsonl, .json, .parquet file or a datasets folder")
    if path.is_dir():
        if not is_datasets_dir(path):
            raise QuantlmError(f"{path}: a folder must be a datasets.save_to_disk folder (state.json or "
                               "dataset_dict.json); pass a file otherwise")
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[sorted(ds)[0]]
        _column(ds.column_names, text_field, path)
        for batch in ds.iter(batch_size=1000):
            yield from (str(t) for t in batch[text_field])
    elif path.suffix == ".jsonl":
        yield from _jsonl(path, text_field)
    elif path.suffix == ".json":
        try:
            data = json.loads(read_text_file(path))
        except json.JSONDecodeError as e:
            raise QuantlmError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        yield from _record_texts(data if isinstance(data, list) else [data], text_field, str(path))
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a corrupt file
            raise QuantlmError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
        _column(names, text_field, path)
        yield from (str(t) for t in pq.read_table(path, columns=[text_field]).column(text_field).to_pylist())
    elif path.suffix in TEXT_SUFFIXES:
        text = read_text_file(path)
        yield from (_PARAGRAPH.split(text) if paragraphs else [text])
    else:
        raise QuantlmError(f"{path}: unknown file type {path.suffix!r}; use .txt, .jsonl, .json or .parquet")
