"""Every recipe field is settable from the command line, with its YAML spelling, and reaches the recipe."""

from __future__ import annotations

import argparse
import typing

import pytest

from quantlm.cli import build_parser
from quantlm.cli.fields import PREFIX, apply_recipe_flags
from quantlm.eval.recipe import EvalRecipe
from quantlm.quantize import QuantRecipe
from quantlm.recipes import leaf_fields
from quantlm.train.recipe import TrainRecipe


def _other_value(tp, default):
    """A valid value different from the default, and its command-line spelling."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return (not default), ["--no-X" if default else "--X"]
    if origin is typing.Literal:
        v = next(a for a in args if a != default)
        return v, ["--X", v]
    if origin in (typing.Union, __import__("types").UnionType):
        return 7, ["--X", "7"]
    if origin is tuple:
        inner = args[0]
        v = {int: (5, 6), float: (0.5, 0.25), str: ("a", "b")}[inner]
        return v, ["--X", ",".join(map(str, v))]
    if origin is dict:
        return {"num_hidden_layers": 2}, ["--X", "{num_hidden_layers: 2}"]
    if tp is int:
        return default + 1, ["--X", str(default + 1)]
    if tp is float:
        return default / 2 if default else 0.5, ["--X", str(default / 2 if default else 0.5)]
    if tp is str:
        return "something", ["--X", "something"]
    raise AssertionError(tp)


# values that must also satisfy the recipes' own checks
SPECIAL = {"bits": (3, ["--X", "3"]), "group_size": (64, ["--X", "64"]), "formats": (("gptq",), ["--X", "gptq"]),
           "damp": (0.02, ["--X", "0.02"]), "mse_maxshrink": (0.5, ["--X", "0.5"]),
           "tasks": (("piqa",), ["--X", "piqa"]), "ppl": (("ptb",), ["--X", "ptb"]),
           "window": (64, ["--X", "64"]), "heldout_fraction": (0.1, ["--X", "0.1"]),
           "min_lr_ratio": (0.2, ["--X", "0.2"]), "betas": ((0.8, 0.9), ["--X", "0.8,0.9"]),
           "batch_tokens": (8192, ["--X", "8192"]), "seq_len": (256, ["--X", "256"]),
           "model": ("floatlm-micro", ["--X", "floatlm-micro"]), "family": ("trilm", ["--X", "trilm"]),
           "corpus": (("data/corpus",), ["--X", "data/corpus"]), "lr": ((0.004,), ["--X", "0.004"]), "replay_cache_gb": (2.0, ["--X", "2"]),
           "max_memory_gb": (20.0, ["--X", "20"]), "offload_dir": ("/tmp/off", ["--X", "/tmp/off"]),
           "gguf_type": ("Q8_0", ["--X", "Q8_0", "--formats", "gguf"]),
           "kquant_grouped": (True, ["--X", "--formats", "gguf"]),
           "method": ("rtn", ["--X", "rtn"]), "transforms": ((), ["--X", "none"])}


@pytest.mark.parametrize("command,cls", [("quantize", QuantRecipe), ("eval", EvalRecipe), ("train", TrainRecipe)])
def test_every_recipe_field_has_a_flag_that_sets_it(command, cls):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    flags = {}
    for a in sub._actions:
        flags.setdefault(a.dest, a)  # aliases (--asym) share a dest with the generated flag
    base = cls()
    positional = {"quantize": ["M", "--out", "O"], "eval": ["M"], "train": ["r.yaml"]}[command]
    fields = leaf_fields(cls)
    assert fields
    for path, f, tp in fields:
        dest = PREFIX + "__".join(path)
        assert dest in flags, f"{cls.__name__}.{'.'.join(path)} has no flag"
        flag = "--" + path[-1].replace("_", "-")
        assert flag in flags[dest].option_strings
        assert f.metadata.get("help") and f.metadata["help"] in flags[dest].help  # the dataclass doc is the help
        default = getattr(base, path[0]) if len(path) == 1 else getattr(getattr(base, path[0]), path[1])
        value, argv = SPECIAL.get(path[-1]) or _other_value(tp, default)
        argv = [a.replace("X", path[-1].replace("_", "-")) for a in argv]
        args = parser.parse_args([command, *positional, *argv])
        recipe = apply_recipe_flags(args, base)
        got = recipe
        for p in path:
            got = getattr(got, p)
        assert got == value, (path, got, value)


def test_short_aliases_users_know():
    parser = build_parser()
    args = parser.parse_args(["quantize", "M", "--out", "O", "--calib", "c.txt", "--format", "gptq", "--asym"])
    r = apply_recipe_flags(args, QuantRecipe())
    assert (r.calibration.data, r.export.formats, r.gptq.sym) == ("c.txt", ("gptq",), False)
    # a flag not given never overrides the recipe file (no hidden defaults)
    from quantlm.gptq.settings import GPTQSettings

    asym = QuantRecipe(GPTQSettings(sym=False))
    assert apply_recipe_flags(parser.parse_args(["quantize", "M", "--out", "O"]), asym) == asym
