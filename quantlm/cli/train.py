"""`quantlm train RECIPE.yaml [--key value ...] [--out DIR] [--resume]`: train a FloatLM or a TriLM.

Every recipe key can be overridden on the command line (``--steps 20``, ``--lr [0.004,0.003]``); values are read
as YAML scalars. Under ``torchrun`` the same command trains with DDP (or FSDP) across all processes.
"""

from __future__ import annotations

import argparse
import dataclasses

from quantlm.errors import QuantlmError


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train a FloatLM or a TriLM from a recipe",
        description="Train a FloatLM or TriLM from a train recipe (YAML, kind: train). Recipe keys can be "
                    "overridden as --key value; run `quantlm train --keys` to list them.")
    p.add_argument("recipe", nargs="?", help="train recipe YAML, e.g. recipes/trilm-tiny.yaml")
    p.add_argument("--out", help="run folder (default: runs/<recipe name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--keys", action="store_true", help="list the recipe keys with their help and exit")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="hide progress bars (metrics still go to the log)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="recipe overrides: --key value ...")
    p.set_defaults(func=_run)


def _parse_overrides(extra: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    i = 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise QuantlmError(f"unexpected argument {arg!r}; recipe overrides look like --key value")
        key = arg[2:].replace("-", "_")
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(extra):
            value = extra[i + 1]
            i += 2
        else:
            raise QuantlmError(f"override {arg} needs a value (--{key} VALUE)")
        out[key] = value
    return out


def _run(args) -> int:
    from pathlib import Path

    from quantlm import recipes
    from quantlm.train.recipe import TrainRecipe

    if args.keys:
        for f in dataclasses.fields(TrainRecipe):
            print(f"--{f.name:<20} {f.metadata.get('help', '')}")
        return 0
    if not args.recipe:
        raise QuantlmError("give a train recipe, e.g. `quantlm train recipes/trilm-tiny.yaml`")
    # Options may also follow the recipe (argparse's REMAINDER swallowed them with the overrides).
    tail = argparse.ArgumentParser(add_help=False)
    tail.add_argument("--out")
    tail.add_argument("--resume", action="store_true")
    tail.add_argument("--no-progress", dest="progress", action="store_false")
    known, rest = tail.parse_known_args(args.overrides or [])
    args.out = known.out or args.out
    args.resume = known.resume or args.resume
    args.progress = known.progress and args.progress
    overrides = _parse_overrides(rest)
    recipe = recipes.load(args.recipe, expect=TrainRecipe)
    if overrides:
        recipe = recipes.override(recipe, overrides)
    out = Path(args.out) if args.out else Path("runs") / Path(args.recipe).stem

    from quantlm.train.run import train

    final = train(recipe, out, resume=args.resume, progress=args.progress)
    print(final)
    return 0
