"""Packed TriLM checkpoints: ternary codes at 2 bits (4 per byte) or 1.6 bits (5 trits per byte, base 3).

A packed checkpoint holds, for every block linear weight ``W = gamma_s * W_t`` (one fp16 scale per
model-parallel shard s), ``<name>.tcodes`` (uint8, packed codes) and ``<name>.tscales`` (fp16, (MP,)), plus
``ternary.json`` with each weight's shape and shard kind; every other tensor is stored as is. Unpacking gives
back the unpacked TriLM bit for bit.

Code mapping: trit t = W_t + 1 in {0, 1, 2}. 2-bit: byte = t0 | t1 << 2 | t2 << 4 | t3 << 6.
Base 3: byte = t0 + 3 t1 + 9 t2 + 27 t3 + 81 t4 (at most 242). Both pad the flat codes with t = 1 (zero).
The pack/unpack functions import only torch.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from quantlm.errors import QuantlmError

SCHEMES = {"2bit": 4, "base3": 5}  # trits per byte
_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)


def pack_codes(codes: torch.Tensor, scheme: str = "2bit") -> torch.Tensor:
    """Flat uint8 bytes holding the ternary ``codes`` (values -1, 0, 1) in the given scheme."""
    if scheme not in SCHEMES:
        raise QuantlmError(f"unknown ternary scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    per = SCHEMES[scheme]
    t = codes.reshape(-1).to(torch.int32) + 1
    if t.numel() and (t.min() < 0 or t.max() > 2):
        raise QuantlmError("ternary codes must be -1, 0 or 1")
    pad = (-t.numel()) % per
    t = torch.cat([t, torch.ones(pad, dtype=torch.int32)]).view(-1, per)
    if scheme == "2bit":
        packed = t[:, 0] | (t[:, 1] << 2) | (t[:, 2] << 4) | (t[:, 3] << 6)
    else:
        packed = (t * _POW3).sum(dim=1)
    return packed.to(torch.uint8)


def unpack_codes(packed: torch.Tensor, numel: int, scheme: str = "2bit") -> torch.Tensor:
    """int8 codes (-1, 0, 1), flat, of length ``numel``."""
    b = packed.to(torch.int32)[:, None]
    if scheme == "2bit":
        t = (b >> torch.tensor([0, 2, 4, 6], dtype=torch.int32)) & 3
    elif scheme == "base3":
        t = (b // _POW3) % 3
    else:
        raise QuantlmError(f"unknown ternary scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    return (t.reshape(-1)[:numel] - 1).to(torch.int8)


def split_unpacked(weight: torch.Tensor, mp: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and per-shard scales of an unpacked ternary weight; an error if it is not gamma_s * {-1, 0, 1}."""
    from quantlm.models.trilm import _check_shards

    dim = _check_shards(weight, mp, kind)
    codes = torch.sign(weight).to(torch.int8)
    scales = []
    for s, chunk in enumerate(weight.chunk(mp, dim=dim)):
        mags = chunk.abs()[chunk != 0].unique()
        if mags.numel() > 1:
            raise QuantlmError(f"shard {s} of a weight has {mags.numel()} distinct magnitudes; it is not an "
                               "unpacked TriLM weight (or its pretraining_model_parallel is wrong)")
        scales.append(mags[0] if mags.numel() else torch.zeros((), dtype=weight.dtype))
    return codes, torch.stack(scales)


def pack_checkpoint(unpacked_dir: str | os.PathLike, out_dir: str | os.PathLike, scheme: str = "2bit",
                    overwrite: bool = False) -> Path:
    """Pack an unpacked TriLM checkpoint folder (config with ``pretraining_model_parallel``) into ``out_dir``."""
    from safetensors.torch import load_file, save_file

    from quantlm.atomic import output_dir, write_json
    from quantlm.checkpoint import block_map_for, read_config

    src = Path(unpacked_dir)
    config = read_config(src)
    mp = config.get("pretraining_model_parallel")
    if not mp:
        raise QuantlmError(f"{src}: config.json has no pretraining_model_parallel; only TriLM checkpoints pack "
                           "to ternary")
    block_map = block_map_for(config, str(src))
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise QuantlmError(f"{src}: no *.safetensors weights")
    tensors, meta = {}, {}
    for f in files:
        for name, w in load_file(f).items():
            linear = block_map.block_linear_of(name)
            if linear is None or w.dim() != 2:
                tensors[name] = w
                continue
            kind = block_map.shard_kind(linear)
            codes, scales = split_unpacked(w, mp, kind)
            tensors[name[: -len(".weight")] + ".tcodes"] = pack_codes(codes, scheme)
            tensors[name[: -len(".weight")] + ".tscales"] = scales.to(w.dtype)
            meta[name] = {"shape": list(w.shape), "kind": kind, "dtype": str(w.dtype).removeprefix("torch.")}
    with output_dir(out_dir, overwrite=overwrite) as tmp:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        for other in src.iterdir():
            if other.is_file() and other.suffix != ".safetensors" and other.name != "model.safetensors.index.json":
                shutil.copy(other, tmp / other.name)
        write_json(tmp / "ternary.json", {"scheme": scheme, "model_parallel": mp, "weights": meta})
    return Path(out_dir)


def unpack_state_dict(packed_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The unpacked TriLM state dict of a packed checkpoint folder."""
    from safetensors.torch import load_file

    from quantlm.models.trilm import dequantize

    src = Path(packed_dir)
    info_path = src / "ternary.json"
    if not info_path.is_file():
        raise QuantlmError(f"{src}: no ternary.json; not a packed TriLM checkpoint")
    info = json.loads(info_path.read_text())
    stored = load_file(src / "model.safetensors")
    out = {k: v for k, v in stored.items() if not k.endswith((".tcodes", ".tscales"))}
    for name, m in info["weights"].items():
        base = name[: -len(".weight")]
        shape = tuple(m["shape"])
        codes = unpack_codes(stored[base + ".tcodes"], shape[0] * shape[1], info["scheme"]).view(shape)
        scales = stored[base + ".tscales"]
        out[name] = dequantize(codes, scales, m["kind"], scales.dtype)  # exact: scale * {-1, 0, 1}
    return out


def unpack_checkpoint(packed_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the unpacked TriLM (plain LLaMA checkpoint) of a packed checkpoint folder."""
    from safetensors.torch import save_file

    from quantlm.atomic import output_dir

    src = Path(packed_dir)
    state = unpack_state_dict(src)
    with output_dir(out_dir, overwrite=overwrite) as tmp:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        for other in src.iterdir():
            if other.is_file() and other.suffix != ".safetensors" and other.name != "ternary.json":
                shutil.copy(other, tmp / other.name)
    return Path(out_dir)
