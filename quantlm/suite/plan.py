"""The suite manifest and its plan: every job (train, quantize, eval, deploy) with its output and the hash of its
inputs.

A job's hash covers only what changes its output, by content (``Job.inputs``): for a quantization, the method and
its math, the calibration settings with the one seed and the calibration text's sha256, the source checkpoint's
tensors, config and tokenizer (or, for a trained one, its train recipe and corpus), and quantlm's numerics version;
for an evaluation, the eval recipe and the sha256 of every corpus and task file it reads. Editing an input in place
makes the jobs that read it run again, and the run says which input changed; adding a seed or a bitwidth to a
manifest adds jobs without invalidating finished ones. With ``deploy``, every model (one seed per QuantLM)
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
from quantlm import digests, paths, recipes
from quantlm.calibration import default_calibration_path
from quantlm.deploy import BenchSettings
from quantlm.errors import QuantlmError
from quantlm.eval.datasets import corpus_path
from quantlm.eval.recipe import EvalRecipe
from quantlm.eval.tasks import TASKS, expand_tasks, task_files
from quantlm.gptq.memory import plan_memory
from quantlm.quantize import ExportSettings, QuantRecipe
from quantlm.quantized import check_bits
from quantlm.recipes import doc, recipe_hash, to_dict
from quantlm.specs import get_preset, is_preset, spectra_group_size
from quantlm.train.data import corpus_sources
from quantlm.train.recipe import TrainRecipe
from quantlm.versions import NUMERICS_VERSION

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


# GPTQ options added after job identities were pinned, with their defaults: left out of the hash at the default, so
# a new option never reruns finished jobs that did not use it
_LATER_OPTIONS = {"signed_absmax": False}


def quantize_inputs(recipe: QuantRecipe, source: str) -> dict:
    """What determines a quantization's weights, by content: the method and its math, the calibration settings (seed
    included) and the calibration text's sha256, the source's identity, the activation/forward dtypes where they are
    not the fp32 defaults (where activations live does not), and quantlm's numerics version."""
    m = recipe.memory  # by resolved value: activation_dtype "auto" and its spelled-out dtype are one recipe
    numerics = {k: v for k, v in (("activation_dtype", m.storage_dtype), ("forward_dtype", m.forward_dtype))
                if v != "float32"}
    calibration = to_dict(recipe.calibration)
    data = Path(calibration.pop("data") or default_calibration_path())
    gptq = {k: v for k, v in to_dict(recipe.gptq).items() if not (k in _LATER_OPTIONS and v == _LATER_OPTIONS[k])}
    return {"recipe": _hash("quantize", gptq, calibration, numerics),
            "calibration": _content(data), "source": source, "numerics": NUMERICS_VERSION}


def quantize_job_hash(recipe: QuantRecipe, source: str) -> str:
    """The hash of :func:`quantize_inputs`: a finished quantize job with this hash is still valid."""
    return _hash("quantize", quantize_inputs(recipe, source))


def _content(path: Path) -> str:
    """An input file or folder by content; one that does not exist (yet) by its path."""
    return f"sha256:{digests.tree_sha256(path, persist=True)}" if path.exists() else f"missing:{path}"


def source_identity(ckpt: Path) -> str:
    """A given checkpoint by content (config, tokenizer, tensors); one that does not exist yet by its path."""
    if not (ckpt / "config.json").is_file():
        return f"missing:{ckpt}"
    return f"sha256:{digests.checkpoint_sha256(ckpt, persist=True)}"


def eval_data_identity(recipe: EvalRecipe) -> dict[str, str]:
    """The evaluation data an eval recipe reads, by content: each perplexity corpus and each task's files."""
    out = {}
    for name in recipe.ppl:
        try:
            out[f"ppl:{name}"] = _content(corpus_path(name))
        except QuantlmError:
            out[f"ppl:{name}"] = "missing"
    for name in expand_tasks(recipe.tasks):
        try:
            files = task_files(TASKS[name]) if name in TASKS else []
        except QuantlmError:
            files = []
        out[f"task:{name}"] = (f"sha256:{digests.files_sha256(((f.name, f) for f in files), persist=True)}" if files
                               else "missing")
    return out


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
    inputs: dict = field(default_factory=dict, compare=False, hash=False)  # what ``hash`` covers, by name


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
    """Every job of the suite, in an order that satisfies dependencies, each identified by the content of its
    inputs (``Job.inputs``; ``Job.hash`` is their hash)."""
    root = output_root(manifest)
    jobs: list[Job] = []
    eval_inputs = {"recipe": recipe_hash(manifest.eval), "data": eval_data_identity(manifest.eval),
                   "numerics": NUMERICS_VERSION}
    heldout = {}
    if manifest.heldout_ppl:
        recipe_path = paths.resolve_input(manifest.heldout_ppl, base).resolve()
        heldout = {"heldout": str(root / "data" / "corpus-heldout.txt"), "heldout_recipe": str(recipe_path)}
        eval_inputs["heldout"] = _train_identity(recipe_path)
    for m in manifest.models:
        ckpt = paths.resolve_output(m.path).resolve() if m.path else root / "models" / m.name
        producer: tuple[str, ...] = ()
        if m.train:
            train_path = paths.resolve_input(m.train, base).resolve()
            tid = f"train/{m.name}"
            jobs.append(_job(tid, "train", m.name, m.family, ckpt, {"recipe": _train_identity(train_path),
                             "numerics": NUMERICS_VERSION}, source=train_path, preset=m.preset))
            producer = (tid,)
        else:
            _refuse_output_in_input(root, ckpt, m.name)
        # a trained checkpoint is identified by what trains it; a given one by its content
        src = jobs[-1].hash if producer else source_identity(ckpt)
        jobs.append(_job(f"eval/{m.name}", "eval", m.name, m.family, root / "results" / f"{m.name}.json",
                         {**eval_inputs, "source": src}, producer, ckpt, preset=m.preset, payload=heldout))
        if manifest.deploy:
            jobs.append(_deploy_job(manifest, root, m.name, m.family, src, producer, ckpt, preset=m.preset))
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
                    qid = f"quantize/{label}"
                    qdir = root / "quantlm" / label
                    qpreset = f"quantlm-{m.preset.split('-', 1)[1]}-{bits}bit" if m.preset.startswith("floatlm-") else ""
                    quantize = _job(qid, "quantize", qname, "quantlm", qdir, quantize_inputs(recipe, src), producer,
                                    ckpt, bits, seed, qpreset, rtn, {"recipe": recipe})
                    jobs.append(quantize)
                    jobs.append(_job(f"eval/{label}", "eval", qname, "quantlm", root / "results" / f"{label}.json",
                                     {**eval_inputs, "source": quantize.hash}, (qid,), qdir / "unpacked", bits, seed,
                                     qpreset, rtn, heldout))
                    if manifest.deploy and seed == manifest.seeds[0]:  # speed and memory do not depend on the seed
                        jobs.append(_deploy_job(manifest, root, qname, "quantlm", quantize.hash, (qid,),
                                                qdir / DEPLOY_SOURCE, bits=bits, seed=seed, preset=qpreset, rtn=rtn))
    return jobs


def _job(id: str, kind: str, model: str, family: str, out: Path, inputs: dict, *args, **kw) -> Job:
    return Job(id, kind, model, family, out, _hash(kind, inputs), *args, inputs=inputs, **kw)


def _refuse_output_in_input(root: Path, ckpt: Path, model: str) -> None:
    """A suite never writes into a checkpoint it reads (nor reads one from where its jobs write)."""
    if root == ckpt or ckpt in root.parents:
        raise QuantlmError(f"suite output {root} is inside the checkpoint of model {model} ({ckpt}); set the "
                           "manifest's output: to a folder of its own")
    for sub in ("quantlm", "results"):
        if root / sub == ckpt or root / sub in ckpt.parents:
            raise QuantlmError(f"model {model}'s checkpoint {ckpt} lies where the suite writes its {sub}/; move it "
                               "or set the manifest's output: elsewhere")


def _deploy_job(manifest: SuiteManifest, root: Path, model: str, family: str, src: str,
                needs: tuple[str, ...], source: Path, **kw) -> Job:
    """Run ``model`` (a checkpoint, exported to GGUF on the fly) in llama.cpp; one record under results/deploy/."""
    return _job(f"deploy/{model}", "deploy", model, family, root / "results" / "deploy" / f"{model}.json",
                {"recipe": recipe_hash(manifest.bench), "source": src}, needs, source, **kw)


def _train_identity(path: Path) -> str:
    """A train recipe by content, with the corpus it reads (a corpus edited in place retrains)."""
    if not path.is_file():
        raise QuantlmError(f"train recipe {path} does not exist; fix the model's `train:` path in the manifest")
    try:
        corpus = corpus_sources(recipes.load(path, expect=TrainRecipe).corpus)
    except QuantlmError:
        corpus = []  # the train job itself reports a bad corpus, with its own message
    return _hash(digests.file_sha256(path), [digests.tree_sha256(c, persist=True) for c in corpus])


_WHY = {"recipe": "its recipe changed", "calibration": "the calibration text changed",
        "source": "the checkpoint it reads changed", "data": "the evaluation data changed",
        "heldout": "the held-out corpus changed", "numerics": "quantlm's numerics changed (NUMERICS_VERSION)"}


def job_status(job: Job) -> tuple[bool, str]:
    """Whether a job is done (its output exists, made from the same inputs: same hash; a quantization, with every
    format its recipe writes, so a format added later, e.g. for deploy, is then written) and, if not, why."""
    marker = job.out if job.kind in ("eval", "deploy") else job.out / JOB_FILE
    if not marker.is_file():
        return False, "not run yet"
    try:
        stamp = json.loads(marker.read_text(encoding="utf-8")).get("suite_job", {})
    except (OSError, ValueError, AttributeError):
        return False, f"its record {marker} is unreadable"
    if stamp.get("hash") != job.hash:
        old = stamp.get("inputs")
        if not isinstance(old, dict):
            return False, "it was made by an older quantlm that did not record its inputs by content"
        changed = [_WHY.get(k, f"its {k} changed") for k in job.inputs if old.get(k) != job.inputs[k]]
        return False, "; ".join(changed) or "its inputs changed"
    if job.kind == "quantize":
        missing = [f for f in job.payload["recipe"].export.formats if not (job.out / f).is_dir()]
        if missing:
            return False, f"its {', '.join(missing)} export is missing"
    return True, ""


def job_done(job: Job) -> bool:
    return job_status(job)[0]


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


