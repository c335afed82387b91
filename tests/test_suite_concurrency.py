"""A suite run by a scheduler: several real processes on one output (disjoint ``--only`` tasks, the shipped Slurm
array's command lines), then ``--report``, give the table one sequential run gives; a job another live process
holds is left to it; a job whose input job has not finished names the job to run first."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from quantlm import locks, suite
from quantlm.paths import recipes_dir

REPO = Path(__file__).resolve().parent.parent


def _manifest(ws: Path, model: Path, out: str) -> Path:
    body = {"kind": "suite", "name": "sched", "output": out,
            "models": [{"name": "floatlm-t", "family": "floatlm", "path": str(model)}], "bits": [3, 4],
            "group_size": {3: 4, 4: 4}, "seeds": [0],
            "quant": {"calibration": {"nsamples": 4, "seqlen": 32}},
            "eval": {"ppl": ["wikitext2"], "window": 32, "ppl_limit_windows": 4}}
    path = ws / f"{out}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _env(ws: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "QUANTLM_CACHE": str(ws / ".cache")}
    shim = ws / "bin"  # `quantlm` on PATH, run by this interpreter (the Slurm script calls it by name)
    if not (shim / "quantlm").is_file():  # written once: rewriting it while a task execs it is "Text file busy"
        shim.mkdir(exist_ok=True)
        (shim / "quantlm").write_text(f"#!/bin/sh\nexec {sys.executable} -m quantlm \"$@\"\n")
        (shim / "quantlm").chmod(0o755)
    env["PATH"] = f"{shim}{os.pathsep}{env.get('PATH', '')}"
    return env


def _cli(ws: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantlm", *args], cwd=ws, env=_env(ws), capture_output=True,
                          text=True, timeout=600)


def _together(ws: Path, commands: list[list[str]], env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """Start every command at once; wait for all."""
    procs = [subprocess.Popen(c, cwd=ws, env=env or _env(ws), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in commands]
    out = []
    for p, c in zip(procs, commands, strict=True):
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(c, p.returncode, stdout, stderr))
    return out


def _table(ws: Path, manifest: Path) -> pd.DataFrame:
    table = suite.report(*suite.load_manifest(manifest), plots=False)["table"]
    return table[[c for c in table.columns if not c.startswith("wall")]].reset_index(drop=True)


@pytest.fixture
def ws(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QUANTLM_CACHE", str(tmp_path / ".cache"))
    return tmp_path


def test_disjoint_only_processes_and_the_slurm_array_match_one_sequential_run(ws, tiny_model_dir):
    # one sequential run: the reference table
    seq = _manifest(ws, tiny_model_dir, "seq")
    summary = suite.run(*suite.load_manifest(seq), progress=False)
    assert len(summary.done) == 5 and not summary.failed
    reference = _table(ws, seq)
    assert len(reference) == 3

    # three processes at once on disjoint --only patterns (each holds a quantize job and the eval that reads it)
    par = _manifest(ws, tiny_model_dir, "par")
    runs = _together(ws, [[sys.executable, "-m", "quantlm", "suite", str(par), "--only", pat, "--no-progress"]
                          for pat in ("eval/floatlm-t", "*-3bit-s0", "*-4bit-s0")])
    assert [p.returncode for p in runs] == [0, 0, 0], [p.stderr[-600:] for p in runs]
    assert "in use" not in "".join(p.stderr for p in runs)
    pd.testing.assert_frame_equal(_table(ws, par), reference)
    status = json.loads((ws / "par" / "suite-status.json").read_text())
    assert status["pending"] == [] and sorted(status["done"]) == sorted(j.id for j in suite.plan(
        *suite.load_manifest(par)))

    # the README's Slurm workflow: the shipped script's command lines, one wave per job kind, tasks of a wave at once
    arr = _manifest(ws, tiny_model_dir, "arr")
    script = ws / "slurm-suite.sh"
    shutil.copy(recipes_dir() / "slurm-suite.sh", script)
    jobs = [j.id for j in suite.plan(*suite.load_manifest(arr))]  # what --list-jobs prints
    for kind in ("train", "quantize", "eval"):  # `grep ^kind/ jobs.txt`, submitted with --dependency=afterok
        wave = [j for j in jobs if j.startswith(f"{kind}/")]
        if not wave:
            continue
        (ws / f"{kind}.txt").write_text("\n".join(wave) + "\n")
        task = ["bash", str(script), str(arr), str(ws / f"{kind}.txt")]  # sbatch --array=1-N slurm-suite.sh ...
        env = _env(ws)
        procs = [subprocess.Popen(task, cwd=ws, env={**env, "SLURM_ARRAY_TASK_ID": str(i)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(1, len(wave) + 1)]
        for p in procs:
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, err
    assert _cli(ws, "suite", str(arr), "--report").returncode == 0
    pd.testing.assert_frame_equal(_table(ws, arr), reference)


def test_a_job_whose_input_has_not_run_names_the_job_to_run_first(ws, tiny_model_dir):
    m = _manifest(ws, tiny_model_dir, "dep")
    r = _cli(ws, "suite", str(m), "--only", "eval/quantlm-t-3bit-s0", "--no-progress")
    assert r.returncode == 1
    assert ("eval/quantlm-t-3bit-s0: needs quantize/quantlm-t-3bit-s0, which has not finished; run it first "
            "(--only quantize/quantlm-t-3bit-s0)") in r.stderr
    assert not (ws / "dep" / "results" / "quantlm-t-3bit-s0.json").exists()


_HOLDER = """
import sys, time
from quantlm import locks
with locks.hold(sys.argv[1], "suite job"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_job_another_live_process_holds_is_left_to_it(ws, tiny_model_dir):
    m = _manifest(ws, tiny_model_dir, "busy")
    jobs = {j.id: j for j in suite.plan(*suite.load_manifest(m))}
    held = jobs["quantize/quantlm-t-3bit-s0"].out
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(held)], cwd=ws, env=_env(ws),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        only = _cli(ws, "suite", str(m), "--only", "quantize/quantlm-t-3bit-s0", "--no-progress")
        r = _cli(ws, "suite", str(m), "--no-progress")
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 1  # the held job was not done by this process, and its dependent eval could not run
    assert f"quantize/quantlm-t-3bit-s0: left to another process ({held} is in use by another quantlm" in r.stderr
    assert f"(pid {holder.pid} on" in r.stderr
    assert "eval/quantlm-t-3bit-s0: needs quantize/quantlm-t-3bit-s0, which another process is running" in r.stderr
    assert not held.exists()
    # a scheduler task asked for exactly that job: not done here, so not a success
    assert only.returncode == 1 and "quantize/quantlm-t-3bit-s0: left to another process" in only.stderr
    done = [j for j in jobs.values() if suite.job_done(j)]
    assert sorted(j.id for j in done) == ["eval/floatlm-t", "eval/quantlm-t-4bit-s0", "quantize/quantlm-t-4bit-s0"]
    # once the holder is gone, a rerun does the rest (and the stale lock of a dead holder is taken over)
    t0 = time.time()
    r = _cli(ws, "suite", str(m), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert all(suite.job_done(j) for j in jobs.values()) and time.time() - t0 < 300
    assert not locks.lock_path(held).exists()
