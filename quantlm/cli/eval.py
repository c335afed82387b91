"""`quantlm eval MODEL_DIR`: perplexity and zero-shot accuracy from local data, saved as one result record."""

from __future__ import annotations

import json
import sys

from quantlm.cli.fields import add_recipe_flags, apply_recipe_flags
from quantlm.eval.recipe import EvalRecipe
from quantlm.eval.run import evaluate
from quantlm.paths import results_dir
from quantlm.recipes import load


def register(sub) -> None:

    p = sub.add_parser(
        "eval", help="perplexity and zero-shot tasks of a model on local data; appends a result record",
        description="Evaluate a causal LM directory (any format quantlm writes): perplexity on local corpora "
                    "(WikiText-2, PTB, C4, LAMBADA, or your own .txt/.jsonl) and zero-shot tasks with lm-eval's "
                    "log-likelihood protocol. Every run writes one JSON record (see `quantlm plot`).")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="checkpoint directory (config.json + weights)")
    p.add_argument("--recipe", help="EvalRecipe YAML (kind: eval); the recipe flags below override its fields")
    add_recipe_flags(p, EvalRecipe)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default cpu)")
    p.add_argument("--results", help="folder the record is written to (default: results/records under the "
                                     "working directory)")
    p.add_argument("--no-record", action="store_true", help="print the result without writing a record")
    p.add_argument("--family", choices=("floatlm", "quantlm", "trilm"), help="override the recorded family")
    p.add_argument("--preset", help="preset name recorded with the result (e.g. floatlm-99m)")
    p.add_argument("--bits", type=float, help="override the recorded bitwidth (QuantLM)")
    p.add_argument("--seed", type=int, help="calibration seed recorded with the result (QuantLM)")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format (default table)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="hide progress bars (default: shown when stderr is a terminal)")
    p.set_defaults(func=_run)


def build_recipe(args):
    """The recipe file (or the defaults) with the flags applied. The default perplexity corpus (wikitext2) is for
    an evaluation that names nothing: ``--tasks`` without ``--ppl`` (and without a recipe that lists ``ppl``) runs
    the tasks alone."""
    if args.recipe__tasks is not None and args.recipe__ppl is None and not _recipe_sets(args.recipe, "ppl"):
        args.recipe__ppl = ()
    return apply_recipe_flags(args, load(args.recipe, expect=EvalRecipe) if args.recipe else EvalRecipe())


def _recipe_sets(recipe: str | None, key: str) -> bool:
    """Whether the recipe file names ``key`` itself (rather than taking its default)."""
    if not recipe:
        return False
    import yaml

    from quantlm.paths import resolve_input

    try:
        data = yaml.safe_load(resolve_input(recipe).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False  # load() reports the problem in its own words
    return isinstance(data, dict) and key in data


def format_table(record: dict) -> str:
    lines = [f"{record['model']}  family={record.get('family')} bits={record.get('bits')} "
             f"params={record.get('params'):,}  device={record.get('device')}  {record.get('wall_time_s')} s"]
    for name, m in record["metrics"].items():
        if name == "commonsense_avg":
            value = "n/a (missing " + ", ".join(m["missing"]) + ")" if m["value"] is None else f"{m['value']:.4f}"
            lines.append(f"  {'commonsense_avg':<16} {value}")
        elif "ppl" in m and "window" in m:
            lines.append(f"  {name:<16} ppl {m['ppl']:.4f}  nll {m['nll']:.4f}  tokens {m['tokens']:,}  "
                         f"window {m['window']}" + ("  (limited)" if m.get("limited") else ""))
        elif m.get("status") != "ok":
            lines.append(f"  {name:<16} unavailable: {m.get('reason')}")
        else:
            parts = [f"{k} {m[k]:.4f} ± {m.get(k + '_stderr', float('nan')):.4f}" for k in ("acc", "acc_norm")
                     if k in m]
            if "ppl" in m:
                parts.append(f"ppl {m['ppl']:.3f}")
            lines.append(f"  {name:<16} {'  '.join(parts)}  (n={m['n']})")
    if record.get("path"):
        lines.append(f"record: {record['path']}")
    return "\n".join(lines)


def _run(args) -> int:

    recipe = build_recipe(args)
    extra = {k: getattr(args, k) for k in ("family", "preset", "bits", "seed") if getattr(args, k) is not None}
    out = None if args.no_record else (args.results or results_dir() / "records")
    record = evaluate(args.model_dir, recipe, results_dir=out, extra=extra, device=args.device,
                      progress=args.progress and sys.stderr.isatty())
    if args.format == "json":
        print(json.dumps(record, indent=2, default=str))
    else:
        print(format_table(record))
    return 0
