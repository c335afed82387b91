"""Running a suite's plan: each job's output appears atomically with its hash inside; a failure is recorded and
does not stop the others; killed and restarted, only unfinished jobs run again. A job that cannot run here (a
deploy job without llama_cpp) is reported as not run, with the reason, and fails nothing.

Locks are per job (``locks.hold(job.out)``), not per suite, so the processes of a scheduler (``--only`` tasks of a
Slurm array, one process per GPU) run side by side on one output. A job another live process holds is left to it
(``RunSummary.elsewhere``); a job whose input job has not finished is blocked with the job to run first. Shared
files (the held-out corpus, ``suite-status.json``) are written under their own short locks."""

from __future__ import annotations

import json
import logging
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

from quantlm import locks, recipes, validate
from quantlm.atomic import write_json, write_text
from quantlm.deploy import INSTALL_HINT, bench, llama_cpp_available
from quantlm.errors import QuantlmError
from quantlm.eval.run import evaluate
from quantlm.outputs import check_dir_writable
from quantlm.quantize import check_recipe, quantize_model
from quantlm.suite.plan import (
    JOB_FILE,
    Job,
    SuiteManifest,
    describe_plan,
    job_done,
    job_status,
    output_root,
    plan,
    select,
)
from quantlm.train.data import heldout_text
from quantlm.train.recipe import TrainRecipe
from quantlm.train.run import train

log = logging.getLogger(__name__)
DEPLOY_SCHEMA = "quantlm.deploy/1"


class JobSkipped(QuantlmError):
    """A job that cannot run in this environment (the reason is its message); it fails nothing."""


def run_job(job: Job, manifest: SuiteManifest, progress: bool = True) -> None:
    """Run one job; its output appears atomically (temp path, then rename) with the job's hash inside.
    ``progress`` shows the job's own progress bars (training steps, blocks, evaluation batches)."""
    stamp = {"id": job.id, "hash": job.hash, "inputs": job.inputs, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if job.kind == "train":

        recipe = recipes.load(job.source, expect=TrainRecipe)
        work = job.out.parent / f".{job.out.name}.train"  # scratch: removed once the checkpoint is in place
        final = train(recipe, work, resume=work.exists(), progress=progress, final_dir=job.out, keep_scratch=False)
        write_json(Path(final) / JOB_FILE, {"suite_job": stamp})
    elif job.kind == "quantize":

        _require_checkpoint(job)
        report = quantize_model(job.source, job.payload["recipe"], job.out, device=manifest.device,
                                overwrite=True, progress=progress)
        write_json(job.out / JOB_FILE, {"suite_job": stamp, "report_summary": _brief(report)})
    elif job.kind == "deploy":

        if not llama_cpp_available():
            import sys

            raise JobSkipped(INSTALL_HINT.format(python=sys.executable))
        _require_checkpoint(job)
        (record,) = bench([job.source], manifest.bench, progress=False, labels=[job.model])
        record.update({"schema": DEPLOY_SCHEMA, "suite": manifest.name, "suite_job": stamp, "family": job.family,
                       "bits": job.bits, "seed": job.seed, "rtn": job.rtn, "preset": job.preset or None})
        write_json(job.out, record)
    else:

        _require_checkpoint(job)
        eval_recipe = manifest.eval
        if job.payload.get("heldout"):
            eval_recipe = replace(eval_recipe, ppl=(*eval_recipe.ppl, job.payload["heldout"]))
        extra = {"suite": manifest.name, "suite_job": stamp, "family": job.family, "preset": job.preset or None,
                 "model": job.model, "bits": job.bits, "seed": job.seed, "rtn": job.rtn}
        record = evaluate(job.source, eval_recipe, results_dir=None, extra=extra, device=manifest.device,
                          progress=progress)
        write_json(job.out, record)


def _materialize_heldout(jobs: list[Job]) -> None:
    """Write the held-out corpus split once, as the text file the eval jobs read (one process writes it)."""
    job = next((j for j in jobs if j.payload.get("heldout")), None)
    if job is None:
        return
    target = Path(job.payload["heldout"])
    with locks.hold(target, "held-out corpus", wait=3600):  # another process may be writing it
        if not target.is_file():
            write_text(target, heldout_text(recipes.load(job.payload["heldout_recipe"], expect=TrainRecipe)))


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
    not_run: dict[str, str] = field(default_factory=dict)  # could not run here (JobSkipped): id -> reason
    elsewhere: dict[str, str] = field(default_factory=dict)  # held by another live process: id -> its holder
    rerun: dict[str, str] = field(default_factory=dict)  # ran again because an input changed: id -> which


def run(manifest: SuiteManifest, base: Path, *, only: list[str] | None = None, progress: bool = True) -> RunSummary:
    """Run every unfinished job (or those matching ``only``); failures are recorded, never fatal to the rest."""
    from tqdm.auto import tqdm

    jobs = plan(manifest, base)
    chosen = select(jobs, only)
    root = output_root(manifest)
    check_dir_writable(root, "suite output", need_bytes=_bytes_to_write(manifest, base, chosen))
    for src in sorted({j.source for j in chosen if j.kind != "train" and j.source is not None and not j.needs}):
        # the checkpoints the manifest names are checked before any job runs, not when their turn comes
        _require_checkpoint(Job(f"model {src.name}", "eval", src.name, "", src, "", source=src))
        validate.check_checkpoint(src)
    for job in chosen:  # what config.json decides about each quantization, before the first job
        if job.kind == "quantize" and not job.needs:
            try:
                check_recipe(job.source, job.payload["recipe"])
            except QuantlmError as e:
                raise QuantlmError(f"{job.id}: {e}") from None
    summary = RunSummary()
    by_id = {j.id: j for j in jobs}
    _materialize_heldout(chosen)
    bar = tqdm(chosen, desc=f"suite {manifest.name}", unit="job", disable=not progress)
    for job in bar:
        bar.set_postfix_str(job.id)
        done, why = job_status(job)
        if done:
            summary.skipped.append(job.id)
            continue
        blocker = _blocker(job, by_id, summary)
        if blocker:
            summary.blocked[job.id] = blocker
            continue
        t0 = time.perf_counter()
        try:
            with locks.hold(job.out, f"suite job {job.id}"):
                if job_done(job):  # finished by another process since the plan was read
                    summary.skipped.append(job.id)
                    continue
                if why != "not run yet":
                    summary.rerun[job.id] = why
                    log.warning("%s runs again: %s", job.id, why)
                run_job(job, manifest, progress)
        except KeyboardInterrupt:
            raise
        except locks.LockBusy as e:
            summary.elsewhere[job.id] = str(e)
            log.info("%s is running in another process: %s", job.id, e)
            continue
        except JobSkipped as e:
            summary.not_run[job.id] = str(e)
            log.info("%s not run: %s", job.id, e)
            continue
        except Exception as e:  # noqa: BLE001 - one job's failure must not stop the suite
            summary.failed[job.id] = f"{type(e).__name__}: {e}"
            log.error("%s failed: %s", job.id, e)
            log.debug("%s", traceback.format_exc())
            continue
        log.info("%s done in %.1f s", job.id, time.perf_counter() - t0)
        summary.done.append(job.id)
    _write_status(root, manifest, jobs, summary)
    return summary


def _blocker(job: Job, by_id: dict[str, Job], summary: RunSummary) -> str:
    """Why ``job`` cannot run now (an input job failed, runs elsewhere or has not run), naming that job; or ""."""
    for need in job.needs:
        if need in summary.failed or need in summary.blocked:
            return f"needs {need}, which {'failed' if need in summary.failed else 'is blocked'}"
        if need in summary.elsewhere:
            return f"needs {need}, which another process is running; run {job.id} once it has finished"
        if not job_done(by_id[need]):
            return f"needs {need}, which has not finished; run it first (--only {need})"
    return ""


def _write_status(root: Path, manifest: SuiteManifest, jobs: list[Job], summary: RunSummary) -> None:
    """``suite-status.json``: this run's outcome per job merged into what earlier or concurrent runs recorded."""
    path = root / "suite-status.json"
    outcome = {"done": summary.done, "skipped": summary.skipped, "failed": summary.failed,
               "blocked": summary.blocked, "not_run": summary.not_run, "elsewhere": summary.elsewhere}
    with locks.hold(path, "suite status", wait=60):
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        mine = {j for v in outcome.values() for j in v}
        status = {"suite": manifest.name}
        for key, ids in outcome.items():
            kept = old.get(key, {} if isinstance(ids, dict) else [])
            if isinstance(ids, dict):
                kept = {k: v for k, v in dict(kept).items() if k not in mine}
                status[key] = {**kept, **ids}
            else:
                status[key] = [k for k in kept if k not in mine] + list(ids)
        done_now = {j.id for j in jobs if job_done(j)}
        for key in ("failed", "blocked", "not_run", "elsewhere"):  # outcomes a later run has overtaken
            status[key] = {k: v for k, v in status[key].items() if k not in done_now}
        status["pending"] = [j.id for j in jobs if j.id not in done_now]
        write_json(path, status)


def _bytes_to_write(manifest: SuiteManifest, base: Path, chosen: list[Job]) -> int:
    """The plan's disk estimate for the jobs still to run (what the free-space check needs)."""
    ids = {j.id for j in chosen}
    return int(sum((r.get("disk_GB") or 0.0) * 1e9 for r in describe_plan(manifest, base)
                   if r["job"] in ids and not r["done"]))


