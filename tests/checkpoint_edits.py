"""Test helper: copies of a checkpoint directory with tensors or config.json edited (bad-input cases)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file, save_file


def copy_model(src: Path, dst: Path, edit: Callable[[dict], None] | None = None, *,
               config_edit: Callable[[dict], None] | None = None) -> Path:
    """A copy of ``src`` as ``dst``, its tensors (a dict, edited in place by ``edit``) and/or config rewritten."""
    shutil.copytree(src, dst)
    if edit is not None:
        tensors = load_file(dst / "model.safetensors")
        edit(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    if config_edit is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config_edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst
