"""Reading a GGUF file's header (metadata and tensor table) without its tensor data, checked against the file.

The header is parsed here, not by gguf-py's ``GGUFReader``: every count and length the header declares (tensor
count, key/value count, string and array lengths, dimensions) is checked against the bytes the file has left
before anything is allocated for it, every type must be known, and every tensor must lie inside the file without
overlapping another. A file that breaks any of these is one ``QuantlmError`` line naming the file and the problem.
The file is memory-mapped; no tensor byte is read.
"""

from __future__ import annotations

import itertools
import mmap
import os
import struct
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quantlm.errors import QuantlmError

_FIXED_HEADER = 24  # magic, version, tensor count, key/value count
_VERSIONS = (2, 3)  # what gguf-py and llama.cpp read (version 1 had 32-bit counts)
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ARRAY_DEPTH = 8
_MIN_TENSOR_INFO = 8 + 4 + 4 + 8  # empty name length, n_dims, type, offset
_MIN_KV = 8 + 4 + 1  # empty key length, value type, a one-byte value

# GGUF value types: id -> struct format (8 = string, 9 = array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_FIX = "re-export or re-download it"


class _Corrupt(Exception):
    """A problem with the header; turned into one QuantlmError line naming the file."""


def _bytes(n: int) -> str:
    return f"{n:,} bytes"


class _Cursor:
    """Bounds-checked reads over the mapped file: nothing is read or allocated past its end."""

    def __init__(self, buf, order: str):
        self.buf, self.order, self.pos, self.size = buf, order, 0, len(buf)

    @property
    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> int:
        if n > self.left:
            raise _Corrupt(f"{what} ({_bytes(n)} at byte {self.pos:,}) runs past the end of the file "
                           f"({_bytes(self.size)}); the file is truncated or corrupt")
        at = self.pos
        self.pos += n
        return at

    def scalar(self, fmt: str, what: str):
        return struct.unpack_from(self.order + fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("Q", f"length of {what}")
        if n > self.left:
            raise _Corrupt(f"{what} declares a length of {_bytes(n)} but only {_bytes(self.left)} are left in the "
                           "file; the file is truncated or corrupt")
        at = self.take(n, what)
        return bytes(self.buf[at: at + n]).decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise _Corrupt(f"{what} has unknown value type {vtype} (GGUF knows 0..12)")
        if depth >= _MAX_ARRAY_DEPTH:
            raise _Corrupt(f"{what} nests arrays more than {_MAX_ARRAY_DEPTH} deep")
        itype = self.scalar("I", f"item type of {what}")
        n = self.scalar("Q", f"length of {what}")
        if itype in _SCALARS:
            item = struct.calcsize(_SCALARS[itype])
        elif itype in (_STRING, _ARRAY):
            item = 8 if itype == _STRING else 12  # the smallest string / array: its length (and item type)
        else:
            raise _Corrupt(f"{what} is an array of unknown value type {itype} (GGUF knows 0..12)")
        if n * item > self.left:
            raise _Corrupt(f"{what} declares {n:,} items but only {_bytes(self.left)} are left in the file; "
                           "the file is truncated or corrupt")
        if itype in _SCALARS:
            fmt = _SCALARS[itype]
            return list(struct.unpack_from(f"{self.order}{n}{fmt}", self.buf, self.take(n * item, what)))
        return [self.value(itype, f"item {i} of {what}", depth + 1) for i in range(n)]


def read_gguf_header(path: str | os.PathLike) -> dict:
    """The header of a GGUF file (metadata and tensor table), parsed without reading tensor data.

    Returns a dict:
      path, version, alignment (general.alignment or 32), file_bytes (size on disk);
      metadata: {key: value} (arrays as lists), metadata_bytes (the key/value section),
      tensor_info_bytes (the tensor table), header_bytes (offset of the data section: magic, counts,
      metadata, tensor table and the padding to the alignment);
      tensors: [{name, type (ggml type name), type_id, shape (HF order, [out, in]), ne (ggml order),
      n_elements, nbytes (from shape and type: blocks * bytes per block), offset (absolute byte offset of
      its data)}], in file order;
      payload_bytes: sum of the tensors' nbytes (so 8 * payload_bytes is the weights' bits);
      padding_bytes: file_bytes - header_bytes - payload_bytes (alignment padding between tensors);
      consistent: every tensor in file order at an aligned offset, and the file ends at the last tensor's
      aligned end.
    A file that is not GGUF, whose header declares more than the file holds, has a type quantlm does not know,
    or a tensor outside the file or overlapping another, is one ``QuantlmError`` naming it.
    """
    path = Path(path)
    try:
        file_bytes = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(4)
            if magic != b"GGUF":
                raise QuantlmError(f"{path}: not a GGUF file (bad magic); pass a .gguf file written by llama.cpp, "
                                   "gguf-py or quantlm export --format gguf")
            if file_bytes < _FIXED_HEADER:
                raise QuantlmError(f"{path}: the file has only {_bytes(file_bytes)}, less than a GGUF header "
                                   f"({_FIXED_HEADER}); the file is truncated: {_FIX}")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(path, buf, file_bytes)
    except OSError as e:
        raise QuantlmError(f"{path}: cannot read the GGUF file ({e.strerror}); check the path") from None
    except _Corrupt as e:
        raise QuantlmError(f"{path}: {e}; {_FIX}") from None


def _parse(path: Path, buf, file_bytes: int) -> dict:
    (version,) = struct.unpack_from("<I", buf, 4)
    order = "<"
    if version & 0xFFFF == 0 and version:  # written on a machine of the other byte order
        order, (version,) = ">", struct.unpack_from(">I", buf, 4)
    if version not in _VERSIONS:
        raise QuantlmError(f"{path}: GGUF version {version} is not supported (quantlm reads versions "
                           f"{' and '.join(map(str, _VERSIONS))}); re-export the file with a current llama.cpp")
    cur = _Cursor(buf, order)
    cur.pos = 8
    n_tensors, n_kv = cur.scalar("Q", "tensor count"), cur.scalar("Q", "key/value count")
    if n_tensors * _MIN_TENSOR_INFO > cur.left:
        raise _Corrupt(f"header declares {n_tensors:,} tensors but the file has only {_bytes(file_bytes)}; the file "
                       "is truncated, corrupt or not a GGUF file")
    if n_kv * _MIN_KV > cur.left:
        raise _Corrupt(f"header declares {n_kv:,} metadata keys but the file has only {_bytes(file_bytes)}; the file "
                       "is truncated, corrupt or not a GGUF file")

    metadata: dict = {}
    alignment = _DEFAULT_ALIGNMENT
    for i in range(n_kv):
        key = cur.string(f"metadata key {i}")
        vtype = cur.scalar("I", f"value type of metadata key {key!r}")
        value = cur.value(vtype, f"metadata value {key!r}")
        if key in metadata:
            raise _Corrupt(f"metadata key {key!r} appears twice")
        metadata[key] = value
        if key == "general.alignment":
            if vtype != _UINT32 or value <= 0 or value & (value - 1):
                raise _Corrupt(f"general.alignment is {value!r}; it must be a power of two stored as uint32")
            alignment = value
    kv_end = cur.pos

    infos = []
    names = set()
    for i in range(n_tensors):
        name = cur.string(f"name of tensor {i}")
        what = f"tensor {name}"
        n_dims = cur.scalar("I", f"dimension count of {what}")
        if n_dims > _MAX_DIMS:
            raise _Corrupt(f"{what} declares {n_dims:,} dimensions (GGUF allows at most {_MAX_DIMS}); the file is "
                           "corrupt")
        ne = list(struct.unpack_from(f"{order}{n_dims}Q", buf, cur.take(8 * n_dims, f"shape of {what}")))
        type_id = cur.scalar("I", f"type of {what}")
        offset = cur.scalar("Q", f"data offset of {what}")
        try:
            qtype = GGMLQuantizationType(type_id)
            block, size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise _Corrupt(f"{what} has unknown ggml type {type_id}; the file is corrupt or newer than this "
                           "gguf-py (upgrade the gguf package)") from None
        if name in names:
            raise _Corrupt(f"{what} appears twice in the tensor table")
        names.add(name)
        if ne and ne[0] % block:
            raise _Corrupt(f"{what} has rows of {ne[0]:,} elements, not a multiple of {qtype.name}'s block of "
                           f"{block}; the file is corrupt")
        n = 1
        for d in ne:
            n *= d
        infos.append((name, qtype, ne, n, n // block * size, offset))
    ti_end = cur.pos
    data_start = -(-ti_end // alignment) * alignment

    tensors, payload, end, consistent = [], 0, data_start, True
    for name, qtype, ne, n, nbytes, offset in infos:
        start = data_start + offset
        if start + nbytes > file_bytes:
            raise _Corrupt(f"tensor {name} ({_bytes(nbytes)} at byte {start:,}) lies past the end of the file "
                           f"({_bytes(file_bytes)}); the file is truncated or corrupt")
        consistent &= start >= end and offset % alignment == 0
        end = -(-(start + nbytes) // alignment) * alignment
        payload += nbytes
        tensors.append({"name": name, "type": qtype.name, "type_id": int(qtype), "shape": list(reversed(ne)),
                        "ne": ne, "n_elements": n, "nbytes": nbytes, "offset": start})
    spans = sorted((t["offset"], t["offset"] + t["nbytes"], t["name"]) for t in tensors if t["nbytes"])
    for (_, a_end, a), (b_start, _, b) in itertools.pairwise(spans):
        if b_start < a_end:
            raise _Corrupt(f"tensors {a} and {b} overlap (bytes {b_start:,}..{a_end:,}); the file is corrupt")
    consistent &= end == file_bytes or (not tensors and data_start >= file_bytes)
    return {"path": str(path), "version": version, "alignment": alignment, "file_bytes": file_bytes,
            "metadata": metadata, "metadata_bytes": kv_end - _FIXED_HEADER, "tensor_info_bytes": ti_end - kv_end,
            "header_bytes": data_start, "tensors": tensors, "payload_bytes": payload,
            "padding_bytes": file_bytes - data_start - payload, "consistent": bool(consistent)}
