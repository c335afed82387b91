"""Owned output directories: a directory appears complete or not at all, and quantlm never replaces or deletes a
directory it did not write (single files: ``quantlm.atomic``).

* ``output_dir(path, overwrite, protect)`` writes a marker file (``.quantlm-output``) into every directory it
  creates; ``overwrite`` replaces only a directory holding that marker (or an empty one). It refuses, before
  anything is written, an OUT that is or contains one of the ``protect`` paths (the inputs), the working
  directory or one of its ancestors, a home directory, or a non-quantlm directory with content.
* The partial output lives in ``.NAME.PID@HOST.XXXX.partial`` beside ``path``. SIGTERM (what Slurm time limits
  send) and SIGINT remove it; a partial or ``.NAME.old-PID@HOST`` left by a killed run (SIGKILL, the OOM killer:
  its PID is no longer alive on this host) is removed, and logged, by the next run on the same OUT.
* Outputs are readable by the group and others, subject to the user's umask (directories 0755, files 0644 under
  the usual umask 022): ``mkdtemp``/``mkstemp`` would otherwise give 0700 directories and 0600 files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from quantlm import __version__
from quantlm.atomic import _chmod_default, refuse_install_location, write_json
from quantlm.errors import QuantlmError

log = logging.getLogger(__name__)

MARKER = ".quantlm-output"


# ------------------------------------------------------------------------------------ process identity

def hostname() -> str:
    """This machine's short host name, reduced to [A-Za-z0-9-] (it goes into file names)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0]) or "localhost"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a zombie counts as gone; another user's process as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2] in "ZX":
            return False
    return True


# ------------------------------------------------------------------------------------------ markers

def is_quantlm_output(path: str | os.PathLike) -> bool:
    """A directory quantlm wrote: it holds the marker."""
    p = Path(path)
    return p.is_dir() and (p / MARKER).is_file()


def write_marker(directory: str | os.PathLike, **info) -> Path:
    """Mark ``directory`` as quantlm's (who wrote it, when); ``--overwrite`` replaces only marked directories."""

    body = {"tool": "quantlm", "version": __version__, "pid": os.getpid(), "host": hostname(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
    return write_json(Path(directory) / MARKER, body)


# ---------------------------------------------------------------------------------------- checks

def _resolved(p: str | os.PathLike) -> Path:
    return Path(os.path.abspath(Path(p).expanduser())).resolve()


def _is_relative_to(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _is_home_dir(out: Path) -> bool:
    """``out`` is this user's home, its owner's home, or a sibling of this user's home (``/home/NAME``).
    No ``pwd.getpwall()``: enumerating a cluster's directory service can take minutes."""
    homes = set()
    with contextlib.suppress(OSError, RuntimeError, KeyError):
        homes.add(Path.home().resolve())
    if os.environ.get("HOME"):
        homes.add(_resolved(os.environ["HOME"]))
    with contextlib.suppress(ImportError, KeyError, OSError):
        import pwd

        if out.exists():
            homes.add(_resolved(pwd.getpwuid(out.stat().st_uid).pw_dir))
    if out in homes:
        return True
    return any(h.parent == out.parent and h.parent != Path(h.anchor) for h in homes)


def check_output(path: str | os.PathLike, overwrite: bool = False, protect: Iterable[str | os.PathLike] = (),
                 need_bytes: int | None = None, flag: str = "--out") -> Path:
    """Every check of an output location that needs no compute; call it before loading anything.

    ``protect`` lists the inputs (model directories, data files) an OUT must never be or contain.
    ``need_bytes``: the predicted size of the output; the file system must have that much free (plus 5%).
    Returns the resolved path. Raises one-line ``QuantlmError``s naming the fix.
    """
    raw = Path(path)
    out = _resolved(raw)
    refuse_install_location(out, flag)
    for p in protect:
        if p is None or str(p) == "":
            continue
        src = _resolved(p)
        if _is_relative_to(src, out):
            what = "is" if src == out else "contains"
            raise QuantlmError(f"{flag} {raw} {what} the input {p}; choose an output outside the input, "
                               f"e.g. {flag} {out.parent / (out.name + '-out')}")
    cwd = _resolved(Path.cwd())
    if _is_relative_to(cwd, out):
        what = "is the working directory" if cwd == out else "is an ancestor of the working directory"
        raise QuantlmError(f"{flag} {raw} {what}; name a new folder for the output, e.g. {flag} ./out")
    if out == Path(out.anchor) or _is_home_dir(out):
        raise QuantlmError(f"{flag} {raw} is a home directory; name a new folder inside it, e.g. {flag} {out}/out")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise QuantlmError(f"{flag} {raw} exists and is not a directory; choose another {flag}")
        if not overwrite:
            raise QuantlmError(f"output directory {raw} already exists; choose another --out or pass --overwrite")
        if any(out.iterdir()) and not is_quantlm_output(out):
            raise QuantlmError(f"{flag} {raw} is not a quantlm output (no {MARKER} marker) and is not empty; "
                               f"--overwrite replaces only quantlm outputs: choose another {flag} or empty it yourself")
    _check_writable(out, raw, need_bytes, flag)
    return out


def check_dir_writable(path: str | os.PathLike, flag: str = "--results", need_bytes: int | None = None) -> Path:
    """A folder that outputs are added to (records, plots, a suite's root): an existing directory or one that can
    be created, writable, outside the install, with ``need_bytes`` free. Call it before computing."""
    raw = Path(path)
    out = _resolved(raw)
    refuse_install_location(out, flag)
    if out.exists() and not out.is_dir():
        raise QuantlmError(f"{flag} {raw} is a file, not a directory; choose a folder")
    # an existing folder must itself be writable; a new one needs a writable ancestor
    _check_writable(out / "_" if out.is_dir() else out, raw, need_bytes, flag)
    return out


def _check_writable(out: Path, raw: Path, need_bytes: int | None, flag: str) -> None:
    parent = out.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise QuantlmError(f"{flag} {raw}: {parent} is not a directory; choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QuantlmError(f"{flag} {raw}: {parent} is not writable; choose a writable location for {flag}")
    if need_bytes:
        free = shutil.disk_usage(parent).free
        if free < need_bytes * 1.05:
            raise QuantlmError(f"{flag} {raw}: {free / 1e9:.2f} GB free on {parent}, the output needs about "
                               f"{need_bytes / 1e9:.2f} GB; free space or choose another {flag}")


# ------------------------------------------------------------------------------------- stale partials

def _stale_pattern(name: str) -> re.Pattern:
    n = re.escape(name)
    return re.compile(rf"^\.{n}\.(?:(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)\.[^.]+\.partial"
                      rf"|old-(?P<opid>\d+)@(?P<ohost>[A-Za-z0-9-]+))$")


def clean_stale(path: str | os.PathLike) -> list[Path]:
    """Remove the partial (``.NAME.*.partial``) and replaced (``.NAME.old-*``) siblings of ``path`` left by
    killed runs on this host; returns what was removed. Siblings from another host or a live process are kept."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return []
    pat = _stale_pattern(path.name)
    here = hostname()
    removed = []
    try:
        siblings = list(parent.iterdir())
    except OSError:
        return []
    for p in siblings:
        m = pat.match(p.name)
        if not m:
            continue
        pid, host = (int(m["pid"]), m["host"]) if m["pid"] else (int(m["opid"]), m["ohost"])
        if host != here or pid_alive(pid):
            continue
        _rm(p)
        log.warning("removed %s, left by a killed quantlm run (pid %d)", p, pid)
        removed.append(p)
    return removed


# -------------------------------------------------------------------------------------------- signals

class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (a scheduler's time limit, ``kill``): raised like Ctrl-C so outputs are cleaned up."""


def _raise_terminated(signum, frame):
    raise Terminated(f"received {signal.Signals(signum).name}")


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` (so ``except BaseException``/``finally`` clean up);
    the previous handler comes back afterwards. A no-op off the main thread (signals go to the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.getsignal(signal.SIGTERM)
    if old is _raise_terminated:  # nested: the outer block already installed it
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)


# ------------------------------------------------------------------------------------------ directories

@contextlib.contextmanager
def output_dir(path: str | os.PathLike, overwrite: bool = False,
               protect: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` only if the block finishes without error.

    An existing ``path`` is an error unless ``overwrite``; then only a quantlm output (or an empty directory) is
    replaced, and only after the new contents are complete, so an interrupted run never destroys the old output.
    ``protect``: the inputs, which the output must never be or contain. See the module docstring.
    """
    path = Path(path)
    check_output(path, overwrite, protect)
    clean_stale(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with terminate_raises():
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}@{hostname()}.", suffix=".partial",
                                    dir=path.parent))
        try:
            _chmod_default(tmp, directory=True)
            write_marker(tmp)
            yield tmp
            _finish(tmp, path, overwrite)
        except BaseException:
            _remove_quietly(tmp)
            raise


def _remove_quietly(tmp: Path) -> None:
    """Remove a partial output; a second SIGTERM must not interrupt the clean-up (it is ignored meanwhile)."""
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, signal.SIG_IGN) if main else None
    try:
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if main:
            signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)


def _rm(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


def _finish(tmp: Path, path: Path, overwrite: bool) -> None:
    if not (path.exists() or path.is_symlink()):
        os.replace(tmp, path)
        return
    # re-checked: the directory may have changed while we computed
    if not overwrite:
        raise QuantlmError(f"output directory {path} appeared while quantlm was writing it; choose another --out "
                           "or pass --overwrite")
    if not path.is_dir() or (any(path.iterdir()) and not is_quantlm_output(path)):
        raise QuantlmError(f"{path} changed into a non-quantlm output while quantlm was writing it; nothing "
                           "was replaced: move it away and rerun")
    old = path.with_name(f".{path.name}.old-{os.getpid()}@{hostname()}")
    _rm(old)
    os.replace(path, old)
    os.replace(tmp, path)
    _rm(old)
