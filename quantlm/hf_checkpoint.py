"""Hugging Face checkpoint directories: read configs and safetensors headers (no tensor data), check the
architecture, load models. Local paths only."""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from quantlm.architectures import BlockMap, architecture_for
from quantlm.dtypes import DTYPE_BITS
from quantlm.errors import QuantlmError


def read_config(model_dir: str | os.PathLike) -> dict:
    """config.json of a checkpoint directory (or the path of a config.json itself) as a dict."""
    path = Path(model_dir)
    cfg = path / "config.json" if path.is_dir() else path
    if cfg.suffix == ".gguf":
        raise QuantlmError(f"{path} is a GGUF file, not a Hugging Face checkpoint; pass the checkpoint directory "
                           "(config.json and safetensors weights) it was exported from")
    if not cfg.is_file():
        raise QuantlmError(f"{path}: no config.json found; pass a Hugging Face checkpoint directory or a preset name")
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise QuantlmError(f"{cfg}: config.json is not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise QuantlmError(f"{cfg}: config.json is not valid JSON (binary, not UTF-8 text); pass a Hugging Face "
                           "checkpoint directory or its config.json") from None


def block_map_for(config: dict, where: str = "model") -> BlockMap:
    """The block map of a checkpoint's architecture; one line naming the supported ones otherwise."""
    return architecture_for(config, where).block_map


def is_trilm(config: dict) -> bool:
    """An unpacked TriLM is a plain LLaMA checkpoint whose config records its pretraining MP degree."""
    return config.get("pretraining_model_parallel") is not None or config.get("quantlm_family") == "trilm"


@dataclass(frozen=True)
class HeaderEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


_MAX_ST_HEADER = 100 * 2**20  # what the safetensors library accepts
_ST_FIX = "re-download or re-export it"


def _st_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_safetensors_header(path: str | os.PathLike) -> tuple[list[HeaderEntry], int]:
    """Tensor entries and header size of one safetensors file, reading only its header bytes.

    Nothing in the header is trusted: its length must fit the file before it is read, every entry needs a known
    dtype, a shape of non-negative integers and the byte span that shape takes, and the spans must tile the data
    section exactly (no negative offset, overlap, gap, or byte past the end), as the safetensors library requires
    when it loads the file. Anything else is one ``QuantlmError`` naming the file and the entry.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise QuantlmError(f"{path}: file is too short to be safetensors; {_ST_FIX}")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise QuantlmError(f"{path}: corrupt safetensors header: it declares {n:,} header bytes but the file "
                                   f"has only {size:,} bytes; the file is truncated or not safetensors: {_ST_FIX}")
            if n > _MAX_ST_HEADER:
                raise QuantlmError(f"{path}: corrupt safetensors header: it declares {n:,} header bytes, more than "
                                   f"safetensors allows ({_MAX_ST_HEADER:,}); {_ST_FIX}")
            if n <= 1:
                raise QuantlmError(f"{path}: corrupt safetensors header (length {n}); {_ST_FIX}")
            raw = f.read(n)
    except FileNotFoundError:
        raise QuantlmError(f"{path}: file not found; check the checkpoint directory") from None
    except IsADirectoryError:
        raise QuantlmError(f"{path} is a directory, not a safetensors file; check the checkpoint directory") from None
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise QuantlmError(f"{path}: safetensors header is not valid JSON; the file is corrupt: {_ST_FIX}") from None
    if not isinstance(meta, dict):
        raise QuantlmError(f"{path}: corrupt safetensors header (a JSON {type(meta).__name__}, not an object); "
                           f"{_ST_FIX}")
    data_bytes = size - 8 - n
    entries, spans = [], []
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if not (isinstance(dtype, str) and isinstance(shape, list) and isinstance(offsets, list)
                    and len(offsets) == 2 and all(map(_st_int, [*shape, *offsets]))):
                raise TypeError
        except (KeyError, TypeError):
            raise QuantlmError(f"{path}: corrupt safetensors header entry {name!r} (needs dtype, a shape of "
                               f"integers and two integer data_offsets); {_ST_FIX}") from None
        if dtype not in DTYPE_BITS:
            raise QuantlmError(f"{path}: tensor {name} has unknown dtype {dtype!r} (quantlm reads "
                               f"{', '.join(DTYPE_BITS)}); the file is corrupt or from a newer safetensors")
        if any(d < 0 for d in shape):
            raise QuantlmError(f"{path}: tensor {name} has a negative dimension in its shape {shape}; the file is "
                               f"corrupt: {_ST_FIX}")
        start, stop = offsets
        if start < 0 or stop < start:
            raise QuantlmError(f"{path}: tensor {name} has data_offsets [{start}, {stop}] (negative or reversed); "
                               f"the file is corrupt: {_ST_FIX}")
        nbytes = math.prod(shape) * DTYPE_BITS[dtype] // 8
        if stop - start != nbytes:
            raise QuantlmError(f"{path}: header of {name} says {stop - start} bytes for shape {list(shape)} {dtype} "
                               f"({nbytes} expected); the file is corrupt")
        spans.append((start, stop, name))
        entries.append(HeaderEntry(name, dtype, tuple(shape), nbytes))
    end, prev = 0, None
    for start, stop, name in sorted(spans):
        if stop > data_bytes:
            raise QuantlmError(f"{path}: file is truncated ({size:,} bytes) or its header is corrupt: tensor {name} "
                               f"spans bytes {start:,}..{stop:,} of a data section of {data_bytes:,} bytes; "
                               f"{_ST_FIX}")
        if start < end:
            raise QuantlmError(f"{path}: tensors {prev} and {name} overlap (bytes {start:,}..{min(end, stop):,} of "
                               f"the data section); the file is corrupt: {_ST_FIX}")
        if start > end:
            raise QuantlmError(f"{path}: {start - end:,} bytes before tensor {name} belong to no tensor; the file is "
                               f"corrupt: {_ST_FIX}")
        end, prev = stop, name
    if end < data_bytes:
        raise QuantlmError(f"{path}: {data_bytes - end:,} bytes after the last tensor belong to no tensor; the file "
                           f"is corrupt: {_ST_FIX}")
    return entries, 8 + n


def read_weight_map(model_dir: Path) -> dict[str, str] | None:
    """Tensor name -> shard file of a sharded checkpoint's ``model.safetensors.index.json``; None if unsharded."""
    index = model_dir / "model.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise QuantlmError(f"{index}: not a valid safetensors index (needs a weight_map object); re-download "
                           "it or delete it if the checkpoint is a single model.safetensors") from None
    return weight_map


def safetensors_files(model_dir: Path, weight_map: dict[str, str] | None = None) -> list[Path]:
    """The safetensors files of a checkpoint: the sharded index's files (``weight_map``, if the caller already
    read it with :func:`read_weight_map`), or every *.safetensors."""
    weight_map = weight_map if weight_map is not None else read_weight_map(model_dir)
    if weight_map is not None:
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise QuantlmError(f"{model_dir}: no *.safetensors files; quantlm measures safetensors checkpoints")
    return files


def load_causal_lm(model_dir: str | os.PathLike, dtype=None, device: str = "cpu"):
    """Load a local causal LM with transformers (never from a hub); packed formats load through quantlm."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(model_dir)
    config = read_config(path)
    block_map_for(config, str(path))
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise QuantlmError(f"{path}: no weights (*.safetensors) found next to config.json")
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype or torch.float32, local_files_only=True, low_cpu_mem_usage=True
    )
    return model.to(device).eval()


def load_tokenizer(model_dir: str | os.PathLike):
    from transformers import AutoTokenizer

    path = Path(model_dir)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise QuantlmError(f"{path}: no tokenizer found ({str(e).splitlines()[0]}); "
                           "copy the model's tokenizer files into the directory") from None
