"""`quantlm bench MODEL_OR_GGUF ...`: llama.cpp's prompt and decode speed and peak memory, one process per model."""

from __future__ import annotations

import sys

from quantlm.cli.fields import add_recipe_flags, apply_recipe_flags
from quantlm.deploy import BenchSettings, bench
from quantlm.outputs import claim_output_file, write_output_text

COLUMNS = ["model", "file_type", "gguf_bytes", "bits_per_weight", "prompt_tok_s", "decode_tok_s", "rss_mb",
           "load_s", "threads"]


def register(sub) -> None:

    p = sub.add_parser(
        "bench", help="decode speed and memory in llama.cpp (GGUF files or checkpoints, exported on the fly)",
        description="Run each model in llama.cpp (llama-cpp-python), in a process of its own: prompt tokens/s, "
                    "decode tokens/s at batch 1 (greedy), peak resident memory, file size, threads and CPU. A "
                    "checkpoint directory is exported to a temporary GGUF first (quantlm export --format gguf). "
                    "Needs llama_cpp: `bash .ci/llamacpp.sh` builds a virtualenv with it.")
    p.add_argument("models", nargs="+", metavar="MODEL_OR_GGUF",
                   help=".gguf file, quantlm gguf export directory or checkpoint directory")
    add_recipe_flags(p, BenchSettings, aliases={"gguf_type": ("--type",)})
    p.add_argument("--python", help="interpreter that has llama_cpp (default: this one), e.g. .venv-llamacpp/bin/python")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format")
    p.add_argument("--out", help="write the records to this new file (JSON or CSV by --format) instead of stdout; "
                                 "never one of the models or a file inside a model directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file, only one quantlm wrote (and has not been edited since)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import json

    import pandas as pd


    settings = apply_recipe_flags(args, BenchSettings())
    if args.out:  # before any model runs
        claim_output_file(args.out, overwrite=args.overwrite, inputs=args.models)
    records = bench(args.models, settings, progress=args.progress, python=args.python)
    df = pd.DataFrame(records)
    if args.format == "json":
        text = json.dumps(records, indent=1) + "\n"
    elif args.format == "csv":
        text = df.drop(columns=["system_info"], errors="ignore").to_csv(index=False)
    else:
        view = df[COLUMNS].copy()
        for c, fmt in (("bits_per_weight", "{:.3f}"), ("prompt_tok_s", "{:.1f}"), ("decode_tok_s", "{:.1f}"),
                       ("rss_mb", "{:.0f}"), ("load_s", "{:.2f}"), ("gguf_bytes", "{:,}")):
            view[c] = view[c].map(fmt.format)
        r = records[0]
        text = (view.to_string(index=False) + f"\n\nllama.cpp {r['llama_cpp']} on {r['cpu']} ({r['cores']} cores), "
                f"{r['threads']} thread(s), {r['prompt_tokens']} prompt + {r['decode_tokens']} decoded tokens, median "
                f"of {r['repeats']}; load average {r['load_avg_before'][0]:.2f} before, "
                f"{records[-1]['load_avg_after'][0]:.2f} after\n")
    if args.out:
        write_output_text(args.out, text, overwrite=args.overwrite, inputs=args.models)
    else:
        sys.stdout.write(text)
    return 0
