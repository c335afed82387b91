"""`quantlm size`: model sizes in bits under the paper, exact and entropy conventions."""

from __future__ import annotations

import sys
from pathlib import Path

from quantlm import accounting as acc
from quantlm.outputs import claim_output_file, write_output_text
from quantlm.specs import PRESETS, SPECTRA_PRESETS


def register(sub) -> None:
    p = sub.add_parser(
        "size", help="model sizes in bits (presets, config.json files or checkpoint directories)",
        description="Size in bits of FloatLMs, QuantLMs and TriLMs. With no MODEL: the whole Spectra suite "
                    "(54 presets) under the paper and exact conventions side by side.")
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="preset name (e.g. quantlm-3.9b-4bit), config.json path, checkpoint directory or .gguf file "
                        "(measured from its header alone)")
    p.add_argument("--convention", choices=["paper", "exact", "entropy", "all"], action="append",
                   help="accounting convention (repeatable; default: paper and exact)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format")
    p.add_argument("--per-tensor", action="store_true", help="one row per stored tensor instead of per model")
    p.add_argument("--bits", type=int, help="account a FloatLM preset/config as the QuantLM of this bitwidth")
    p.add_argument("--group-size", type=int, help="QuantLM group size (-1: per-channel); default: the Spectra rule (128 at <= 4 bits, else -1)")
    p.add_argument("--layout", choices=["compressed-tensors", "gptq", "unpacked", "gguf"], default="compressed-tensors",
                   help="QuantLM storage assumed by the exact convention (gguf: the smallest exact block type)")
    p.add_argument("--asym", action="store_true", help="QuantLM with asymmetric grids (zero points stored)")
    p.add_argument("--g-idx", action="store_true", help="QuantLM stores an int32 group index per input column")
    p.add_argument("--ternary-layout", choices=["ternary-1.6", "ternary-2", "unpacked", "gguf"], default="ternary-1.6",
                   help="TriLM storage assumed by the exact convention (gguf: TQ1_0)")
    p.add_argument("--list", action="store_true", help="list the preset names and exit")
    p.add_argument("--out", help="write the output to this new file (atomically) instead of stdout; never one of "
                                 "the MODELs or a file inside a checkpoint directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file, only one quantlm wrote (and has not been edited since)")
    p.set_defaults(func=_run)


def _run(args) -> int:

    inputs = _inputs(args.models)
    if args.out is not None:  # before any model is read
        claim_output_file(args.out, overwrite=args.overwrite, inputs=inputs)
    if args.list:
        _emit("\n".join(PRESETS) + "\n", args)
        return 0
    conventions = args.convention or ["paper", "exact"]
    if "all" in conventions:
        conventions = list(acc.CONVENTIONS)
    conventions = list(dict.fromkeys(conventions))
    models = args.models or list(SPECTRA_PRESETS)
    budgets = [acc.budget(m, bits=args.bits, group_size=args.group_size, quant_format=args.layout,
                          ternary_format=args.ternary_layout, sym=not args.asym, g_idx=args.g_idx) for m in models]

    import pandas as pd

    if args.per_tensor:
        df = pd.DataFrame([row for b in budgets for row in acc.per_tensor(b)])
    else:
        df = pd.DataFrame(acc.summarize(budgets, conventions))
        df["quant_bits"] = df["quant_bits"].astype("Int64")
    if args.format == "json":
        text = df.to_json(orient="records", indent=1) + "\n"
    elif args.format == "csv":
        text = df.to_csv(index=False)
    else:
        text = _table(df, conventions, per_tensor=args.per_tensor)
    _emit(text, args)
    return 0


def _inputs(models: list[str]) -> list[Path]:
    """The MODELs that are paths, and the checkpoint directory of a config.json: --out must stay out of them."""
    out = []
    for m in models:
        p = Path(m).expanduser()
        if p.exists():
            out.append(p)
            if p.is_file() and p.name == "config.json":
                out.append(p.parent)
    return out


def _emit(text: str, args) -> None:

    if args.out is None:
        sys.stdout.write(text)
    else:
        write_output_text(args.out, text, overwrite=args.overwrite, inputs=_inputs(args.models))


def _table(df, conventions: list[str], per_tensor: bool) -> str:
    import pandas as pd

    if per_tensor:
        view = df.copy()
        for c in ("bits_paper", "bits_exact", "bits_entropy"):
            view[c] = view[c].map(lambda v: f"{v:,.0f}")
        return view.to_string(index=False) + "\n"
    base = df[df.convention == conventions[0]][["model", "family", "params"]].reset_index(drop=True)
    base["params"] = base["params"].map(_fmt_params)
    parts = [base]
    for c in conventions:
        sub = df[df.convention == c].reset_index(drop=True)
        parts.append(pd.DataFrame({
            f"{c} Gbit": sub["bits"].map(lambda v: f"{v / 1e9:.4f}"),
            f"{c} bits/param": sub["bits_per_param"].map(lambda v: f"{v:.3f}"),
            f"{c} x FloatLM": sub["ratio_to_floatlm"].map(lambda v: f"{v:.3f}"),
        }))
    table = pd.concat(parts, axis=1).to_string(index=False)
    layouts = df[df.convention == "exact"][["model", "layout"]] if "exact" in conventions else None
    note = ""
    if layouts is not None:
        kinds = sorted(set(layouts["layout"]))
        note = "\nexact convention assumes: " + "; ".join(kinds) + "\n"
    if "file_bytes" in df:  # files measured as stored: the payload (= exact bits / 8) and what surrounds it
        files = df[df.convention == conventions[0]].dropna(subset=["file_bytes"])
        note += "".join(f"{r.model}: tensor payload {r.payload_bytes:,.0f} bytes (exact / 8), headers "
                        f"{r.header_bytes:,.0f}, file {r.file_bytes:,.0f}\n" for r in files.itertuples())
    return table + "\n" + note


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
