"""A whole suite: FloatLMs (trained or given) x bitwidths x calibration seeds, quantized, sized, evaluated, plotted.

The manifest (``kind: suite`` YAML) names the models; ``plan`` turns it into jobs (train, quantize, eval), each
with an output whose ``quantlm-job.json`` records the hash of what produced it. ``run`` skips jobs whose
output exists with a matching hash, runs the rest (a failure is recorded and does not stop the others), then
``report`` builds the comparison table and plots from the result records alone. Killed at any point and
restarted, it redoes only unfinished jobs: every output is written to a temporary path and renamed.

Several GPUs or nodes: ``quantlm suite M --list-jobs`` prints job ids; run each with ``--only ID`` from an
existing scheduler (a Slurm array, or one process per GPU), then ``quantlm suite M --report``.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from quantlm.errors import QuantlmError
from quantlm.eval.recipe import EvalRecipe
from quantlm.recipes import QuantRecipe, doc, recipe_hash, to_dict

log = logging.getLogger(__name__)

JOB_FILE = "quantlm-job.json"
DEFAULT_GROUPS = {2: 128, 3: 128, 4: 128, 5: -1, 6: -1, 7: -1, 8: -1}


@dataclass(frozen=True)
class SuiteModel:
    """One FloatLM or TriLM of the suite."""

    name: str = doc("label in tables and plots, e.g. floatlm-99m")
    family: Literal["floatlm", "trilm"] = doc("floatlm (quantized at every bitwidth) or trilm (evaluated as is)")
    preset: str = doc("preset for the paper-convention size; empty: sized from the checkpoint alone", "")
    path: str = doc("checkpoint directory; relative to the manifest's folder; empty: <output>/models/<name>", "")
    train: str = doc("train recipe YAML that produces the checkpoint when it does not exist yet", "")


@dataclass(frozen=True)
class SuiteManifest:
    """Everything a suite run needs: models, bitwidths, the quant recipe, seeds, evaluations and outputs."""

    name: str = doc("suite name")
    models: tuple[SuiteModel, ...] = doc("FloatLMs and TriLMs of the suite")
    output: str = doc("output root, relative to the manifest's folder", "runs/suite")
    bits: tuple[int, ...] = doc("QuantLM bitwidths", (3, 4, 6, 8))
    group_size: dict[int, int] = doc("group size per bitwidth (-1: per-channel)", default_factory=lambda: {
        3: 128, 4: 128, 6: -1, 8: -1})
    quant: QuantRecipe = doc("GPTQ recipe shared by every QuantLM (bits and group size set per job)", QuantRecipe())
    eval: EvalRecipe = doc("evaluation of every model", EvalRecipe())
    rtn_baseline: bool = doc("also export round-to-nearest QuantLMs (a baseline for GPTQ)", False)
    device: str = doc("compute device for quantization and evaluation (cpu, cuda)", "cpu")
    heldout_ppl: str = doc("train recipe YAML whose held-out corpus split is added to the perplexity datasets "
                           "(as corpus-heldout)", "")

    def __post_init__(self):
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise QuantlmError(f"suite {self.name}: model names must be unique, got {names}")
        if not self.models:
            raise QuantlmError(f"suite {self.name}: no models listed")
        for b in self.bits:
            if not 2 <= b <= 8:
                raise QuantlmError(f"suite {self.name}: bits {b} is outside 2..8")

    def quant_recipe(self, bits: int) -> QuantRecipe:
        return replace(self.quant, bits=bits, group_size=self.group_size.get(bits, DEFAULT_GROUPS[bits]))


@dataclass(frozen=True)
class Job:
    id: str
    kind: Literal["train", "quantize", "eval"]
    model: str  # label of the model the job produces or evaluates
    family: str
    out: Path  # output directory (train, quantize) or record file (eval)
    hash: str  # hash of everything that determines the output
    needs: tuple[str, ...] = ()
    source: Path | None = None  # checkpoint the job reads
    bits: int | None = None
    seed: int | None = None
    preset: str = ""
    rtn: bool = False
    payload: dict = field(default_factory=dict, compare=False, hash=False)


def load_manifest(path: str | os.PathLike) -> tuple[SuiteManifest, Path]:
    """The manifest and the folder its relative paths are resolved against."""
    from quantlm import recipes

    path = Path(path)
    return recipes.load(path, expect=SuiteManifest), path.resolve().parent


def _hash(*parts) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _quant_name(model: SuiteModel, bits: int, rtn: bool) -> str:
    base = model.name.replace("floatlm", "quantlm", 1) if model.name.startswith("floatlm") else f"{model.name}-q"
    return f"{base}-{bits}bit" + ("-rtn" if rtn else "")


def plan(manifest: SuiteManifest, base: Path) -> list[Job]:
    """Every job of the suite, in an order that satisfies dependencies."""
    root = (base / manifest.output).resolve()
    jobs: list[Job] = []
    eval_hash = recipe_hash(manifest.eval)
    heldout = {}
    if manifest.heldout_ppl:
        recipe_path = (base / manifest.heldout_ppl).resolve()
        heldout = {"heldout": str(root / "data" / "corpus-heldout.txt"), "heldout_recipe": str(recipe_path)}
        eval_hash = _hash(eval_hash, _file_digest(recipe_path))
    for m in manifest.models:
        ckpt = (base / m.path).resolve() if m.path else root / "models" / m.name
        producer: tuple[str, ...] = ()
        if m.train:
            train_path = (base / m.train).resolve()
            tid = f"train/{m.name}"
            jobs.append(Job(tid, "train", m.name, m.family, ckpt, _hash("train", _file_digest(train_path)),
                            source=train_path, preset=m.preset))
            producer = (tid,)
        # a trained checkpoint's hash follows its recipe; a given one is identified by its path
        src_hash = jobs[-1].hash if producer else str(ckpt)
        jobs.append(Job(f"eval/{m.name}", "eval", m.name, m.family, root / "results" / f"{m.name}.json",
                        _hash("eval", eval_hash, src_hash), producer, ckpt, preset=m.preset, payload=heldout))
        if m.family != "floatlm":
            continue
        for bits in manifest.bits:
            recipe = manifest.quant_recipe(bits)
            for rtn in (False, True) if manifest.rtn_baseline else (False,):
                for seed in (recipe.seeds if not rtn else recipe.seeds[:1]):
                    qname = _quant_name(m, bits, rtn)
                    label = f"{qname}-s{seed}"
                    qhash = _hash("quantize", to_dict(recipe), seed, rtn, src_hash)
                    qid = f"quantize/{label}"
                    qdir = root / "quantlm" / label
                    qpreset = f"quantlm-{m.preset.split('-', 1)[1]}-{bits}bit" if m.preset.startswith("floatlm-") else ""
                    jobs.append(Job(qid, "quantize", qname, "quantlm", qdir, qhash, producer, ckpt, bits, seed,
                                    qpreset, rtn, {"recipe": recipe}))
                    jobs.append(Job(f"eval/{label}", "eval", qname, "quantlm", root / "results" / f"{label}.json",
                                    _hash("eval", eval_hash, qhash), (qid,), qdir / "unpacked", bits, seed,
                                    qpreset, rtn, {**heldout, "group_size": recipe.group_size}))
    return jobs


def _file_digest(path: Path) -> str:
    import hashlib

    if not path.is_file():
        raise QuantlmError(f"train recipe {path} does not exist; fix the model's `train:` path in the manifest")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def job_done(job: Job) -> bool:
    """A job is done when its output exists and was produced by the same inputs (same hash)."""
    marker = job.out if job.kind == "eval" else job.out / JOB_FILE
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("suite_job", {}).get("hash") == job.hash
    except (json.JSONDecodeError, AttributeError):
        return False


def select(jobs: list[Job], only: list[str] | None) -> list[Job]:
    if not only:
        return jobs
    chosen = [j for j in jobs if any(fnmatch.fnmatch(j.id, pat) or j.id == pat for pat in only)]
    if not chosen:
        raise QuantlmError(f"--only {' '.join(only)} matches no job; list them with --list-jobs")
    return chosen


# ----------------------------------------------------------------------------------------------- running

def run_job(job: Job, manifest: SuiteManifest, progress: bool = True) -> None:
    """Run one job; its output appears atomically (temp path, then rename) with the job's hash inside.
    ``progress`` shows the job's own progress bars (training steps, blocks, evaluation batches)."""
    from quantlm.atomic import write_json

    stamp = {"id": job.id, "hash": job.hash, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if job.kind == "train":
        from quantlm import recipes
        from quantlm.train.recipe import TrainRecipe
        from quantlm.train.run import train

        recipe = recipes.load(job.source, expect=TrainRecipe)
        work = job.out.parent / f".{job.out.name}.train"
        final = train(recipe, work, resume=work.exists(), progress=progress)
        write_json(Path(final) / JOB_FILE, {"suite_job": stamp})
        if job.out.exists():
            import shutil

            shutil.rmtree(job.out)
        os.replace(final, job.out)
    elif job.kind == "quantize":
        from quantlm.gptq.api import quantize_model

        _require_checkpoint(job)
        recipe = replace(job.payload["recipe"], formats=("unpacked",))
        report = quantize_model(job.source, recipe, job.out, seed=job.seed, device=manifest.device,
                                overwrite=True, rtn=job.rtn, progress=progress)
        write_json(job.out / JOB_FILE, {"suite_job": stamp, "report_summary": _brief(report)})
    else:
        from quantlm.eval.run import evaluate

        _require_checkpoint(job)
        eval_recipe = manifest.eval
        if job.payload.get("heldout"):
            eval_recipe = replace(eval_recipe, ppl=(*eval_recipe.ppl, job.payload["heldout"]))
        extra = {"suite": manifest.name, "suite_job": stamp, "family": job.family, "preset": job.preset or None,
                 "model": job.model, "bits": job.bits, "seed": job.seed, "rtn": job.rtn, **deployed_sizes(job)}
        record = evaluate(job.source, eval_recipe, results_dir=None, extra=extra, device=manifest.device,
                          progress=progress)
        write_json(job.out, record)


def deployed_sizes(job: Job) -> dict:
    """Sizes of the model as it would be deployed (not as the evaluated checkpoint stores it): FloatLMs in
    fp16, QuantLMs packed (compressed-tensors layout), TriLMs packed at 1.6 bits per weight."""
    from quantlm import accounting as acc

    cfg = job.source / "config.json"
    if job.family == "quantlm":
        b = acc.budget(cfg, bits=job.bits, group_size=job.payload.get("group_size"))
    else:
        b = acc.budget(cfg)
    return {"sizes": {c: float(b.total_bits(c)) for c in acc.CONVENTIONS}, "size_layout": b.layout}


def _materialize_heldout(jobs: list[Job]) -> None:
    """Write the held-out corpus split once, as the text file the eval jobs read."""
    from quantlm.atomic import write_text

    for job in jobs:
        target = job.payload.get("heldout")
        if target and not Path(target).is_file():
            from quantlm import recipes
            from quantlm.train.data import heldout_text
            from quantlm.train.recipe import TrainRecipe

            write_text(target, heldout_text(recipes.load(job.payload["heldout_recipe"], expect=TrainRecipe)))
            return


def _require_checkpoint(job: Job) -> None:
    if job.source is None or not (job.source / "config.json").is_file():
        raise QuantlmError(f"{job.id}: checkpoint {job.source} does not exist; set the model's path or a train recipe")


def _brief(report) -> dict:
    if not isinstance(report, dict):
        return {}
    return {k: v for k, v in report.items() if isinstance(v, (int, float, str))}


@dataclass
class RunSummary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    blocked: dict[str, str] = field(default_factory=dict)


def run(manifest: SuiteManifest, base: Path, *, only: list[str] | None = None, progress: bool = True) -> RunSummary:
    """Run every unfinished job (or those matching ``only``); failures are recorded, never fatal to the rest."""
    from tqdm.auto import tqdm

    from quantlm.atomic import write_json

    jobs = plan(manifest, base)
    chosen = select(jobs, only)
    root = (base / manifest.output).resolve()
    summary = RunSummary()
    _materialize_heldout(chosen)
    bar = tqdm(chosen, desc=f"suite {manifest.name}", unit="job", disable=not progress)
    for job in bar:
        bar.set_postfix_str(job.id)
        if job_done(job):
            summary.skipped.append(job.id)
            continue
        bad = [d for d in job.needs if d in summary.failed or d in summary.blocked]
        if bad:
            summary.blocked[job.id] = f"needs {bad[0]}, which failed"
            continue
        t0 = time.perf_counter()
        try:
            run_job(job, manifest, progress)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - one job's failure must not stop the suite
            summary.failed[job.id] = f"{type(e).__name__}: {e}"
            log.error("%s failed: %s", job.id, e)
            log.debug("%s", traceback.format_exc())
            continue
        log.info("%s done in %.1f s", job.id, time.perf_counter() - t0)
        summary.done.append(job.id)
    write_json(root / "suite-status.json", {
        "suite": manifest.name, "done": summary.done, "skipped": summary.skipped,
        "failed": summary.failed, "blocked": summary.blocked,
        "pending": [j.id for j in jobs if not job_done(j)],
    })
    return summary


# ----------------------------------------------------------------------------------------------- dry run

def describe_plan(manifest: SuiteManifest, base: Path) -> list[dict]:
    """The plan with each model's size under the paper and exact conventions and its expected disk usage.

    Sizes come from presets (or config.json files where a checkpoint exists); no weights are read.
    """
    from quantlm import accounting as acc

    rows = []
    for job in plan(manifest, base):
        size = _job_budget(job, acc)
        row = {"job": job.id, "kind": job.kind, "model": job.model, "family": job.family, "bits": job.bits,
               "seed": job.seed, "done": job_done(job)}
        if size is not None:
            row["params"] = size.params
            row["paper_GB"] = size.total_bits("paper") / 8e9
            row["exact_GB"] = size.total_bits("exact") / 8e9
            if job.kind == "quantize":
                # the unpacked (fp16) export is what the suite writes
                row["disk_GB"] = size.floatlm_equivalent.total_bits("exact") / 8e9 if size.floatlm_equivalent else None
            elif job.kind == "train":
                row["disk_GB"] = size.total_bits("exact") / 8e9
            else:
                row["disk_GB"] = 0.0
        rows.append(row)
    return rows


def _job_budget(job: Job, acc):
    preset = job.preset
    if job.kind == "quantize" or (job.kind == "eval" and job.family == "quantlm"):
        if preset:
            return acc.budget(preset)
        cfg = job.source / "config.json" if job.kind == "quantize" else None
        return acc.budget(cfg, bits=job.bits) if cfg is not None and cfg.is_file() else None
    if preset:
        return acc.budget(preset)
    if job.source is not None and (job.source / "config.json").is_file():
        return acc.budget(job.source / "config.json")
    return None


# ----------------------------------------------------------------------------------------------- report

def report(manifest: SuiteManifest, base: Path, *, plots: bool = True) -> dict:
    """The comparison table (CSV + Markdown) and the plots, from the suite's result records alone."""
    import pandas as pd

    from quantlm.atomic import write_text
    from quantlm.eval.records import load_records

    root = (base / manifest.output).resolve()
    results = root / "results"
    df = load_records(results) if results.is_dir() else pd.DataFrame()
    if df.empty:
        raise QuantlmError(f"no result records under {results}; run the suite first")
    table = comparison_table(df)
    csv_path = write_text(results / "suite_table.csv", table.to_csv(index=False))
    md_path = write_text(results / "suite_table.md", _markdown(table, manifest, _provenance(results, df)))
    out = {"table": table, "csv": csv_path, "markdown": md_path, "plots": []}
    if plots:
        out["plots"] = _plots(df, results)
    return out


def _metric_columns(df) -> list[str]:
    """Perplexities of the corpora, then acc_norm (or acc) of the tasks, then the commonsense average."""
    tasks = {c[: -len(".acc")] for c in df.columns if c.endswith(".acc")}
    keep = [c for c in df.columns if c.endswith(".ppl") and c[: -len(".ppl")] not in tasks]
    for t in sorted(tasks):
        keep.append(f"{t}.acc_norm" if f"{t}.acc_norm" in df.columns else f"{t}.acc")
    if "commonsense_avg" in df.columns:
        keep.append("commonsense_avg")
    return [c for c in keep if df[c].notna().any()]


def comparison_table(df):
    """One row per model (QuantLM seeds averaged, with their standard deviation), ordered by family and size."""
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
    table["_f"] = table["family"].map(order).fillna(3)
    table["_b"] = -pd.to_numeric(table["bits"], errors="coerce").fillna(0)
    return table.sort_values(["_f", "params", "_b", "model"]).drop(columns=["_f", "_b"]).reset_index(drop=True)


def _provenance(results: Path, df) -> dict:
    """Device, library versions and evaluation wall time, from the records themselves."""
    newest = df.sort_values("created").iloc[-1]
    record = next((json.loads(p.read_text()) for p in sorted(results.glob("*.json"))
                   if json.loads(p.read_text()).get("id") == newest["id"]), {})
    return {"device": record.get("device"), "versions": record.get("versions"),
            "records": len(df), "eval_wall_s": float(df["wall_time_s"].fillna(0).sum())}


def _markdown(table, manifest: SuiteManifest, provenance: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in (provenance.get("versions") or {}).items())
    lines = [f"# Suite `{manifest.name}`", "",
             "Sizes in Mbit under the paper, exact and entropy conventions (`quantlm size`; QuantLMs packed in "
             "the compressed-tensors layout, TriLMs at 1.6 bits per weight). QuantLM metrics are the mean over "
             "calibration seeds (`_std`: their standard deviation over seeds).", "",
             f"Produced by `quantlm suite` ({provenance.get('records')} result records, "
             f"{provenance.get('eval_wall_s', 0):.0f} s of evaluation) on {provenance.get('device')}; {versions}.", ""]
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


def _plots(df, results: Path) -> list[Path]:
    from quantlm import plots

    written = []
    for metric in [c for c in _metric_columns(df) if c.endswith(".ppl")][:2] + (
            ["commonsense_avg"] if "commonsense_avg" in df.columns and df["commonsense_avg"].notna().any() else []):
        slug = metric.replace(".", "_")
        written += plots.plot_quality(df, metric, results / f"size_vs_{slug}", x="size_bits_paper")
        written += plots.plot_quality(df, metric, results / f"params_vs_{slug}", x="params")
    return written
