"""A suite's comparison table (CSV + Markdown) and plots, built from its result records alone.

The table and plots are quantlm's own files in the suite's ``results/`` folder: every report rewrites them without
a flag, but never a file of the same name that quantlm did not write (:func:`quantlm.outputs.claim_output_file`);
a corrupt or unreadable record is a warning naming it, and the table is built from the others.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from quantlm import __version__
from quantlm.errors import QuantlmError
from quantlm.eval.records import load_records
from quantlm.outputs import MD_MARK, claim_output_file, write_output_text
from quantlm.plots import plot_paths, plot_quality
from quantlm.suite.plan import SuiteManifest, output_root, plan
from quantlm.suite.runner import DEPLOY_SCHEMA

log = logging.getLogger(__name__)

FLAG = "suite report file"
FIX = "move it out of the suite's results folder and rerun --report (the report rewrites only its own files)"


def report(manifest: SuiteManifest, base: Path, *, plots: bool = True) -> dict:
    """The comparison table (CSV + Markdown) and the plots, from the suite's result records alone."""
    import pandas as pd


    root = output_root(manifest)
    results = root / "results"
    df = load_records(results) if results.is_dir() else pd.DataFrame()
    df, ignored = current_records(df, manifest, base)
    if df.empty:
        raise QuantlmError(f"no result records of this manifest's jobs under {results}; run the suite first")
    for model in ignored:
        log.warning("%s: its record is not one of this manifest's jobs (an edited manifest); left out of the table",
                    model)
    deploy = load_deploy_records(results / "deploy")
    table = comparison_table(df, deploy)
    csv_path, md_path = results / "suite_table.csv", results / "suite_table.md"
    plot_df, figures = _figures(df, results, deploy) if plots else (df, [])
    # every file is claimed before the first is written: quantlm's own are rewritten, a foreign one never
    for path in [csv_path, md_path, *(p for _, stem, _ in figures for p in plot_paths(stem))]:
        claim_output_file(path, overwrite=True, flag=FLAG, fix=FIX)
    write_output_text(csv_path, table.to_csv(index=False), overwrite=True, flag=FLAG, fix=FIX)
    write_output_text(md_path, _markdown(table, manifest, {**_provenance(results, df), "ignored": ignored}),
                      overwrite=True, flag=FLAG, fix=FIX)
    out = {"table": table, "csv": csv_path, "markdown": md_path, "plots": [], "ignored": ignored}
    for metric, stem, x in figures:
        out["plots"] += plot_quality(plot_df, metric, stem, x=x, overwrite=True, flag=FLAG, fix=FIX)
    return out


def current_records(df, manifest: SuiteManifest, base: Path):
    """The records of the manifest's eval jobs as planned now (same id, same hash), newest per job, and the labels
    of the records left out (removed bitwidths or seeds, changed recipes, records not written by a suite)."""
    if df.empty:
        return df, []
    wanted = {j.id: j.hash for j in plan(manifest, base) if j.kind == "eval"}
    keep = df.apply(lambda r: wanted.get(r.get("job_id")) == r.get("job_hash") and r.get("job_hash") is not None,
                    axis=1)
    ignored = sorted({f"{r['model']} (seed {r['seed']})" if r.get("seed") == r.get("seed") and r.get("seed") is not None
                      else str(r["model"]) for _, r in df[~keep].iterrows()})
    current = df[keep].sort_values("created", kind="stable").drop_duplicates("job_id", keep="last")
    return current.reset_index(drop=True), ignored


DEPLOY_COLUMNS = ("file_type", "gguf_bytes", "decode_tok_s", "prompt_tok_s", "rss_mb")


def load_deploy_records(folder: Path):
    """The deploy jobs' records (llama.cpp speed and memory), one row per model with DEPLOY_COLUMNS; empty if none."""
    import pandas as pd


    rows = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            r = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(r, dict) and r.get("schema") == DEPLOY_SCHEMA:
            rows.append({"model": r["model"], **{c: r.get(c) for c in DEPLOY_COLUMNS}})
    return pd.DataFrame(rows, columns=["model", *DEPLOY_COLUMNS])


def _metric_columns(df) -> list[str]:
    """Perplexities of the corpora, then acc_norm (or acc) of the tasks, then the commonsense average."""
    tasks = {c[: -len(".acc")] for c in df.columns if c.endswith(".acc")}
    keep = [c for c in df.columns if c.endswith(".ppl") and c[: -len(".ppl")] not in tasks]
    for t in sorted(tasks):
        keep.append(f"{t}.acc_norm" if f"{t}.acc_norm" in df.columns else f"{t}.acc")
    if "commonsense_avg" in df.columns:
        keep.append("commonsense_avg")
    return [c for c in keep if df[c].notna().any()]


def comparison_table(df, deploy=None):
    """One row per model (QuantLM seeds averaged, with their standard deviation), ordered by family and size;
    with ``deploy`` records (:func:`load_deploy_records`), the llama.cpp columns of each model at the end."""
    import pandas as pd

    metrics = _metric_columns(df)
    sizes = [c for c in ("size_bits_paper", "size_bits_exact", "size_bits_entropy") if c in df.columns]
    order = {"floatlm": 0, "quantlm": 1, "trilm": 2}
    rows = []
    for (model, family), g in df.groupby(["model", "family"], sort=False, dropna=False):
        g = g.sort_values("created").drop_duplicates("seed", keep="last")
        row = {"model": model, "family": family, "label": g["label"].iloc[0],
               "bits": g["bits"].iloc[0], "params": g["params"].iloc[0], "seeds": len(g)}
        for c in sizes:
            row[c.replace("size_bits_", "") + "_Mbit"] = g[c].mean() / 1e6
        for c in metrics:
            row[c] = g[c].mean()
            if len(g) > 1 and c.endswith(".ppl"):  # spread over calibration seeds
                row[c + "_std"] = g[c].std(ddof=1)
        rows.append(row)
    table = pd.DataFrame(rows)
    if deploy is not None and not deploy.empty:
        table = table.merge(deploy.rename(columns={"file_type": "gguf_type"}), on="model", how="left")
    table["_f"] = table["family"].map(order).fillna(3)
    table["_b"] = -pd.to_numeric(table["bits"], errors="coerce").fillna(0)
    return table.sort_values(["_f", "params", "_b", "model"]).drop(columns=["_f", "_b"]).reset_index(drop=True)


def _provenance(results: Path, df) -> dict:
    """Device, library versions and evaluation wall time, from the records themselves (the newest one's device and
    versions; files that are not readable records were named in a warning by load_records and are skipped)."""
    newest = df.sort_values("created").iloc[-1]
    record = {}
    for p in sorted(results.glob("*.json")):
        try:
            r = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(r, dict) and r.get("id") == newest["id"]:
            record = r
            break
    return {"device": record.get("device"), "versions": record.get("versions"),
            "records": len(df), "eval_wall_s": float(df["wall_time_s"].fillna(0).sum())}


def _markdown(table, manifest: SuiteManifest, provenance: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in (provenance.get("versions") or {}).items())
    lines = [f"{MD_MARK} {__version__}: `quantlm suite --report` rewrites this file -->",
             f"# Suite `{manifest.name}`", "",
             "Sizes in Mbit under the paper, exact and entropy conventions (`quantlm size`; QuantLMs packed in "
             "the compressed-tensors layout, TriLMs at 1.6 bits per weight). QuantLM metrics are the mean over "
             "calibration seeds (`_std`: their standard deviation over seeds). With deploy jobs: `gguf_type`, "
             "`gguf_bytes` (the GGUF file llama.cpp ran), `decode_tok_s` (greedy decoding at batch 1), "
             "`prompt_tok_s` and `rss_mb` (the process's peak resident memory) from `quantlm bench` (one seed "
             "per QuantLM).", "",
             f"Produced by `quantlm suite` ({provenance.get('records')} result records, "
             f"{provenance.get('eval_wall_s', 0):.0f} s of evaluation) on {provenance.get('device')}; {versions}.", ""]
    if provenance.get("ignored"):
        lines += [f"Records left out (not jobs of this manifest as it stands): {', '.join(provenance['ignored'])}.", ""]
    cols = list(table.columns)
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for _, r in table.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if isinstance(v, float):
                cells.append("" if v != v else f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _figures(df, results: Path, deploy=None):
    """The records to draw (with each model's llama.cpp figures when there are deploy records) and the figures:
    (metric, file stem under ``results``, x axis)."""
    speed = deploy is not None and not deploy.empty
    if speed:  # every record of a model gets its llama.cpp figures (measured once per model)
        df = df.merge(deploy[["model", "decode_tok_s", "rss_mb"]], on="model", how="left")
    figures = []
    for metric in [c for c in _metric_columns(df) if c.endswith(".ppl")][:2] + (
            ["commonsense_avg"] if "commonsense_avg" in df.columns and df["commonsense_avg"].notna().any() else []):
        slug = metric.replace(".", "_")
        figures += [(metric, results / f"size_vs_{slug}", "size_bits_paper"),
                    (metric, results / f"params_vs_{slug}", "params")]
        if speed and metric.endswith(".ppl"):
            figures += [(metric, results / f"decode_vs_{slug}", "decode_tok_s"),
                        (metric, results / f"memory_vs_{slug}", "rss_mb")]
    return df, figures
