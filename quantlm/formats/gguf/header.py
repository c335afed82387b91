"""Reading a GGUF file's header (metadata and tensor table) without its tensor data, through gguf-py's reader (which
maps the file; no tensor byte is read), checked against the file: every tensor inside it, in order, of a known
type."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

from quantlm.errors import QuantlmError

_FIXED_HEADER = 24  # magic, version, tensor count, key/value count


def _nbytes(field) -> int:
    return int(sum(p.nbytes for p in field.parts))


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
      consistent: every tensor lies inside the file, in order, without overlap, and the file ends at the
      last tensor's aligned end.
    A file that is not GGUF, or whose header runs past its end, is one ``QuantlmError`` naming it.
    """
    path = Path(path)
    try:
        file_bytes = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise QuantlmError(f"{path}: cannot read the GGUF file ({e.strerror}); check the path") from None
    if magic != b"GGUF":
        raise QuantlmError(f"{path}: not a GGUF file (bad magic)")
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, MemoryError) as e:
        raise QuantlmError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e}); re-export or "
                           "re-download the file") from None
    fields = list(reader.fields.values())
    version = int(reader.fields["GGUF.version"].contents())
    if version < 2:
        raise QuantlmError(f"{path}: GGUF version {version} is too old (need 2 or later)")
    kv = [f for f in fields if not f.name.startswith("GGUF.")]
    metadata = {f.name: f.contents() for f in kv}
    kv_bytes = sum(_nbytes(f) for f in kv)
    ti_bytes = sum(_nbytes(t.field) for t in reader.tensors)
    data_start = int(reader.data_offset)
    alignment = int(reader.alignment)
    tensors, payload, end, consistent = [], 0, data_start, True
    for t in reader.tensors:
        try:
            qtype = GGMLQuantizationType(int(t.tensor_type))
            block, size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise QuantlmError(f"{path}: tensor {t.name} has unknown ggml type {int(t.tensor_type)}") from None
        ne = [int(d) for d in t.shape]
        n = int(np.prod(ne)) if ne else 1
        nbytes = n // block * size
        start = int(t.data_offset)
        consistent &= start >= end and start + nbytes <= file_bytes and (start - data_start) % alignment == 0
        end = -(-(start + nbytes) // alignment) * alignment
        payload += nbytes
        tensors.append({"name": t.name, "type": qtype.name, "type_id": int(qtype), "shape": list(reversed(ne)),
                        "ne": ne, "n_elements": n, "nbytes": nbytes, "offset": start})
    consistent &= end == file_bytes or (not tensors and data_start >= file_bytes)
    if data_start < _FIXED_HEADER + kv_bytes + ti_bytes:
        consistent = False
    return {"path": str(path), "version": version, "alignment": alignment, "file_bytes": file_bytes,
            "metadata": metadata, "metadata_bytes": kv_bytes, "tensor_info_bytes": ti_bytes,
            "header_bytes": data_start, "tensors": tensors, "payload_bytes": payload,
            "padding_bytes": file_bytes - data_start - payload, "consistent": bool(consistent)}
