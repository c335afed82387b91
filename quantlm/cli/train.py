"""`quantlm train RECIPE.yaml [--field value ...] [--out DIR] [--resume]`: train a FloatLM or a TriLM.

Every recipe field is a flag with its YAML spelling (``--steps 20``, ``--lr 0.004,0.003``), generated from
``TrainRecipe``. Under ``torchrun`` the same command trains with DDP (or FSDP) across all processes.
"""

from __future__ import annotations

from quantlm import recipes
from quantlm.cli.fields import add_recipe_flags, apply_recipe_flags
from quantlm.errors import QuantlmError
from quantlm.train.recipe import TrainRecipe
from quantlm.train.run import train


def register(sub) -> None:

    p = sub.add_parser(
        "train", help="train a FloatLM or a TriLM from a recipe",
        description="Train a FloatLM or TriLM from a train recipe (YAML, kind: train). Every recipe field can be "
                    "overridden with its flag (see below).")
    p.add_argument("recipe", nargs="?", help="train recipe: a YAML path or a shipped name (floatlm-micro, floatlm-tiny, trilm-micro, trilm-tiny)")
    p.add_argument("--out", help="run folder (default: runs/<recipe name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="hide progress bars (metrics still go to the log)")
    add_recipe_flags(p, TrainRecipe)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from pathlib import Path


    if not args.recipe:
        raise QuantlmError("give a train recipe, e.g. `quantlm train trilm-tiny`")
    recipe = apply_recipe_flags(args, recipes.load(args.recipe, expect=TrainRecipe))
    out = Path(args.out) if args.out else Path("runs") / Path(args.recipe).stem
    final = train(recipe, out, resume=args.resume, progress=args.progress)
    print(final)
    return 0
