"""`quantlm plot`: quality against size in bits and against parameters from the result records."""

from __future__ import annotations

from pathlib import Path

from quantlm.errors import QuantlmError
from quantlm.eval.records import load_records
from quantlm.outputs import check_dir_writable, claim_output_file, write_output_text
from quantlm.paths import results_dir
from quantlm.plots import fit_families, is_loss_like, plot_paths, plot_quality


def register(sub) -> None:
    p = sub.add_parser(
        "plot", help="quality vs size in bits / parameters per family, with scaling-law fits, from result records",
        description="Read every record under --results and draw, for each metric, quality against model size in "
                    "bits (log axis) and against parameters, one curve per family (FloatLM, QuantLM per "
                    "bitwidth, TriLM), as PNG and SVG; fit L(N) = A / N^alpha + eps per family.")
    p.add_argument("--results", help="folder of result records (default: results/records)")
    p.add_argument("--metric", default="wikitext2.ppl",
                   help="comma-separated record columns, e.g. wikitext2.ppl, arc_easy.acc_norm, commonsense_avg "
                        "(default wikitext2.ppl)")
    p.add_argument("--size", default="paper", choices=("paper", "exact", "entropy"),
                   help="accounting convention of the size axis (default paper)")
    p.add_argument("--out", help="output folder (default: results/plots)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace plots and fits already in --out, only files quantlm wrote (and not edited since)")
    p.add_argument("--no-fit", action="store_true",
                   help="do not fit or draw scaling laws (fits are made for loss-like metrics: nll, ppl)")
    p.set_defaults(func=_run)


def _run(args) -> int:

    df = load_records(args.results or results_dir() / "records")
    if df.empty:
        raise QuantlmError(f"no result records under {args.results or results_dir() / 'records'}; "
                           "run `quantlm eval MODEL_DIR` first")
    out = Path(args.out) if args.out else results_dir() / "plots"
    check_dir_writable(out, "--out")
    size_col = f"size_bits_{args.size}"
    has_size = size_col in df.columns and df[size_col].notna().any()
    metrics = [m.strip() for m in args.metric.split(",") if m.strip()]
    fits = [fit_families(df, m, x="params") for m in metrics if not args.no_fit and is_loss_like(m)]
    table = None
    if fits:
        import pandas as pd

        table = pd.concat(fits, ignore_index=True)
    # every file this run writes is claimed before the first is: a new file, or --overwrite for one quantlm wrote
    targets = [p for m in metrics for stem in [m.replace(".", "_")]
               for p in (plot_paths(out / f"{stem}_vs_size_{args.size}") if has_size else [])
               + plot_paths(out / f"{stem}_vs_params")]
    if table is not None and not table.empty:
        targets.append(out / "scaling_fits.csv")
    for p in targets:
        claim_output_file(p, overwrite=args.overwrite)
    written = []
    for metric in metrics:
        stem = metric.replace(".", "_")
        if has_size:
            written += plot_quality(df, metric, out / f"{stem}_vs_size_{args.size}", x=size_col, fit=False,
                                    overwrite=args.overwrite)
        else:
            print(f"note: no record has {size_col}; skipped the size plot of {metric}")
        written += plot_quality(df, metric, out / f"{stem}_vs_params", x="params", fit=not args.no_fit,
                                overwrite=args.overwrite)
    for p in written:
        print(p)
    if table is not None:
        if table.empty:
            print("no scaling-law fit: every family has fewer than 3 model sizes")
        else:
            print(write_output_text(out / "scaling_fits.csv", table.to_csv(index=False), overwrite=args.overwrite))
            print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0
