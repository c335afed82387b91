"""Frozen recipe dataclasses and their YAML twins.

Every recipe is a frozen dataclass; ``load(path)`` reads a YAML file whose ``kind`` key names the class
(``model``, ``quant``, ``train``, ``eval``, ``suite``) and checks every key and type, so a typo or a wrong
type is a clear error instead of a silently ignored setting. ``dump`` writes the YAML back; the two
round-trip exactly. Field docstrings (``#:`` comments are not used; the ``help`` metadata is) become CLI help.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import json
import os
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

from quantlm.atomic import write_text
from quantlm.errors import QuantlmError
from quantlm.paths import resolve_input

# kind -> "module:Class"; modules are imported only when a recipe of that kind is loaded.
KINDS: dict[str, str] = {
    "model": "quantlm.specs:ModelSpec",
    "quant": "quantlm.quantize:QuantRecipe",
    "train": "quantlm.train.recipe:TrainRecipe",
    "eval": "quantlm.eval.recipe:EvalRecipe",
    "suite": "quantlm.suite.plan:SuiteManifest",
}


def doc(text: str, default: Any = dataclasses.MISSING, **kw) -> Any:
    """A dataclass field with help text (shown by the CLI)."""
    if default is dataclasses.MISSING:
        return field(metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


# ---------------------------------------------------------------------------------------------- YAML I/O

def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert lists to tuples and ints to floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _coerce(value, arm, where)
            except QuantlmError as e:
                errors.append(str(e))
        raise QuantlmError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise QuantlmError(f"{where}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise QuantlmError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise QuantlmError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise QuantlmError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args or (Any, Any)
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise QuantlmError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise QuantlmError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise QuantlmError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise QuantlmError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported recipe field type {tp!r} at {where}")


def from_dict(cls, data: dict, where: str | None = None):
    """Build the dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise QuantlmError(f"{where}: expected a mapping of settings, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        k = unknown[0]
        near = difflib.get_close_matches(str(k), names, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(names)}"
        raise QuantlmError(f"{where}: unknown key {k!r}{hint}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise QuantlmError(f"{where}: missing required key(s) {', '.join(missing)}")
    return cls(**kwargs)


def to_dict(obj) -> dict:
    """A plain mapping (lists, not tuples) of a recipe dataclass, nested ones included."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(obj)


def kind_of(cls) -> str:
    for kind, target in KINDS.items():
        if target.endswith(":" + cls.__name__) and cls.__module__ == target.split(":")[0]:
            return kind
    raise KeyError(f"{cls.__name__} is not a registered recipe kind")


def _class_for(kind: str):
    if kind not in KINDS:
        raise QuantlmError(f"unknown recipe kind {kind!r}; use one of {', '.join(KINDS)}")
    module, name = KINDS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def load(path: str | os.PathLike, expect: type | None = None):
    """Load a recipe YAML; ``expect`` checks its kind (e.g. ``QuantRecipe``)."""
    import yaml


    path = resolve_input(path)
    if not path.is_file():
        raise QuantlmError(f"recipe file {path} does not exist; pass a YAML path or a shipped recipe name "
                           "(e.g. quantlm-4bit, suite-tiny; see `quantlm size --list` for model presets)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise QuantlmError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or "kind" not in data:
        raise QuantlmError(f"{path}: a recipe is a mapping with a 'kind' key ({', '.join(KINDS)})")
    data = dict(data)
    cls = _class_for(data.pop("kind"))
    if expect is not None and cls is not expect:
        raise QuantlmError(f"{path}: is a {kind_of(cls)} recipe, but a {kind_of(expect)} recipe is needed here")
    return from_dict(cls, data, where=path.name)


def dumps(obj) -> str:
    import yaml

    body = {"kind": kind_of(type(obj)), **to_dict(obj)}
    return yaml.safe_dump(body, sort_keys=False, default_flow_style=None)


def dump(obj, path: str | os.PathLike) -> Path:

    return write_text(path, dumps(obj))


def recipe_hash(obj) -> str:
    """A short stable hash of a recipe's settings (used to decide whether an output is up to date)."""
    text = json.dumps(to_dict(obj), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def leaf_fields(cls, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dataclasses.Field, Any]]:
    """(path, field, resolved type) of every non-dataclass field of a recipe class, depth first."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += leaf_fields(tp, prefix + (f.name,))
        else:
            out.append((prefix + (f.name,), f, tp))
    return out


def replace_fields(obj, **changes):
    """A copy of a (nested) recipe with leaf fields changed by their names alone, e.g.
    ``replace_fields(QuantRecipe(), bits=3, nsamples=8)``; the recipe's checks run on the result."""
    paths = {path[-1]: path for path, _, _ in leaf_fields(type(obj))}
    data = to_dict(obj)
    for name, value in changes.items():
        if name not in paths:
            near = difflib.get_close_matches(name, list(paths), n=1)
            raise QuantlmError(f"{type(obj).__name__} has no field {name!r}" + (f"; did you mean {near[0]!r}?"
                                                                                 if near else ""))
        target = data
        for p in paths[name][:-1]:
            target = target[p]
        target[name] = list(value) if isinstance(value, tuple) else value
    return from_dict(type(obj), data)


def override(obj, pairs: dict[str, str]):
    """A copy of ``obj`` with ``key=value`` overrides given as strings (YAML scalars), type-checked."""
    import yaml

    data = to_dict(obj)
    for key, raw in pairs.items():
        target = data
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(target.get(p), dict):
                raise QuantlmError(f"override {key}: {p!r} is not a section of this recipe")
            target = target[p]
        target[parts[-1]] = yaml.safe_load(raw) if isinstance(raw, str) else raw
    return from_dict(type(obj), data)
