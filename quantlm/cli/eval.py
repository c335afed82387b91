"""`quantlm eval MODEL_DIR`: perplexity and zero-shot accuracy from local data, saved as one result record."""

from __future__ import annotations

import json
import sys

from quantlm.errors import QuantlmError


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip() and n.strip() != "none")


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="perplexity and zero-shot tasks of a model on local data; appends a result record",
        description="Evaluate a causal LM directory: perplexity on local corpora (WikiText-2, PTB, C4, LAMBADA, "
                    "or your own .txt/.jsonl) and zero-shot tasks with lm-eval's log-likelihood protocol. "
                    "Every run writes one JSON record (see `quantlm plot`).")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face checkpoint directory (config.json + weights)")
    p.add_argument("--recipe", help="EvalRecipe YAML (kind: eval); the flags below override its fields")
    p.add_argument("--ppl", type=_names, help="comma-separated corpora: wikitext2, ptb, c4, lambada or file paths; "
                   "'none' to skip (default: wikitext2)")
    p.add_argument("--tasks", type=_names, help="comma-separated zero-shot tasks or aliases: arc_easy, arc_challenge, "
                   "piqa, hellaswag, boolq, winogrande, lambada_openai, logiqa, mmlu, commonsense, spectra")
    p.add_argument("--window", type=int, help="perplexity window in tokens (default: model context capped at 2048)")
    p.add_argument("--limit", type=int, help="zero-shot: only the first N items of each task")
    p.add_argument("--ppl-limit-windows", type=int, help="perplexity: only the first N windows of each corpus")
    p.add_argument("--batch-size", type=int, help="zero-shot requests per forward pass (default 8)")
    p.add_argument("--ppl-batch-size", type=int, help="perplexity windows per forward pass (default 1)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="load dtype (default float32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default cpu)")
    p.add_argument("--results", help="folder the record is written to (default: results/records)")
    p.add_argument("--no-record", action="store_true", help="print the result without writing a record")
    p.add_argument("--family", choices=("floatlm", "quantlm", "trilm"), help="override the inferred family")
    p.add_argument("--preset", help="preset name recorded with the result (e.g. floatlm-99m)")
    p.add_argument("--bits", type=float, help="override the recorded bitwidth (QuantLM)")
    p.add_argument("--seed", type=int, help="calibration seed recorded with the result (QuantLM)")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format (default table)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="hide progress bars (default: shown when stderr is a terminal)")
    p.set_defaults(func=_run)


def build_recipe(args):
    from quantlm.eval.recipe import EvalRecipe
    from quantlm.recipes import from_dict, load, to_dict

    base = to_dict(load(args.recipe, expect=EvalRecipe)) if args.recipe else {}
    flags = {"ppl": args.ppl, "tasks": args.tasks, "window": args.window, "limit": args.limit,
             "ppl_limit_windows": args.ppl_limit_windows, "batch_size": args.batch_size,
             "ppl_batch_size": args.ppl_batch_size, "dtype": args.dtype}
    base.update({k: v for k, v in flags.items() if v is not None})
    return from_dict(EvalRecipe, base)


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
    from quantlm.eval.run import evaluate
    from quantlm.paths import results_dir

    recipe = build_recipe(args)
    if args.limit is not None and args.limit < 1:
        raise QuantlmError(f"--limit {args.limit} must be at least 1")
    extra = {k: getattr(args, k) for k in ("family", "preset", "bits", "seed") if getattr(args, k) is not None}
    out = None if args.no_record else (args.results or results_dir() / "records")
    record = evaluate(args.model_dir, recipe, results_dir=out, extra=extra, device=args.device,
                      progress=args.progress and sys.stderr.isatty())
    if args.format == "json":
        print(json.dumps(record, indent=2, default=str))
    else:
        print(format_table(record))
    return 0
