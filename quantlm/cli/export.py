"""`quantlm export MODEL_DIR --format FORMAT --out OUT`: the same model in another storage format, losslessly."""

from __future__ import annotations

from quantlm.errors import QuantlmError
from quantlm.export import export_model


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="re-write a checkpoint in another format (pack a TriLM, convert a QuantLM, write a GGUF)",
        description="Re-write a checkpoint in another storage format without re-quantizing: an unpacked TriLM to "
                    "ternary-1.6 (5 trits per byte) or ternary-2 (4 per byte) and back; a gptq or "
                    "compressed-tensors QuantLM export to the other, or to unpacked (dequantized fp16); any of them "
                    "to gguf for llama.cpp (OUT/model.gguf): a FloatLM as F16, a TriLM as TQ1_0 (or TQ2_0), a "
                    "packed QuantLM bit-exact in the smallest block type that holds its codes.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="checkpoint directory")
    p.add_argument("--format", required=True, help="target format: unpacked, gptq, compressed-tensors, ternary-1.6, "
                                                   "ternary-2, gguf")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output directory (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR (only once complete)")
    g = p.add_argument_group("gguf")
    g.add_argument("--type", dest="gguf_type", metavar="TYPE",
                   help="ggml type of the block linears (default: F16 for a FloatLM, TQ1_0 for a TriLM, the smallest "
                        "exact type for a QuantLM; a FloatLM given Q4_0/Q8_0/... is round-to-nearest by gguf-py)")
    g.add_argument("--float-type", choices=["F16", "BF16", "F32"], default="F16",
                   help="embedding, LM head and float linears (default F16, the Spectra convention)")
    g.add_argument("--kquant-grouped", action="store_true",
                   help="QuantLM: allow Q6_K/Q3_K/Q2_K for grouped codes (group scales re-quantized; reported)")
    g.add_argument("--merge-shard-scales", action="store_true",
                   help="TriLM: blocks straddling two scale shards get one merged scale (reported)")
    p.set_defaults(func=_run)


def _run(args) -> int:

    options = {}
    if args.format == "gguf":
        options = {"float_dtype": args.float_type, "gguf_type": args.gguf_type or "",
                   "kquant_grouped": args.kquant_grouped, "merge_shard_scales": args.merge_shard_scales}
    elif args.gguf_type or args.kquant_grouped or args.merge_shard_scales:
        raise QuantlmError("--type, --kquant-grouped and --merge-shard-scales apply to --format gguf")
    report = export_model(args.model_dir, args.format, args.out, overwrite=args.overwrite, options=options)
    print(f"{report['family']} {report['from']} -> {report['to']}: {report['out']}  ({report['layout']})")
    print_changes(report.get("changes"))
    return 0


def print_changes(changes) -> None:
    """What an export changed in the weights, one line per ggml type: how many tensors, the largest changes."""
    by_type: dict[str, list[dict]] = {}
    for c in changes or []:
        by_type.setdefault(c["type"], []).append(c)
    for type_name, rows in by_type.items():
        s = max(rows, key=lambda c: c["scale_error"])
        w = max(rows, key=lambda c: c["weight_error"])
        print(f"  changed {len(rows)} tensor(s) written as {type_name}: largest scale change {s['scale_error']:.3g} "
              f"({s['name']}), largest weight change {w['weight_error']:.3g} ({w['name']}); {w['note']}")
