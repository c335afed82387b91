"""`quantlm export MODEL_DIR --format FORMAT --out OUT`: the same model in another storage format, losslessly."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="re-write a checkpoint in another format (pack a TriLM, convert a packed QuantLM)",
        description="Re-write a checkpoint in another storage format without re-quantizing: an unpacked TriLM to "
                    "ternary-1.6 (5 trits per byte) or ternary-2 (4 per byte) and back; a gptq or "
                    "compressed-tensors QuantLM export to the other, or to unpacked (dequantized fp16).")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="checkpoint directory")
    p.add_argument("--format", required=True, help="target format: unpacked, gptq, compressed-tensors, ternary-1.6, "
                                                   "ternary-2")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output directory (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR (only once complete)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from quantlm.export import export_model

    report = export_model(args.model_dir, args.format, args.out, overwrite=args.overwrite)
    print(f"{report['family']} {report['from']} -> {report['to']}: {report['out']}")
    return 0
