"""One quantlm process at a time per output: a lock file naming its holder (PID, host, command, start time).

``hold(directory)`` takes ``.NAME.lock`` beside ``directory`` (beside, so the directory itself stays untouched
and an empty run folder stays empty). The lock file is written completely under a temporary name and then
hard-linked into place, so it appears atomically and always names its holder. A lock whose holder is dead on
this host is stale: it is taken over, with a warning. A live holder (or one on another host, which cannot be
checked from here) gives a ``QuantlmError`` naming it and how to clear the lock. The same process may take the
same lock again (nested calls); it is released when the outermost holder leaves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from quantlm.errors import QuantlmError
from quantlm.outputs import hostname, pid_alive

log = logging.getLogger(__name__)

class LockBusy(QuantlmError):
    """The lock is held by another live process (its message names the holder)."""


_held: dict[Path, int] = {}  # lock path -> nesting depth, in this process
_guard = threading.Lock()


def lock_path(directory: str | os.PathLike) -> Path:
    """Where the lock of ``directory`` lives: ``.NAME.lock`` in its parent."""
    d = Path(os.path.abspath(Path(directory).expanduser()))
    return d.parent / f".{d.name}.lock"


def read_holder(path: str | os.PathLike) -> dict | None:
    """The holder a lock file names, or None if there is no lock; ``{}`` for an unreadable one."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    cmd = holder.get("command") or "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('started', '?')}: {cmd}"


def _is_stale(holder: dict, path: Path) -> bool:
    if not holder:  # unreadable: only stale once it is old (a writer never leaves it half-written)
        try:
            return time.time() - path.stat().st_mtime > 60
        except FileNotFoundError:
            return True
    if holder.get("host") != hostname():
        return False
    try:
        return not pid_alive(int(holder.get("pid", -1)))
    except (TypeError, ValueError):
        return True


def acquire(directory: str | os.PathLike, what: str = "run", wait: float = 0.0) -> Path:
    """Take the lock of ``directory``; returns the lock file. See the module docstring. ``wait``: seconds to keep
    trying while another live process holds it (for short critical sections shared by concurrent runs)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return _acquire(directory, what)
        except LockBusy:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def _acquire(directory: str | os.PathLike, what: str) -> Path:
    path = lock_path(directory)
    with _guard:
        if path in _held:
            _held[path] += 1
            return path
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"pid": os.getpid(), "host": hostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "what": what, "directory": str(Path(directory)), "command": " ".join(["quantlm", *sys.argv[1:]])
            if Path(sys.argv[0]).name in ("quantlm", "__main__.py") else " ".join(sys.argv)}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(body) + "\n", encoding="utf-8")
        for _ in range(3):
            try:
                os.link(tmp, path)  # atomic, and fails if a lock exists
                break
            except FileExistsError:
                holder = read_holder(path)
                if holder is None:
                    continue  # released meanwhile: try again
                if holder.get("pid") == os.getpid() and holder.get("host") == hostname():
                    break  # ours, from an earlier call in this process whose release was skipped
                if not _is_stale(holder, path):
                    raise LockBusy(
                        f"{directory} is in use by another quantlm {what} ({_describe(holder)}); wait for it to "
                        f"finish, or if that process is gone, delete {path}") from None
                log.warning("taking over the stale lock %s (%s, no longer running)", path, _describe(holder))
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        else:
            raise QuantlmError(f"could not take the lock {path} (it keeps changing); another quantlm {what} "
                               f"is starting on {directory}: wait, or delete {path}")
    except OSError as e:
        raise QuantlmError(f"cannot create the lock {path} ({e.strerror}); is {path.parent} writable?") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    with _guard:
        _held[path] = 1
    return path


def release(directory: str | os.PathLike) -> None:
    """Release the lock of ``directory`` if this process holds it (never another process's lock)."""
    path = lock_path(directory)
    with _guard:
        depth = _held.get(path, 0)
        if depth > 1:
            _held[path] = depth - 1
            return
        _held.pop(path, None)
    holder = read_holder(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == hostname():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def hold(directory: str | os.PathLike, what: str = "run", wait: float = 0.0) -> Iterator[Path]:
    """``with hold(out, "suite"):`` - the lock of ``out`` for the block (see the module docstring)."""
    path = acquire(directory, what, wait)
    try:
        yield path
    finally:
        release(directory)
