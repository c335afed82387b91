"""`quantlm quantize MODEL_DIR --bits 4 --out OUT_DIR`: GPTQ (or round-to-nearest) in the chosen formats."""

from __future__ import annotations

from quantlm.cli.export import print_changes
from quantlm.cli.fields import add_recipe_flags, apply_recipe_flags
from quantlm.gptq.memory import check_plan
from quantlm.quantize import QuantRecipe, memory_plan, quantize_model
from quantlm.recipes import load

ALIASES = {"data": ("--calib",), "formats": ("--format",)}


def register(sub) -> None:

    p = sub.add_parser(
        "quantize", help="quantize a LLaMA-like checkpoint with GPTQ at 2..8 bits",
        description="Quantize a LLaMA-architecture Hugging Face checkpoint with GPTQ and export it. Settings "
        "come from --recipe (a kind: quant YAML) or the Spectra defaults; every recipe field is a flag that "
        "overrides it. Each format is written to OUT_DIR/<format>/, with OUT_DIR/report.json.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="local Hugging Face checkpoint directory")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output directory (must not exist)")
    p.add_argument("--recipe", metavar="YAML", help="quant recipe: a YAML path or a shipped name (quantlm-3bit, quantlm-4bit, quantlm-6bit, quantlm-8bit)")
    add_recipe_flags(p, QuantRecipe, aliases=ALIASES)
    p.add_argument("--asym", dest="recipe__gptq__sym", action="store_const", const=False, default=None,
                   help="same as --no-sym")
    p.add_argument("--device", default="cpu", help="compute device: cpu or cuda[:N] (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR (only once complete)")
    p.add_argument("--rtn", dest="recipe__gptq__method", action="store_const", const="rtn", default=None,
                   help="round-to-nearest baseline instead of GPTQ (same as --method rtn)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the memory plan as JSON (from MODEL_DIR/config.json alone: no weights needed) and "
                        "exit; a run that would not fit is refused with the option that fixes it")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.set_defaults(func=_run)


def recipe_from_args(args):
    """The recipe file (or the defaults) with every flag the user gave applied on top."""
    recipe = load(args.recipe, expect=QuantRecipe) if args.recipe else QuantRecipe()
    return apply_recipe_flags(args, recipe)


def _run(args) -> int:

    recipe = recipe_from_args(args)
    if args.dry_run:
        import json


        plan = memory_plan(args.model_dir, recipe, args.device)
        print(json.dumps(plan, indent=2, default=str))
        check_plan(plan)
        return 0
    report = quantize_model(args.model_dir, recipe, args.out, device=args.device, overwrite=args.overwrite,
                            progress=args.progress)
    s, g = report["seconds"], recipe.gptq
    print(f"{report['method']} {g.bits}-bit, group {g.group_size}: {len(report['modules'])} modules, "
          f"total error {report['total_error']:.4g}, {s['total']:.1f}s (quantize {s['quantize']:.1f}s)")

    for fmt, path in report["paths"].items():
        print(f"  {fmt}: {path}")
        print_changes(report.get("changes", {}).get(fmt))
    return 0
