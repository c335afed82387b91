"""What every export format shares: the stored form of one quantized linear, config and tokenizer files.

The stored quantization rounds the solver's fp32 scales to fp16 (every packed format keeps fp16 scales), and
the unpacked checkpoint's weights are computed from those same fp16 scales, so the unpacked and packed forms
of one quantization hold the same weights up to the final rounding of W to fp16.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from quantlm.errors import QuantlmError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")

FORMATS = ("unpacked", "gptq", "compressed-tensors")


@dataclass(frozen=True)
class StoredLinear:
    """One quantized linear as the formats store it: W[o, i] = scale[o, g] * (q[o, i] - zero[o, g]), g = i // gs."""

    q: torch.Tensor  # uint8 [out, in]
    scale: torch.Tensor  # fp16 [out, G]
    zero: torch.Tensor  # int32 [out, G], integer zero point in [0, 2**bits)
    bits: int
    group_size: int  # -1: one group spanning the whole input
    sym: bool

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self, dtype=torch.float16) -> torch.Tensor:
        return dequantize_groups(self.q, self.scale, self.zero, self.group_size).to(dtype)


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """fp32 weights from codes [out, in] and per-group scale/zero [out, G] with contiguous groups."""
    gs = q.shape[1] if group_size == -1 else group_size
    g = torch.arange(q.shape[1], device=q.device) // gs
    return (q.float() - zero.float()[:, g]) * scale.float()[:, g]


def stored_linear(name: str, result) -> StoredLinear:
    """The stored form of a solver result; only contiguous (static) groups can be stored."""
    out, in_features = result.q.shape
    gs = in_features if result.group_size == -1 else result.group_size
    expected = torch.arange(in_features, dtype=torch.int64) // gs
    if not torch.equal(result.g_idx.to(torch.int64).cpu(), expected):
        raise QuantlmError(f"{name}: act-order without static groups gives an arbitrary g_idx, which the export "
                           "formats do not store; quantize with static_groups: true (the default)")
    return StoredLinear(result.q.to(torch.uint8).cpu(), result.scale.to(torch.float16).cpu(),
                        result.zero.round().to(torch.int32).cpu(), result.bits, result.group_size, result.sym)


def dense_state_dict(model, skip: set[str], dtype=torch.float16) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` except the ``skip`` prefixes, in ``dtype`` (the tied LM head dropped)."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tensors = {}
    for key, t in model.state_dict().items():
        if any(key == s or key.startswith(s + ".") for s in skip):
            continue
        if tied and key == "lm_head.weight":
            continue  # transformers re-ties it to the embedding on load
        tensors[key] = t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous().clone()
    return tensors


def save_safetensors(tensors: dict[str, torch.Tensor], out: Path) -> Path:
    from safetensors.torch import save_file

    path = out / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def write_config(model, out: Path, quantization_config: dict | None = None, extra: dict | None = None) -> Path:
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = "float16"
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    cfg.update(extra or {})
    path = out / "config.json"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def copy_tokenizer(src: Path | None, out: Path) -> list[str]:
    copied = []
    if src is None:
        return copied
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copy(f, out / name)
            copied.append(name)
    return copied


def write_checkpoint(out: Path, model, linears: dict, meta: dict, tokenizer_dir: Path | None, *, fmt: str,
                     linear_tensors, quantization_config: dict | None = None) -> Path:
    """The shared writer of every format: dense tensors, each quantized linear as ``linear_tensors(name, lin)``
    (plus its fp16 bias), config.json, tokenizer and quantlm.json (last: it accounts the written files)."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = dense_state_dict(model, skip=set(linears))
    for name, lin in linears.items():
        tensors.update(linear_tensors(name, lin))
        bias = model.get_submodule(name).bias
        if bias is not None:
            tensors[name + ".bias"] = bias.detach().half().cpu().clone()
    save_safetensors(tensors, out)
    write_config(model, out, quantization_config)
    copy_tokenizer(tokenizer_dir, out)
    write_meta(out, {**meta, "format": fmt})
    return out


def write_meta(out: Path, meta: dict) -> Path:
    """quantlm.json: the recipe, per-module losses and the bit accounting of this checkpoint (call it last,
    once the weights and config.json are written: the accounting reads their headers)."""
    path = out / "quantlm.json"
    path.write_text(json.dumps({**meta, "accounting": accounting_summary(out, meta)}, indent=2, default=str)
                    + "\n", encoding="utf-8")
    return path


def accounting_summary(out: Path, meta: dict) -> dict:
    """Total bits of the checkpoint as stored, and of the same QuantLM packed (compressed-tensors layout)."""
    from quantlm import accounting as acc

    recipe = meta.get("recipe") or {}
    stored = acc.budget(out)
    summary = {"as_stored": {c: stored.total_bits(c) for c in acc.CONVENTIONS}}
    if recipe.get("bits"):
        packed = acc.budget(out / "config.json", bits=int(recipe["bits"]), group_size=int(recipe.get("group_size", -1)))
        summary["packed"] = {"layout": packed.layout, **{c: packed.total_bits(c) for c in acc.CONVENTIONS}}
    return summary


def check_format_bits(fmt: str, bits: int) -> None:
    """A clear error for a format that cannot hold ``bits`` (before any compute)."""
    if fmt not in FORMATS:
        raise QuantlmError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt == "gptq" and bits not in (2, 3, 4, 8):
        raise QuantlmError(f"the gptq format holds 2, 3, 4 or 8 bits, not {bits}; "
                           "use --format compressed-tensors or unpacked for that bitwidth")
