"""The suite manifest and its plan: every job (train, quantize, eval, deploy) with its output and the hash of its
inputs.

A job's hash covers only what changes its output (for a quantization: the GPTQ math, its calibration windows
including the one seed, round-to-nearest or not, and the source checkpoint), so adding a seed or a bitwidth
to a manifest adds jobs without invalidating finished ones. With ``deploy``, every model (one seed per QuantLM)
also gets a deploy job that runs it in llama.cpp (``quantlm.deploy``); the QuantLMs are then also written packed
(compressed-tensors), which the deploy job exports to GGUF with their exact codes.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from quantlm import accounting as acc
from quantlm import paths, recipes
from quantlm.deploy import BenchSettings
from quantlm.errors import QuantlmError
from quantlm.eval.recipe import EvalRecipe
from quantlm.gptq.memory import MemorySettings, plan_memory
from quantlm.quantize import ExportSettings, QuantRecipe
from quantlm.quantized import check_bits
from quantlm.recipes import doc, recipe_hash, to_dict
from quantlm.specs import get_preset, is_preset, spectra_group_size

log = logging.getLogger(__name__)

JOB_FILE = "quantlm-job.json"
DEPLOY_SOURCE = "compressed-tensors"  # the packed QuantLM export a deploy job converts to GGUF (exact codes)


@dataclass(frozen=True)
class SuiteModel:
    """One FloatLM or TriLM of the suite."""

    name: str = doc("label in tables and plots, e.g. floatlm-99m")
    family: Literal["floatlm", "trilm"] = doc("floatlm (quantized at every bitwidth) or trilm (evaluated as is)")
    preset: str = doc("preset for the paper-convention size; empty: sized from the checkpoint alone", "")
    path: str = doc("checkpoint directory, relative to the working directory; empty: <output>/models/<name>", "")
    train: str = doc("train recipe YAML that produces the checkpoint when it does not exist yet (beside the "
                     "manifest, in the working directory, or a shipped recipe name)", "")


@dataclass(frozen=True)
class SuiteManifest:
    """Everything a suite run needs: models, bitwidths, the quant recipe, seeds, evaluations and outputs."""

    name: str = doc("suite name")
    models: tuple[SuiteModel, ...] = doc("FloatLMs and TriLMs of the suite")
    output: str = doc("output root, relative to the working directory", "runs/suite")
    bits: tuple[int, ...] = doc("QuantLM bitwidths", (3, 4, 6, 8))
    group_size: dict[int, int] = doc("group size per bitwidth (-1: per-channel)", default_factory=lambda: {
        b: spectra_group_size(b) for b in (3, 4, 6, 8)})
    quant: QuantRecipe = doc("GPTQ recipe shared by every QuantLM (bits, group size and seed set per job; the "
                             "suite writes the unpacked format, and compressed-tensors for deploy jobs)", QuantRecipe())
    seeds: tuple[int, ...] = doc("calibration seeds of every QuantLM (Spectra averages over 3)", (0, 1, 2))
    eval: EvalRecipe = doc("evaluation of every model", EvalRecipe())
    rtn_baseline: bool = doc("also export round-to-nearest QuantLMs (a baseline for GPTQ)", False)
    device: str = doc("compute device for quantization and evaluation (cpu, cuda)", "cpu")
    heldout_ppl: str = doc("train recipe YAML whose held-out corpus split is added to the perplexity datasets "
                           "(as corpus-heldout)", "")
    deploy: bool = doc("also run every model in llama.cpp: decode and prompt tokens/s, peak memory, GGUF bytes "
                       "(jobs are skipped, with the reason, where llama_cpp is not importable)", False)
    bench: BenchSettings = doc("how llama.cpp runs each model (with deploy)", BenchSettings())

    def __post_init__(self):
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise QuantlmError(f"suite {self.name}: model names must be unique, got {names}")
        if not self.models:
            raise QuantlmError(f"suite {self.name}: no models listed")

        for b in self.bits:
            check_bits(b, f"suite {self.name}: bits")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise QuantlmError(f"suite {self.name}: seeds must be a non-empty list of distinct integers")

    def quant_recipe(self, bits: int, seed: int) -> QuantRecipe:
        """The recipe of one quantize job: the shared one at this bitwidth and seed, written unpacked."""
        recipe = self.quant.with_bits(bits, self.group_size.get(bits, spectra_group_size(bits)))
        formats = ("unpacked", DEPLOY_SOURCE) if self.deploy else ("unpacked",)
        return replace(recipe, calibration=replace(recipe.calibration, seed=seed), export=ExportSettings(formats))


def quantize_job_hash(recipe: QuantRecipe, source: str) -> str:
    """What determines a quantization's weights: the method and its math, the calibration (seed included), the
    source, and the activation/forward dtypes where they are not the fp32 defaults (where activations live does
    not). GPTQ and RTN without transforms hash as they did before methods were named (finished jobs stay done)."""

    numerics = {k: getattr(recipe.memory, k) for k in ("activation_dtype", "forward_dtype")
                if getattr(recipe.memory, k) != getattr(MemorySettings(), k)}
    gptq = to_dict(recipe.gptq)
    method, transforms = gptq.pop("method"), gptq.pop("transforms")
    if method not in ("gptq", "rtn") or transforms:
        numerics = {**numerics, "method": method, "transforms": list(transforms)}
    parts = ("quantize", gptq, to_dict(recipe.calibration), method == "rtn", source)
    return _hash(*parts, numerics) if numerics else _hash(*parts)


@dataclass(frozen=True)
class Job:
    id: str
    kind: Literal["train", "quantize", "eval", "deploy"]
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
    """The manifest (a path or a shipped name) and the folder its train recipes are looked up in first."""
    path = paths.resolve_input(path)
    return recipes.load(path, expect=SuiteManifest), path.resolve().parent


def _hash(*parts) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _quant_name(model: SuiteModel, bits: int, rtn: bool) -> str:
    base = model.name.replace("floatlm", "quantlm", 1) if model.name.startswith("floatlm") else f"{model.name}-q"
    return f"{base}-{bits}bit" + ("-rtn" if rtn else "")


def output_root(manifest: SuiteManifest) -> Path:
    """Where a suite writes: its ``output``, relative to the working directory (never the install)."""
    return paths.resolve_output(manifest.output).resolve()


def plan(manifest: SuiteManifest, base: Path) -> list[Job]:
    """Every job of the suite, in an order that satisfies dependencies."""
    root = output_root(manifest)
    jobs: list[Job] = []
    eval_hash = recipe_hash(manifest.eval)
    heldout = {}
    if manifest.heldout_ppl:
        recipe_path = paths.resolve_input(manifest.heldout_ppl, base).resolve()
        heldout = {"heldout": str(root / "data" / "corpus-heldout.txt"), "heldout_recipe": str(recipe_path)}
        eval_hash = _hash(eval_hash, _file_digest(recipe_path))
    for m in manifest.models:
        ckpt = paths.resolve_output(m.path).resolve() if m.path else root / "models" / m.name
        producer: tuple[str, ...] = ()
        if m.train:
            train_path = paths.resolve_input(m.train, base).resolve()
            tid = f"train/{m.name}"
            jobs.append(Job(tid, "train", m.name, m.family, ckpt, _hash("train", _file_digest(train_path)),
                            source=train_path, preset=m.preset))
            producer = (tid,)
        # a trained checkpoint's hash follows its recipe; a given one is identified by its path
        src_hash = jobs[-1].hash if producer else str(ckpt)
        jobs.append(Job(f"eval/{m.name}", "eval", m.name, m.family, root / "results" / f"{m.name}.json",
                        _hash("eval", eval_hash, src_hash), producer, ckpt, preset=m.preset, payload=heldout))
        if manifest.deploy:
            jobs.append(_deploy_job(manifest, root, m.name, m.family, src_hash, producer, ckpt, preset=m.preset))
        if m.family != "floatlm":
            continue
        for bits in manifest.bits:
            for rtn in (False, True) if manifest.rtn_baseline else (False,):
                for seed in (manifest.seeds if not rtn else manifest.seeds[:1]):
                    recipe = manifest.quant_recipe(bits, seed)
                    if rtn:
                        recipe = replace(recipe, gptq=replace(recipe.gptq, method="rtn"))
                    qname = _quant_name(m, bits, rtn)
                    label = f"{qname}-s{seed}"
                    qhash = quantize_job_hash(recipe, src_hash)
                    qid = f"quantize/{label}"
                    qdir = root / "quantlm" / label
                    qpreset = f"quantlm-{m.preset.split('-', 1)[1]}-{bits}bit" if m.preset.startswith("floatlm-") else ""
                    jobs.append(Job(qid, "quantize", qname, "quantlm", qdir, qhash, producer, ckpt, bits, seed,
                                    qpreset, rtn, {"recipe": recipe}))
                    jobs.append(Job(f"eval/{label}", "eval", qname, "quantlm", root / "results" / f"{label}.json",
                                    _hash("eval", eval_hash, qhash), (qid,), qdir / "unpacked", bits, seed,
                                    qpreset, rtn, heldout))
                    if manifest.deploy and seed == manifest.seeds[0]:  # speed and memory do not depend on the seed
                        jobs.append(_deploy_job(manifest, root, qname, "quantlm", qhash, (qid,), qdir / DEPLOY_SOURCE,
                                                bits=bits, seed=seed, preset=qpreset, rtn=rtn))
    return jobs


def _deploy_job(manifest: SuiteManifest, root: Path, model: str, family: str, src_hash: str,
                needs: tuple[str, ...], source: Path, **kw) -> Job:
    """Run ``model`` (a checkpoint, exported to GGUF on the fly) in llama.cpp; one record under results/deploy/."""
    return Job(f"deploy/{model}", "deploy", model, family, root / "results" / "deploy" / f"{model}.json",
               _hash("deploy", recipe_hash(manifest.bench), src_hash), needs, source, **kw)


def _file_digest(path: Path) -> str:
    import hashlib

    if not path.is_file():
        raise QuantlmError(f"train recipe {path} does not exist; fix the model's `train:` path in the manifest")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def job_done(job: Job) -> bool:
    """A job is done when its output exists and was produced by the same inputs (same hash); a quantization, when
    every format its recipe writes is there too (a format added later, e.g. for deploy, is then written)."""
    marker = job.out if job.kind in ("eval", "deploy") else job.out / JOB_FILE
    if not marker.is_file():
        return False
    if job.kind == "quantize" and not all((job.out / f).is_dir() for f in job.payload["recipe"].export.formats):
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


# ----------------------------------------------------------------------------------------------- dry run

def describe_plan(manifest: SuiteManifest, base: Path) -> list[dict]:
    """The plan with each model's size under the paper and exact conventions and its expected disk usage.

    Sizes come from presets (or config.json files where a checkpoint exists); no weights are read.
    """
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
        if job.kind == "quantize":
            row["peak_mem_GB"] = _job_peak_memory(job, manifest)
        rows.append(row)
    return rows


def _job_peak_memory(job: Job, manifest: SuiteManifest) -> float | None:
    """The predicted peak host memory of a quantize job (its memory plan), from the checkpoint's config.json or,
    before the model exists, its preset's."""
    recipe = job.payload["recipe"]
    cfg_path = job.source / "config.json" if job.source is not None else None
    if cfg_path is not None and cfg_path.is_file():
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    elif job.preset and is_preset(job.preset.replace("quantlm-", "floatlm-").rsplit("-", 1)[0]):
        config = get_preset(job.preset.replace("quantlm-", "floatlm-").rsplit("-", 1)[0]).to_hf_config().to_dict()
    else:
        return None
    g, c = recipe.gptq, recipe.calibration
    try:
        p = plan_memory(config, c.nsamples, c.seqlen, recipe.memory, g.bits, g.group_size, manifest.device,
                        true_sequential=g.true_sequential)
    except QuantlmError:
        return None
    return p["predicted_peak_bytes"] / 1e9


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


