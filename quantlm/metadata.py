"""``quantlm.json``: what a checkpoint quantlm wrote says about itself. One versioned schema, read and written here.

quantize, train and export all write it (last, once weights and config.json are in place); eval, size and the
suite read it to tell what a model is (family, bits, group size, seed, source), so two exports never collide
and every command names a model the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from quantlm.atomic import write_json
from quantlm.errors import QuantlmError

FILE = "quantlm.json"
SCHEMA = "quantlm.model/1"
PRODUCERS = ("quantize", "train", "export")


@dataclass(frozen=True)
class ModelMeta:
    """The contents of ``quantlm.json``."""

    producer: str  # quantize | train | export
    family: str  # floatlm | quantlm | trilm
    format: str  # the storage format of this directory (unpacked, gptq, ...)
    model: str = ""  # label: preset or run name
    preset: str | None = None
    source_model: str | None = None  # the checkpoint this one was made from
    bits: int | None = None  # QuantLM code width
    group_size: int | None = None
    sym: bool | None = None
    seed: int | None = None  # calibration seed (QuantLM)
    method: str | None = None  # the quantizer's name: gptq | rtn | a registered one
    settings: dict = field(default_factory=dict)  # the recipe that produced it, as a mapping
    calibration: dict = field(default_factory=dict)
    modules: list = field(default_factory=list)  # per-module losses and times (quantize)
    info: dict = field(default_factory=dict)  # producer-specific figures (training steps, tokens, ...)
    versions: dict = field(default_factory=dict)
    accounting: dict = field(default_factory=dict)  # total bits as stored and as deployed (packed)
    schema: str = SCHEMA

    def __post_init__(self):
        if self.producer not in PRODUCERS:
            raise QuantlmError(f"{FILE}: unknown producer {self.producer!r}")

    def identity(self) -> dict:
        """The fields that tell one model from another in records, tables and plots."""
        return {"family": self.family, "bits": self.bits, "group_size": self.group_size, "seed": self.seed,
                "preset": self.preset, "source_model": self.source_model, "format": self.format,
                "method": self.method}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def write_meta(out_dir: str | os.PathLike, meta: ModelMeta) -> Path:

    return write_json(Path(out_dir) / FILE, meta.to_dict())


def read_meta(model_dir: str | os.PathLike) -> ModelMeta | None:
    """The ``quantlm.json`` of a directory, or None when there is none. A corrupt or foreign file is an error."""
    path = Path(model_dir) / FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise QuantlmError(f"{path}: not valid JSON; delete it or re-export the model") from None
    if not isinstance(data, dict):
        raise QuantlmError(f"{path}: expected a JSON object")
    if data.get("schema") != SCHEMA:
        data = _upgrade(data)
    names = {f.name for f in dataclasses.fields(ModelMeta)}
    try:
        return ModelMeta(**{k: v for k, v in data.items() if k in names})
    except TypeError as e:
        raise QuantlmError(f"{path}: not a quantlm model record ({e})") from None


def _upgrade(old: dict) -> dict:
    """Records written before the schema existed (quantize: a ``recipe`` with bits; train: a ``family``)."""
    recipe = old.get("recipe") or {}
    if "method" in old:  # a quantize export
        return {"producer": "quantize", "family": "quantlm", "format": old.get("format", "unpacked"),
                "source_model": old.get("source_model"), "bits": recipe.get("bits"),
                "group_size": recipe.get("group_size"), "sym": recipe.get("sym"), "seed": old.get("seed"),
                "method": old.get("method"), "settings": recipe, "calibration": old.get("calibration") or {},
                "modules": old.get("modules") or [], "versions": old.get("versions") or {},
                "accounting": old.get("accounting") or {}}
    return {"producer": "train", "family": old.get("family", "floatlm"), "format": "unpacked",
            "model": old.get("model", ""), "settings": recipe,
            "info": {k: v for k, v in old.items() if k not in ("family", "model", "recipe")}}


def model_label(model_dir: str | os.PathLike, meta: ModelMeta | None) -> str:
    """A label that tells exports apart: a quantize export is named after its source, bits, group and seed."""
    if meta is not None and meta.producer == "quantize" and meta.source_model:
        group = "" if meta.group_size in (None, -1) else f"-g{meta.group_size}"
        method = "" if meta.method in (None, "gptq") else f"-{meta.method}"
        return f"{Path(meta.source_model).name}-{meta.bits}bit{group}{method}-s{meta.seed}"
    return Path(model_dir).name
