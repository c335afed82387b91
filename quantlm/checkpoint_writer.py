"""The one checkpoint writer of every format: dense tensors, each block linear encoded by its format (checked
against the format's declaration), config.json, tokenizer files and ``quantlm.json`` (last, with the accounting of
what was written). It sits above the formats and the accounting: it uses both."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from quantlm import accounting as acc
from quantlm.architectures import BlockMap
from quantlm.atomic import follow_umask
from quantlm.dtypes import ST_DTYPES, ST_TO_FLOAT
from quantlm.formats.registry import Layout, check_declared, checkpoint_spec, get_format
from quantlm.metadata import ModelMeta, read_meta, write_meta

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


def dense_state_dict(model, skip: set[str]) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` on the CPU except the weights of the ``skip`` linears (their format writes them;
    their biases stay dense) and a tied LM head."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    skipped = {s + ".weight" for s in skip}
    tensors = {}
    for key, t in model.state_dict().items():
        if key in skipped:
            continue
        if tied and key == "lm_head.weight":
            continue  # transformers re-ties it to the embedding on load
        tensors[key] = t.detach().cpu()
    return tensors


def copy_tokenizer(src: Path | None, out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES if src is not None else ():
        f = Path(src) / name
        if f.is_file():
            shutil.copyfile(f, out / name)  # not copy(): the file gets the umask's mode, not the source's
            copied.append(name)
    return copied


def write_config(config: dict, out: Path, layout: Layout, recipe: dict) -> Path:
    cfg = dict(config)
    for key in ("quantization_config", "torch_dtype", "quantlm_quantization"):
        cfg.pop(key, None)
    cfg["dtype"] = ST_TO_FLOAT.get(layout.float_dtype, "float16")
    qc = get_format(layout.format).quantization_config(layout, recipe)
    if qc is not None:
        cfg["quantization_config"] = qc
    if layout.family == "quantlm" and layout.format == "unpacked":
        # dequantized weights look like a FloatLM's: the config keeps what they were quantized to
        cfg["quantlm_quantization"] = {"bits": layout.bits, "group_size": layout.group_size, "sym": layout.sym}
    if layout.family == "trilm":
        cfg["pretraining_model_parallel"] = layout.mp
    path = out / "config.json"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def write_checkpoint(out: Path, config: dict, dense: dict[str, torch.Tensor], linears: dict, layout: Layout,
                     block_map: BlockMap, meta: ModelMeta, tokenizer_dir: Path | None = None) -> Path:
    """Write a checkpoint directory: ``dense`` tensors (floating ones cast to the layout's float dtype) and every
    block linear in ``linears`` (name -> QuantizedLinear, TernaryWeight or dense weight) in ``layout``. A format
    whose container is not safetensors (gguf) writes the directory itself."""
    from safetensors.torch import save_file

    fmt = get_format(layout.format)
    if fmt.container != "safetensors":
        written = fmt.write(out, config, dense, linears, layout, block_map, meta, tokenizer_dir)
        accounting = container_accounting(out, config, layout, written["payload_bytes"])
        write_meta(out, dataclasses.replace(meta, format=layout.format, info={**meta.info, **written["info"]},
                                            accounting=accounting))
        follow_umask(out)
        return out
    float_dtype = ST_DTYPES[layout.float_dtype]
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (t.to(float_dtype) if t.is_floating_point() else t).contiguous() for k, t in dense.items()}
    for name, value in linears.items():
        encoded = fmt.encode(name, value, layout)
        out_f, in_f = value.shape
        check_declared(name, encoded, fmt.linear_tensors(out_f, in_f, layout, block_map.shard_kind(name)))
        tensors.update(encoded)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    recipe = meta.settings.get("gptq", meta.settings) if isinstance(meta.settings, dict) else {}
    write_config(config, out, layout, recipe)
    copy_tokenizer(tokenizer_dir, out)
    write_meta(out, dataclasses.replace(meta, format=layout.format, accounting=accounting_summary(out, layout)))
    follow_umask(out)  # save_file writes through a 0600 temporary file
    return out


def accounting_summary(out: Path, layout: Layout) -> dict:
    """Total bits of the checkpoint as stored, and as deployed (QuantLM: compressed-tensors, TriLM: ternary-1.6)."""
    stored = acc.budget(out)
    summary = {"as_stored": {c: stored.total_bits(c) for c in acc.CONVENTIONS}}
    packed = acc.deployed_budget(out / "config.json", layout)
    summary["packed"] = {"layout": packed.layout, **{c: packed.total_bits(c) for c in acc.CONVENTIONS}}
    return summary


def container_accounting(out: Path, config: dict, layout: Layout, payload_bytes: int) -> dict:
    """Total bits of a file a format wrote itself (gguf), after checking that its payload is the size the
    accounting predicts from the config and layout, and the size the accounting measures in the file."""
    stored = acc.budget(out)
    predicted = acc.budget_from_spec(checkpoint_spec(config, out.name), layout)
    if not stored.total_bits("exact") == predicted.total_bits("exact") == 8 * payload_bytes:
        raise AssertionError(f"{out}: {payload_bytes} payload bytes, but the {layout.format} format declares "
                             f"{predicted.total_bits('exact') / 8:.0f} for this config and layout")
    return {"as_stored": {c: stored.total_bits(c) for c in acc.CONVENTIONS}, "layout": layout.describe()}


def written_changes(out: Path) -> list[dict]:
    """The tensors whose stored weights differ from the values given to the writer (opt-ins such as re-quantized
    K-quant scales, merged shard scales, or round-to-nearest), as the written ``quantlm.json`` records them."""
    meta = read_meta(out)
    return list(meta.info.get("changes", [])) if meta is not None else []
