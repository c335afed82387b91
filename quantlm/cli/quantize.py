"""`quantlm quantize MODEL_DIR --bits 4 --out OUT_DIR`: GPTQ (or round-to-nearest) in the chosen formats."""

from __future__ import annotations

import argparse
import dataclasses

from quantlm.errors import QuantlmError


def _help(name: str) -> str:
    from quantlm.recipes import QuantRecipe

    f = {f.name: f for f in dataclasses.fields(QuantRecipe)}[name]
    return f"{f.metadata['help']} (default {f.default!r})"


def register(sub) -> None:
    p = sub.add_parser(
        "quantize", help="quantize a LLaMA-like checkpoint with GPTQ at 2..8 bits",
        description="Quantize a LLaMA-architecture Hugging Face checkpoint with GPTQ and export it. Settings "
        "come from --recipe (a kind: quant YAML) or the Spectra defaults; flags override them. Each format is "
        "written to OUT_DIR/<format>/, with OUT_DIR/report.json.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="local Hugging Face checkpoint directory")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output directory (must not exist)")
    p.add_argument("--recipe", metavar="YAML", help="quant recipe YAML (e.g. recipes/quantlm-4bit.yaml)")
    p.add_argument("--bits", type=int, help=_help("bits"))
    p.add_argument("--group-size", type=int, help=_help("group_size"))
    p.add_argument("--sym", dest="sym", action="store_true", default=None, help=_help("sym"))
    p.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid (own zero point per group)")
    p.add_argument("--act-order", dest="act_order", action=argparse.BooleanOptionalAction, default=None,
                   help=_help("act_order"))
    p.add_argument("--damp", type=float, help=_help("damp"))
    p.add_argument("--calib", metavar="FILE_OR_DIR",
                   help="calibration text (.txt, .jsonl, .parquet or a datasets directory); default: the "
                        "shipped C4 sample in calibration/")
    p.add_argument("--nsamples", type=int, help=_help("nsamples"))
    p.add_argument("--seqlen", type=int, help=_help("seqlen"))
    p.add_argument("--seed", type=int, default=0, help="calibration seed (default 0)")
    p.add_argument("--device", default="cpu", help="compute device: cpu or cuda[:N] (default cpu)")
    p.add_argument("--format", dest="formats", metavar="LIST",
                   help="comma list of unpacked, gptq, compressed-tensors (default unpacked)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR (only once complete)")
    p.add_argument("--rtn", action="store_true", help="round-to-nearest baseline instead of GPTQ")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.set_defaults(func=_run)


def recipe_from_args(args):
    """The recipe file (or the defaults) with every flag the user gave applied on top."""
    from quantlm.recipes import QuantRecipe, load

    recipe = load(args.recipe, expect=QuantRecipe) if args.recipe else QuantRecipe()
    changes = {}
    for flag, field_name in (("bits", "bits"), ("group_size", "group_size"), ("sym", "sym"),
                             ("act_order", "act_order"), ("damp", "damp"), ("nsamples", "nsamples"),
                             ("seqlen", "seqlen"), ("calib", "calibration")):
        value = getattr(args, flag)
        if value is not None:
            changes[field_name] = value
    if args.formats is not None:
        formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
        if not formats:
            raise QuantlmError("--format is empty; give a comma list of unpacked, gptq, compressed-tensors")
        changes["formats"] = formats
    return dataclasses.replace(recipe, **changes) if changes else recipe


def _run(args) -> int:
    from quantlm.gptq.api import quantize_model

    recipe = recipe_from_args(args)
    report = quantize_model(args.model_dir, recipe, args.out, seed=args.seed, device=args.device,
                            overwrite=args.overwrite, rtn=args.rtn, progress=args.progress)
    s = report["seconds"]
    print(f"{report['method']} {recipe.bits}-bit, group {recipe.group_size}: {len(report['modules'])} modules, "
          f"total error {report['total_error']:.4g}, {s['total']:.1f}s (quantize {s['quantize']:.1f}s)")
    for fmt, path in report["paths"].items():
        print(f"  {fmt}: {path}")
    return 0
