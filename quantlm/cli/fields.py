"""Command-line flags generated from recipe dataclasses, so every recipe field is settable with the YAML spelling.

Nested dataclasses are flattened: ``QuantRecipe.gptq.bits`` is ``--bits`` (leaf names must be unique within a
recipe, checked here). Values are parsed by the field's type (bools as ``--x/--no-x``, tuples as comma lists,
mappings as YAML) and applied back through ``recipes.from_dict``, so the recipe's own checks run on them.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

from quantlm.recipes import from_dict, leaf_fields, to_dict

PREFIX = "recipe__"


@dataclass(frozen=True)
class Flag:
    path: tuple[str, ...]  # field path from the recipe root
    flag: str  # --name
    dest: str
    tp: Any


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _parser_for(tp, flag: str):
    """A function str -> value for ``tp`` (the recipe's own type check runs afterwards)."""
    import yaml

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        inner = args[0] if args else str

        def parse_list(text: str):
            text = text.strip()
            if text.lower() in ("", "none", "[]"):
                return ()
            if text.startswith("["):
                return tuple(yaml.safe_load(text))
            items = [t.strip() for t in text.split(",") if t.strip()]
            return tuple(yaml.safe_load(t) if inner is not str else t for t in items)
        return parse_list
    if tp in (int, float, str):
        def parse_scalar(text: str):
            if tp is str:
                return text
            try:
                return tp(text)
            except ValueError:
                value = yaml.safe_load(text) if tp is float else None  # YAML numbers too: .nan, .inf, 1e-3
                if isinstance(value, float):
                    return value
                raise argparse.ArgumentTypeError(f"expected {'an integer' if tp is int else 'a number'}, "
                                                 f"got {text!r}") from None
        return parse_scalar

    def parse_yaml(text: str):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise argparse.ArgumentTypeError(f"not a valid value: {text!r}") from None
        return value
    return parse_yaml


def _metavar(tp) -> str:
    if typing.get_origin(tp) is tuple:
        return "LIST"
    return {int: "INT", float: "FLOAT", str: "TEXT"}.get(tp, "VALUE")


def add_recipe_flags(parser: argparse.ArgumentParser, cls, *, aliases: dict[str, tuple[str, ...]] | None = None,
                     skip: tuple[str, ...] = ()) -> list[Flag]:
    """Add ``--field`` flags for every leaf field of ``cls`` (help from the field docs); returns the flags.

    ``aliases`` maps a field name to extra flag spellings users know (e.g. ``data`` -> ``--calib``).
    """
    aliases = aliases or {}
    flags, seen = [], {}
    group = parser.add_argument_group(f"recipe fields ({cls.__name__}; override the recipe file)")
    for path, f, tp in leaf_fields(cls):
        name = path[-1]
        if name in skip:
            continue
        if name in seen:
            raise AssertionError(f"{cls.__name__}: field name {name} appears at {seen[name]} and {path}")
        seen[name] = path
        flag = "--" + name.replace("_", "-")
        dest = PREFIX + "__".join(path)
        help_text = f"{f.metadata.get('help', '')} (default {_default(f)!r})"
        names = [flag, *aliases.get(name, ())]
        if "_" in name:  # the YAML spelling works too (--weight_decay as well as --weight-decay)
            names.append("--" + name)
        if tp is bool:
            group.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        elif typing.get_origin(tp) is Literal:
            group.add_argument(*names, dest=dest, choices=typing.get_args(tp), default=None, help=help_text)
        else:
            group.add_argument(*names, dest=dest, type=_parser_for(tp, flag), default=None, metavar=_metavar(tp),
                               help=help_text)
        flags.append(Flag(path, flag, dest, tp))
    return flags


def apply_recipe_flags(args: argparse.Namespace, recipe):
    """``recipe`` with every flag the user gave applied (the recipe's checks rerun on the result)."""
    data = to_dict(recipe)
    changed = False
    for path, _, _ in leaf_fields(type(recipe)):
        value = getattr(args, PREFIX + "__".join(path), None)
        if value is None:
            continue
        target = data
        for p in path[:-1]:
            target = target[p]
        target[path[-1]] = list(value) if isinstance(value, tuple) else value
        changed = True
    if not changed:
        return recipe
    return from_dict(type(recipe), data, where="command line")
