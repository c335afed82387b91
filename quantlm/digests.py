"""Content digests of inputs (checkpoints, calibration text, evaluation data, corpora): what decides whether a
finished job is still valid or a killed run may resume is the bytes, never the path.

A file's sha256 is computed once and cached by (absolute path, size, mtime, inode): in this process, and with
``persist`` (what a suite's plan asks for) as a small entry under ``<cache>/digests/`` (``paths.cache_dir``), so
planning a suite over multi-GB checkpoints hashes each file once across runs. Any edit (appended text, a replaced
model folder) changes the size, mtime or inode and is hashed again. Cache entries are written atomically; a cache
that cannot be written is skipped, never an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from quantlm.errors import QuantlmError
from quantlm.paths import cache_dir

_memo: dict[tuple, str] = {}


def _key(path: Path) -> tuple:
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns, st.st_ino


def _cache_entry(key: tuple) -> Path | None:
    with contextlib.suppress(OSError, RuntimeError):
        return cache_dir() / "digests" / (hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32] + ".json")
    return None


def file_sha256(path: str | os.PathLike, persist: bool = False) -> str:
    """The sha256 of a file's bytes (hex), cached by path, size, mtime and inode (on disk too with ``persist``)."""
    path = Path(os.path.abspath(path))
    try:
        key = _key(path)
    except FileNotFoundError:
        raise QuantlmError(f"{path} does not exist; it is an input of this run") from None
    if key in _memo:
        return _memo[key]
    entry = _cache_entry(key) if persist else None
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        cached = json.loads(entry.read_text(encoding="utf-8"))
        if cached.get("key") == list(key):
            _memo[key] = cached["sha256"]
            return cached["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = _memo[key] = h.hexdigest()
    if entry is not None:
        _store(entry, {"key": list(key), "sha256": digest})
    return digest


def _store(entry: Path, body: dict) -> None:
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    with contextlib.suppress(OSError):
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(body), encoding="utf-8")
        os.replace(tmp, entry)
    with contextlib.suppress(OSError):
        tmp.unlink()


def files_sha256(files: Iterable[tuple[str, Path]], persist: bool = False) -> str:
    """One digest over ``(name, file)`` pairs: each name with its file's sha256, in the order given."""
    h = hashlib.sha256()
    for name, f in files:
        h.update(f"{name}\0{file_sha256(f, persist)}\n".encode())
    return h.hexdigest()


def tree_sha256(path: str | os.PathLike, persist: bool = False) -> str:
    """A file's sha256, or a folder's: every regular file under it (relative path and content), sorted."""
    path = Path(path)
    if path.is_dir():
        return files_sha256(((f.relative_to(path).as_posix(), f) for f in sorted(path.rglob("*")) if f.is_file()),
                            persist)
    return file_sha256(path, persist)


# Files of a checkpoint folder that do not change what the model computes: quantlm's own run records.
_NOT_MODEL = {"quantlm-job.json", "report.json", "README.md"}


def checkpoint_sha256(model_dir: str | os.PathLike, persist: bool = False) -> str:
    """The identity of a checkpoint folder: its config, tokenizer and every tensor file, by content (the top-level
    regular files, less quantlm's run records and hidden files)."""
    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise QuantlmError(f"{d} is not a checkpoint folder (no config.json); pass a Hugging Face checkpoint folder")
    return files_sha256(((f.name, f) for f in sorted(d.iterdir())
                         if f.is_file() and not f.name.startswith(".") and f.name not in _NOT_MODEL), persist)
