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


def read_text_file(path: str | os.PathLike) -> str:
    """A UTF-8 text file's contents; binary or wrongly encoded files are named with the byte offset."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise QuantlmError(f"{path}: file not found; check the path") from None
    except IsADirectoryError:
        raise QuantlmError(f"{path} is a directory; pass a text file") from None
    except PermissionError:
        raise QuantlmError(f"{path}: permission denied; make the file readable") from None
    if b"\x00" in raw[:65536]:
        raise QuantlmError(f"{path}: looks binary (NUL bytes), not text; pass a UTF-8 .txt/.jsonl/.parquet file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QuantlmError(f"{path}: not valid UTF-8 (byte {e.start}: {e.reason}); convert it to UTF-8 "
                           "(e.g. iconv -t utf-8)") from None


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
    for lineno, line in enumerate(read_text_file(path).splitlines(), 1):
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
