"""Hidden states between decoder blocks, on the device, in host memory or in a file; the resume state.

``HiddenStates`` holds the activations of every calibration window entering (or leaving) one block,
``[nsamples, seqlen, hidden]`` in the storage dtype, as one buffer:
- ``device``: a tensor on the compute device (no transfers at all);
- ``host``: a CPU tensor, pinned when the compute device is a GPU, read ahead one batch on a side
  stream and written back with non-blocking copies, so transfers overlap the block's compute;
- ``disk``: a raw file with the same layout as ``numpy.memmap(path, dtype, shape=(n, t, d))``, read and
  written one batch at a time with positional reads/writes into a small staging buffer. Not mapped
  into the process on purpose: mapped pages would count in the resident set (and in the measured peak)
  until the kernel evicts them, while page-cache pages of plain reads do not.
Batches are read in the compute dtype on the compute device and written from any dtype/device.

``RunState`` makes a disk-offloaded run resumable at block granularity: after block i, its quantized
results go to ``block-<i>.pt`` and ``state.json`` names the file holding block i+1's inputs (the two
hidden-state files alternate, so the inputs of the block being computed are never overwritten). A run
killed inside block i restarts at block i with the same inputs, so it ends byte-identical to an
uninterrupted run. The state is tied to a fingerprint of every weight, the tokens, the settings and the output;
the folder is locked while in use and marked as quantlm's; all of it is deleted when the run succeeds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from quantlm import locks
from quantlm.atomic import atomic_path, write_json
from quantlm.errors import QuantlmError
from quantlm.gptq.solver import GPTQResult

log = logging.getLogger(__name__)

STATE_NAME = "state.json"
STATE_VERSION = 1
# The files a run state writes in its folder, with atomic_path's temporaries (nothing else there is touched).
_OWN_FILE = re.compile(
    r"hidden-[01]\.bin|(state\.json|block-\d{4,}\.pt)(\.tmp)?|\.(state\.json|block-\d{4,}\.pt|quantlm-offload\.json)\..+")


def batches_of(nsamples: int, batch_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + batch_size, nsamples)) for s in range(0, nsamples, batch_size)]


def _as_bytes(t: Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor (any dtype, bf16 included), without a copy."""
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def _positional_io(op, fd: int, buf: memoryview, offset: int, what: str) -> None:
    """All of ``buf`` through ``os.preadv`` / ``os.pwritev`` at ``offset`` (they may move fewer bytes)."""
    done = 0
    while done < len(buf):
        n = op(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise OSError(f"short {what} the offload file at byte {offset + done}")
        done += n


def _pread_into(fd: int, buf: memoryview, offset: int) -> None:
    _positional_io(os.preadv, fd, buf, offset, "read from")


def _pwrite_from(fd: int, buf: memoryview, offset: int) -> None:
    _positional_io(os.pwritev, fd, buf, offset, "write to")


class HiddenStates:
    """The hidden states of all calibration windows at one block boundary, read and written by batch.

    ``where``: ``device`` | ``host`` | ``disk``; ``device``/``dtype``: the compute device and dtype the
    batches are read in; ``storage``: the dtype they are kept in. ``path``: the file (disk); ``create``
    False opens an existing file (resume). ``reuse``: a closed store whose buffer (same shape, dtype and
    place) this one takes over, so that block after block the same pages hold the hidden states instead of
    fresh ones being faulted in. Iterating yields the batches in order (with read-ahead).
    """

    def __init__(self, batches: list[tuple[int, int]], seqlen: int, width: int, storage: torch.dtype, *,
                 where: str, device: torch.device, dtype: torch.dtype, path: str | os.PathLike | None = None,
                 create: bool = True, reuse: HiddenStates | None = None):
        self.batches, self.seqlen, self.width = batches, seqlen, width
        self.storage, self.where, self.device, self.dtype = storage, where, torch.device(device), dtype
        self.nsamples = batches[-1][1] if batches else 0
        shape = (self.nsamples, seqlen, width)
        self.nbytes = self.nsamples * seqlen * width * torch.empty((), dtype=storage).element_size()
        self._row = seqlen * width * torch.empty((), dtype=storage).element_size()  # bytes per window
        self._cuda = self.device.type == "cuda"
        self._copy_stream = None
        self.path = Path(path) if path is not None else None
        self._fd = None
        self._spare: Tensor | None = None
        spare = reuse.take_spare(shape, storage, where) if reuse is not None else None
        if spare is not None:
            self._buf = spare
            if where == "host" and self._cuda:
                self._copy_stream = torch.cuda.Stream(self.device)
        elif where == "device":
            self._buf = torch.empty(shape, dtype=storage, device=self.device)
        elif where == "host":
            self._buf = torch.empty(shape, dtype=storage, pin_memory=self._cuda)
            if self._cuda:
                self._copy_stream = torch.cuda.Stream(self.device)
        elif where == "disk":
            if self.path is None:
                raise ValueError("a disk store needs a path")
            self._buf = None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_RDWR | (os.O_CREAT if create else 0)
            self._fd = os.open(self.path, flags, 0o666)  # the umask applies, as for every file quantlm writes
            if create:
                os.ftruncate(self._fd, self.nbytes)
            elif os.fstat(self._fd).st_size != self.nbytes:
                raise ValueError(f"{self.path}: size {os.fstat(self._fd).st_size}, expected {self.nbytes}")
        else:
            raise ValueError(f"unknown hidden-state location {where!r}")

    def __len__(self) -> int:
        return len(self.batches)

    def _staging(self, n: int) -> Tensor:
        return torch.empty((n, self.seqlen, self.width), dtype=self.storage, pin_memory=self._cuda)

    def read(self, b: int) -> Tensor:
        """Batch ``b`` on the compute device in the compute dtype (may be a view of the buffer)."""
        s, e = self.batches[b]
        if self.where == "disk":
            x = self._staging(e - s)
            _pread_into(self._fd, _as_bytes(x), s * self._row)
            x = x.to(self.device, non_blocking=False)
        else:
            x = self._buf[s:e].to(self.device)
        return x.to(self.dtype)

    def __iter__(self) -> Iterator[Tensor]:
        if self._copy_stream is None:
            for b in range(len(self)):
                yield self.read(b)
            return
        # pinned host buffer -> GPU: batch b+1 is copied on a side stream while batch b computes
        stream, compute = self._copy_stream, torch.cuda.current_stream(self.device)

        def issue(b):
            s, e = self.batches[b]
            with torch.cuda.stream(stream):
                x = self._buf[s:e].to(self.device, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(stream)
            return x, ev

        nxt = issue(0) if len(self) else None
        for b in range(len(self)):
            x, ev = nxt
            if b + 1 < len(self):
                nxt = issue(b + 1)
            compute.wait_event(ev)
            x.record_stream(compute)  # allocated on the side stream, used on the compute stream
            yield x.to(self.dtype)

    def write(self, b: int, x: Tensor) -> None:
        """Store batch ``b`` (``[rows, seqlen, width]``, any dtype or device) in the storage dtype."""
        s, e = self.batches[b]
        if tuple(x.shape) != (e - s, self.seqlen, self.width):
            raise ValueError(f"batch {b}: shape {tuple(x.shape)}, expected {(e - s, self.seqlen, self.width)}")
        if self.where == "device":
            self._buf[s:e].copy_(x)
        elif self.where == "host":
            if self._copy_stream is not None and x.device.type == "cuda":
                y = x.to(self.storage)  # on the compute stream
                self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self._copy_stream):
                    self._buf[s:e].copy_(y, non_blocking=True)
                y.record_stream(self._copy_stream)
            else:
                self._buf[s:e].copy_(x)
        else:
            y = x.detach().to(device="cpu", dtype=self.storage).contiguous()
            _pwrite_from(self._fd, _as_bytes(y), s * self._row)

    def flush(self) -> None:
        """Make every write visible to readers (GPU copies finished; disk data on stable storage)."""
        if self._copy_stream is not None:
            self._copy_stream.synchronize()
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self, keep_buffer: bool = False) -> None:
        """Done with these hidden states; ``keep_buffer``: hold the buffer for a next store (``reuse``)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._spare = self._buf if keep_buffer else None
        self._buf = None

    @property
    def reusable(self) -> bool:
        """Closed with its buffer kept for a next store."""
        return self._spare is not None

    def take_spare(self, shape: tuple, storage: torch.dtype, where: str) -> Tensor | None:
        spare, self._spare = self._spare, None
        if spare is None or where != self.where or tuple(spare.shape) != tuple(shape) or spare.dtype != storage:
            return None
        return spare

    def tensor(self) -> Tensor:
        """All hidden states as one CPU tensor in the storage dtype (tests, small runs)."""
        if self.where == "disk":
            out = torch.empty((self.nsamples, self.seqlen, self.width), dtype=self.storage)
            _pread_into(self._fd, _as_bytes(out), 0)
            return out
        self.flush()
        return self._buf.cpu()


# ----------------------------------------------------------------------------------------- resume

def run_fingerprint(model: torch.nn.Module, tokens: Tensor, extra: dict) -> str:
    """A hash of what decides a run's results: every parameter (name, dtype, shape and every value), the
    calibration tokens and ``extra`` (recipe, settings, the output, versions). All values, not a sample: a
    checkpoint edited between a kill and the rerun must not resume into a mix of old and new blocks."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach().to("cpu").contiguous()
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        h.update(_as_bytes(t.reshape(-1)))
    h.update(_as_bytes(tokens.detach().to("cpu", torch.int64).contiguous().reshape(-1)))
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _result_to_dict(r: GPTQResult) -> dict:
    """Every field of a result (tensors and numbers only, so ``torch.load(weights_only=True)`` reads it)."""
    return {f.name: getattr(r, f.name) for f in dataclasses.fields(r)}


def _result_from_dict(d: dict) -> GPTQResult:
    return GPTQResult(**d)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


MARKER = ".quantlm-offload.json"  # written first in a folder quantlm keeps run state in; checked before any removal


def own_files(directory: Path) -> list[Path]:
    """The files a quantlm run state wrote in ``directory`` (none unless its marker is there)."""
    if not (directory / MARKER).is_file():
        return []
    return [p for p in directory.iterdir() if _OWN_FILE.fullmatch(p.name)]


def reusable_bytes(directory: Path) -> int:
    """Disk bytes an earlier run's state holds in ``directory``: reused on resume, or removed before a fresh run,
    so a free-space check counts them as available."""
    return sum(p.stat().st_size for p in own_files(directory) if p.is_file())


class RunState:
    """The resume state of a disk-offloaded run in ``directory`` (see the module notes).

    The folder is locked while the run uses it (``locks.hold``: a second live run is refused, naming the holder)
    and holds a marker naming its run; files are removed only where that marker is, so a folder of the user's that
    happens to hold a ``state.json`` or ``hidden-0.bin`` is refused, never emptied."""

    def __init__(self, directory: str | os.PathLike, fingerprint: str, owner: str = ""):
        self.dir = Path(directory)
        self.fingerprint = fingerprint
        self.owner = owner
        self.next_block = 0
        self.inputs = "hidden-0.bin"
        self.tails: dict[str, str] = {}
        self.started = False  # the first block's inputs are complete on disk
        self.locked = False

    @classmethod
    def open(cls, directory: str | os.PathLike, fingerprint: str, resume: bool = True, owner: str = "") -> RunState:
        """The saved state in ``directory`` if it belongs to this run (same fingerprint) and ``resume``;
        else a fresh state (a stale one of quantlm's is removed). Locks the folder until :meth:`release`."""
        state = cls(directory, fingerprint, owner)
        if state.dir.exists() and not state.dir.is_dir():
            raise QuantlmError(f"--offload-dir {state.dir} is a file; name a folder (it is created if missing)")
        locks.acquire(state.dir, "quantize (offload state)")
        state.locked = True
        try:
            state._claim(resume)
        except BaseException:
            state.release()
            raise
        return state

    def _claim(self, resume: bool) -> None:
        path = self.dir / STATE_NAME
        theirs = [p.name for p in self.dir.iterdir() if _OWN_FILE.fullmatch(p.name)] if self.dir.is_dir() else []
        if theirs and not (self.dir / MARKER).is_file():
            raise QuantlmError(f"--offload-dir {self.dir} holds {', '.join(sorted(theirs)[:3])} that quantlm did not "
                               f"write (no {MARKER}); quantlm will not delete them: choose an empty folder")
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
            except (OSError, ValueError):
                saved = {}
            if resume and saved.get("version") == STATE_VERSION and saved.get("fingerprint") == self.fingerprint:
                self.next_block, self.inputs = int(saved["next_block"]), saved["inputs"]
                self.tails, self.started = dict(saved.get("tails", {})), True
                return
            log.warning("%s: removing the saved state of %s", self.dir,
                        "another run" if saved.get("fingerprint") != self.fingerprint else "this run (resume off)")
            self._remove_files()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_json(self.dir / MARKER, {"quantlm": "offload state", "owner": self.owner,
                                           "fingerprint": self.fingerprint})
        except OSError as e:
            raise QuantlmError(f"--offload-dir {self.dir} is not writable ({e.strerror}); choose another "
                               "--offload-dir") from None

    @property
    def other(self) -> str:
        return "hidden-1.bin" if self.inputs == "hidden-0.bin" else "hidden-0.bin"

    def _write_state(self) -> None:
        body = {"version": STATE_VERSION, "fingerprint": self.fingerprint, "next_block": self.next_block,
                "inputs": self.inputs, "tails": self.tails}
        write_json(self.dir / STATE_NAME, body)
        _fsync_dir(self.dir)  # the rename itself survives a power cut

    def mark_started(self) -> None:
        """The first block's inputs are complete in ``self.inputs``."""
        self.started = True
        self._write_state()

    def block_done(self, i: int, results: dict[str, GPTQResult], reports: list[dict], tails: dict[str, str]) -> None:
        """Block ``i`` is finished and its outputs are complete in ``self.other``: persist and swap."""
        body = {"results": {k: _result_to_dict(v) for k, v in results.items()}, "reports": reports}
        with atomic_path(self.dir / f"block-{i:04d}.pt") as tmp, open(tmp, "wb") as fh:
            torch.save(body, fh)
            fh.flush()
            os.fsync(fh.fileno())
        self.next_block, self.inputs, self.tails = i + 1, self.other, dict(tails)
        self._write_state()

    def load_block(self, i: int) -> tuple[dict[str, GPTQResult], list[dict]]:
        body = torch.load(self.dir / f"block-{i:04d}.pt", weights_only=True)
        return {k: _result_from_dict(v) for k, v in body["results"].items()}, body["reports"]

    def _remove_files(self) -> None:
        for p in own_files(self.dir):  # and the temporaries of atomic_path (".NAME.*") that a kill left
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def remove(self) -> None:
        """Delete every file this state wrote, its marker, its lock, and the folder when it is left empty."""
        if self.dir.is_dir():
            self._remove_files()
            with contextlib.suppress(FileNotFoundError):
                (self.dir / MARKER).unlink()
        self.release()
        with contextlib.suppress(OSError):
            self.dir.rmdir()

    def release(self) -> None:
        """Unlock the folder (the state stays, to resume from)."""
        if self.locked:
            locks.release(self.dir)
            self.locked = False
