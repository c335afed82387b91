"""A whole suite: FloatLMs (trained or given) x bitwidths x calibration seeds, quantized, sized, evaluated, plotted.

The manifest (``kind: suite`` YAML) names the models; ``plan`` turns it into jobs (train, quantize, eval), each
with an output whose ``quantlm-job.json`` records the hash of what produced it. ``run`` skips jobs whose
output exists with a matching hash, runs the rest (a failure is recorded and does not stop the others), then
``report`` builds the comparison table and plots from the result records alone. Killed at any point and
restarted, it redoes only unfinished jobs: every output is written to a temporary path and renamed.

Several GPUs or nodes: ``quantlm suite M --list-jobs`` prints job ids; run each with ``--only ID`` from an
existing scheduler (a Slurm array, or one process per GPU), then ``quantlm suite M --report``.
"""

from quantlm.suite.plan import (
    JOB_FILE,
    Job,
    SuiteManifest,
    SuiteModel,
    describe_plan,
    job_done,
    job_status,
    load_manifest,
    plan,
    quantize_job_hash,
    select,
)
from quantlm.suite.report import comparison_table, report
from quantlm.suite.runner import RunSummary, run, run_job

__all__ = ["JOB_FILE", "Job", "RunSummary", "SuiteManifest", "SuiteModel", "comparison_table", "describe_plan",
           "job_done", "job_status", "load_manifest", "plan", "quantize_job_hash", "report", "run", "run_job", "select"]
