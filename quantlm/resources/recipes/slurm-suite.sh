#!/usr/bin/env bash
# Slurm array template: one suite job per array task, one GPU each. quantlm's own resumability makes
# re-submitting the array safe (finished jobs are skipped). Adapt partition, time and environment.
# This file ships inside the package (quantlm/resources/recipes); copy it and the manifest first:
#
#   R=$(python -c 'from quantlm.paths import recipes_dir; print(recipes_dir())')
#   cp "$R/slurm-suite.sh" "$R/suite-spectra.yaml" .
#   quantlm suite suite-spectra.yaml --list-jobs > jobs.txt
#   sbatch --array=1-$(wc -l < jobs.txt) slurm-suite.sh suite-spectra.yaml jobs.txt
#   # when the array is done:
#   quantlm suite suite-spectra.yaml --report
#
#SBATCH --job-name=quantlm-suite
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%A_%a.out
set -euo pipefail
MANIFEST="$1"
JOBS="$2"
JOB_ID=$(sed -n "${SLURM_ARRAY_TASK_ID}p" "$JOBS")
# A job's dependencies (train before quantize before eval) must have finished: submit the train jobs as
# their own array first (grep ^train/ jobs.txt), then quantize, then eval, with --dependency=afterok.
exec quantlm suite "$MANIFEST" --only "$JOB_ID" --no-progress
