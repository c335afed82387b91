"""Atomic files: write to a temporary sibling, then rename, so a crash never leaves half a file. Files keep the
mode of the file they replace, or get the umask's default (``mkstemp`` would give 0600). Nothing is ever written
into quantlm's installed package."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from quantlm.errors import QuantlmError
from quantlm.paths import is_inside_install

# ------------------------------------------------------------------------------------------- modes

def umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc``), else by a set-and-restore."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    old = os.umask(0o022)
    os.umask(old)
    return old


def _chmod_default(path: Path, directory: bool) -> None:
    """The mode ``mkdir``/``open`` would give: 0777 / 0666 less the umask (temp files are created 0700 / 0600)."""
    with contextlib.suppress(OSError):
        os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def follow_umask(path: str | os.PathLike) -> None:
    """Give ``path`` and, for a directory, everything under it (symlinks untouched) the modes ``open`` and
    ``mkdir`` give: 0666 / 0777 less the umask. For trees quantlm has just written into a temporary directory:
    writers that go through a temporary file of their own leave 0600 (safetensors' ``save_file``, so also
    ``save_pretrained``), and ``shutil.copy`` copies the source's mode."""
    path = Path(path)
    if path.is_symlink():
        return
    _chmod_default(path, directory=path.is_dir())
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                p = Path(root) / name
                if not p.is_symlink():
                    _chmod_default(p, directory=name in dirs)


# ------------------------------------------------------------------------------------------- files

def refuse_install_location(path: str | os.PathLike, flag: str = "output") -> None:
    """Nothing is ever written into quantlm's installed package (its shipped data lives there)."""
    if is_inside_install(path):
        raise QuantlmError(f"{flag} {path} is inside quantlm's installed package; write outputs elsewhere, e.g. "
                           "relative to the working directory")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (same suffix) to write; it replaces ``path`` only on success.

    The file keeps the mode of the file it replaces, or gets the umask's default (not mkstemp's 0600).
    """
    path = Path(path)
    refuse_install_location(path)
    if path.is_dir():
        raise QuantlmError(f"{path} is a directory; name a file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
    except (FileExistsError, NotADirectoryError):
        raise QuantlmError(f"cannot write {path}: a part of its folder {path.parent} is a file; choose another "
                           "path") from None
    except PermissionError:
        raise QuantlmError(f"cannot write {path}: {path.parent} is not writable; choose a writable location") from None
    except OSError as e:
        raise QuantlmError(f"cannot write {path}: {e.strerror}; choose another location") from None
    os.close(fd)
    try:
        mode = path.stat().st_mode & 0o7777
        os.chmod(tmp, mode)
    except OSError:
        _chmod_default(Path(tmp), directory=False)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (fsync'd temp file in the same folder, then rename)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=str) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> Path:
    """Append one JSON line; a single write of a whole line, flushed, so readers never see half a record."""
    path = Path(path)
    refuse_install_location(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    return path
