"""Hugging Face checkpoint directories: read configs, check the architecture, load models. Local paths only."""

from __future__ import annotations

import json
import os
from pathlib import Path

from quantlm.errors import QuantlmError
from quantlm.models.blocks import LLAMA, LLAMA_LIKE_ARCHITECTURES, LLAMA_LIKE_MODEL_TYPES, BlockMap


def read_config(model_dir: str | os.PathLike) -> dict:
    """config.json of a checkpoint directory (or the path of a config.json itself) as a dict."""
    path = Path(model_dir)
    cfg = path / "config.json" if path.is_dir() else path
    if not cfg.is_file():
        raise QuantlmError(f"{path}: no config.json found; pass a Hugging Face checkpoint directory or a preset name")
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise QuantlmError(f"{cfg}: config.json is not valid JSON ({e.msg} at line {e.lineno})") from None


def block_map_for(config: dict, where: str = "model") -> BlockMap:
    """The block map of a checkpoint's architecture; a clear error for architectures quantlm does not map."""
    model_type = config.get("model_type")
    archs = set(config.get("architectures") or [])
    if model_type in LLAMA_LIKE_MODEL_TYPES or archs & LLAMA_LIKE_ARCHITECTURES:
        return LLAMA
    raise QuantlmError(
        f"{where}: architecture {sorted(archs) or model_type!r} is not LLaMA-like; quantlm handles "
        "LlamaForCausalLM checkpoints (model_type 'llama') - convert the model or add a BlockMap for it")


def is_trilm(config: dict) -> bool:
    """An unpacked TriLM is a plain LLaMA checkpoint whose config records its pretraining MP degree."""
    return config.get("pretraining_model_parallel") is not None or config.get("quantlm_family") == "trilm"


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
