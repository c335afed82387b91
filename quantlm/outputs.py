"""Owned outputs: a directory appears complete or not at all, and quantlm never replaces or deletes a directory or
a file it did not write (atomic single-file writes: ``quantlm.atomic``; who owns a file: ``claim_output_file``).

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
import hashlib
import json
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
from quantlm.atomic import _chmod_default, refuse_install_location, write_json, write_text
from quantlm.errors import QuantlmError

log = logging.getLogger(__name__)

MARKER = ".quantlm-output"
LEDGER = ".quantlm-files.json"  # beside files whose format carries no mark of their own (CSV, JSON lists, text)
LEDGER_SCHEMA = "quantlm.files/1"
MD_MARK = "<!-- written by quantlm"  # the first line of the Markdown quantlm writes (invisible when rendered)


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


# ------------------------------------------------------------------------------------------- single files

def mark_text() -> str:
    """What quantlm writes into a file's own metadata (PNG Software, SVG/PDF Creator): ``quantlm VERSION``."""
    return f"quantlm {__version__}"


def claim_output_file(path: str | os.PathLike, *, overwrite: bool = False,
                      inputs: Iterable[str | os.PathLike | None] = (), flag: str = "--out",
                      fix: str | None = None) -> Path:
    """Check that quantlm may write the single file ``path``; call it before computing. Returns the path, absolute.

    The rule (the same as for output directories): a new file is written; an existing file is replaced only with
    ``overwrite`` and only when quantlm wrote it (:func:`is_quantlm_file`); an input never, even with
    ``overwrite``: ``path`` must not be one of ``inputs`` (files or folders: model directories, config.json,
    .gguf files) nor lie inside an input folder. A symlink at ``path`` counts as a file quantlm did not write.
    ``flag`` names the option in the messages; ``fix`` replaces their default advice ("choose another FLAG").
    Raises a one-line ``QuantlmError`` naming the file and the fix.
    """
    raw = Path(path)
    try:
        out = _resolved(raw.parent) / raw.name
    except (OSError, RuntimeError):
        out = Path(os.path.abspath(raw.expanduser()))
    refuse_install_location(out, flag)
    other = f"choose another {flag}" if flag.startswith("--") else "choose another path"
    targets = {out}
    if out.is_symlink():
        with contextlib.suppress(OSError, RuntimeError):
            targets.add(out.resolve())
    for inp in inputs:
        if inp is None or str(inp) == "":
            continue
        src = _resolved(inp)
        if src in targets:
            raise QuantlmError(f"{flag} {raw} is the input {inp}; quantlm never writes over its inputs, even with "
                               f"--overwrite: {other}")
        if src.is_dir() and any(_is_relative_to(t, src) for t in targets):
            raise QuantlmError(f"{flag} {raw} lies inside the input {inp}; quantlm never writes into its inputs, "
                               f"even with --overwrite: {other} outside it")
    if out.is_dir() and not out.is_symlink():
        raise QuantlmError(f"{flag} {raw} is a directory; name a file to write")
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise QuantlmError(f"{flag} {raw}: {folder} is a file, not a folder; {other}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise QuantlmError(f"{flag} {raw}: {folder} is not writable; {other} in a writable location")
    if out.exists() or out.is_symlink():
        if not is_quantlm_file(out):
            raise QuantlmError(f"{flag} {raw} exists and was not written by quantlm; "
                               f"{fix or other + ' (--overwrite replaces only files quantlm wrote)'}")
        if not overwrite:
            raise QuantlmError(f"{flag} {raw} already exists; {fix or other + ' or pass --overwrite to replace it'}")
    return out


def write_output_text(path: str | os.PathLike, text: str, *, overwrite: bool = False,
                      inputs: Iterable[str | os.PathLike | None] = (), flag: str = "--out",
                      fix: str | None = None) -> Path:
    """Claim ``path`` (:func:`claim_output_file`, checked again now: the file may have appeared while quantlm
    computed), write ``text`` atomically and record it as quantlm's (:func:`note_written`)."""
    claim_output_file(path, overwrite=overwrite, inputs=inputs, flag=flag, fix=fix)
    write_text(path, text)
    note_written(path)
    return Path(path)


def is_quantlm_file(path: str | os.PathLike) -> bool:
    """Whether quantlm wrote the file ``path``, by the evidence the file's format can carry:

    * JSON: an object whose ``schema`` starts with ``quantlm.`` (records) or whose ``tool`` is ``quantlm``;
    * PNG: a ``Software`` text chunk, SVG and PDF: a ``Creator``, starting with ``quantlm `` (matplotlib
      metadata, set by :mod:`quantlm.plots`);
    * Markdown: a first line starting with ``<!-- written by quantlm`` (invisible when rendered);
    * any format (CSV, JSON lists, text tables, which have no room for a mark their readers would ignore): an
      entry in the folder's ``.quantlm-files.json`` whose size and SHA-256 match the file now, so a file edited
      since quantlm wrote it is no longer quantlm's.
    """
    p = Path(path)
    try:
        if p.is_symlink() or not p.is_file():
            return False
        return _has_own_mark(p) or _in_ledger(p)
    except OSError:
        return False


def note_written(path: str | os.PathLike) -> None:
    """Record a file quantlm has just written as its own: files whose format carries quantlm's mark need nothing;
    the others get an entry (size, SHA-256) in their folder's ``.quantlm-files.json``. A foreign file of that
    name is left alone (the file then counts as not quantlm's: the safe side)."""
    p = Path(path)
    if _has_own_mark(p):
        return
    ledger = p.parent / LEDGER
    if ledger.exists() or ledger.is_symlink():
        body = _read_ledger(ledger)
        if body is None:
            log.warning("%s is not quantlm's file ledger; %s is not recorded as written by quantlm", ledger, p)
            return
    else:
        body = {"schema": LEDGER_SCHEMA, "tool": "quantlm", "files": {}}
    files = {name: e for name, e in body["files"].items() if (p.parent / name).is_file()}
    files[p.name] = {"bytes": p.stat().st_size, "sha256": _sha256(p), "version": __version__,
                     "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    body["files"] = dict(sorted(files.items()))
    write_json(ledger, body)


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_ledger(ledger: Path) -> dict | None:
    try:
        if ledger.is_symlink() or not ledger.is_file():
            return None
        body = json.loads(ledger.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(body, dict) and body.get("schema") == LEDGER_SCHEMA and isinstance(body.get("files"), dict):
        return body
    return None


def _in_ledger(p: Path) -> bool:
    body = _read_ledger(p.parent / LEDGER)
    entry = body["files"].get(p.name) if body else None
    return (isinstance(entry, dict) and entry.get("bytes") == p.stat().st_size
            and entry.get("sha256") == _sha256(p))


_HEAD = 1 << 16


def _has_own_mark(p: Path) -> bool:
    """The mark quantlm puts inside JSON objects, PNG/SVG/PDF metadata and Markdown (see is_quantlm_file)."""
    suffix = p.suffix.lower()
    try:
        if suffix == ".json":
            if p.stat().st_size > 64 << 20:
                return False
            body = json.loads(p.read_text(encoding="utf-8"))
            return isinstance(body, dict) and (str(body.get("schema", "")).startswith("quantlm.")
                                               or body.get("tool") == "quantlm")
        if suffix == ".png":
            return _png_software(p).startswith("quantlm ")
        if suffix == ".svg":
            with open(p, "rb") as f:
                head = f.read(_HEAD)
            return re.search(rb"<dc:creator>\s*<cc:Agent>\s*<dc:title>quantlm ", head) is not None
        if suffix == ".pdf":
            size = p.stat().st_size
            with open(p, "rb") as f:
                data = f.read(_HEAD)
                if size > _HEAD:
                    f.seek(max(size - _HEAD, _HEAD))
                    data += f.read()
            return b"/Creator (quantlm " in data
        if suffix == ".md":
            with open(p, "rb") as f:
                return f.readline(256).startswith(MD_MARK.encode())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return False


def _png_software(p: Path) -> str:
    """The PNG's ``Software`` text (tEXt chunks come before the image data); '' if none."""
    import struct

    with open(p, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return ""
        while True:
            head = f.read(8)
            if len(head) < 8:
                return ""
            n, kind = struct.unpack(">I4s", head)
            if kind in (b"IDAT", b"IEND"):
                return ""
            if kind != b"tEXt" or n > _HEAD:
                f.seek(n + 4, os.SEEK_CUR)  # the chunk and its CRC
                continue
            data = f.read(n)
            f.read(4)  # CRC
            if b"\0" in data:
                key, _, value = data.partition(b"\0")
                if key == b"Software":
                    return value.decode("latin-1")


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
