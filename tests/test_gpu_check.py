"""bench/gpu_check.sh's CPU dry mode, so the GPU script cannot rot where no GPU is (CI, most sessions): the shell script
itself, every stage, and what a failing stage leaves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = ["1-env", "2-tests", "3-gptq", "4-train", "5-peers"]


def _check(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    cmd = ["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", *args]
    return subprocess.run(cmd, cwd=REPO, env=full, capture_output=True, text=True, timeout=900)


def _stage(out: Path, name: str) -> dict:
    return json.loads((out / f"gpu_check_dry.{name}.json").read_text())


def test_gpu_check_dry_run_runs_every_stage(tmp_path):
    """The shell script as the device runs it (its probe included), all five stages CPU-sized, each writing its file."""
    proc = _check(tmp_path)
    assert proc.returncode == 0, (proc.stderr[-3000:], (tmp_path / "gpu_check_dry.log").read_text()[-3000:])
    log = (tmp_path / "gpu_check_dry.log").read_text()
    assert "=== probe" in log and "torch" in log
    md = (tmp_path / "gpu_check_dry.md").read_text()
    assert md == proc.stdout
    for i, name in enumerate(STAGES, 1):
        assert f"| {i} {name.split('-')[1]} | ok |" in md, md
        assert _stage(tmp_path, name)["stage"] == name.split("-")[1]
    env = _stage(tmp_path, "1-env")["env"]
    assert env["torch"] == __import__("torch").__version__ and "transformers" in env["packages"]
    tests = _stage(tmp_path, "2-tests")
    assert tests["returncode"] == 0 and tests["counts"]["skipped"] >= 5 and tests["counts"]["failure"] == 0
    gptq = _stage(tmp_path, "3-gptq")["rows"]
    assert [r["job"] for r in gptq] == ["quantlm fast (bf16 fwd, tf32 H)", "quantlm exact (fp32)"]
    fast, exact = gptq
    assert len(exact["block_seconds"]) == exact["blocks"] == 1 and exact["predicted_host_peak_bytes"] > 0
    assert fast["activation_dtype"] == "bfloat16" and exact["activation_dtype"] == "float32"
    train = _stage(tmp_path, "4-train")["rows"]
    assert train[0]["tokens_per_s"] > 0
    peers = _stage(tmp_path, "5-peers")["rows"]
    ref = next(r for r in peers if r["job"].startswith("reference GPTQ"))
    # the reference GPTQ (written from the paper) and quantlm agree on the same weights and windows
    assert abs(ref["layer_error"] - exact["layer_error"]) <= 0.02 * exact["layer_error"]
    assert abs(fast["layer_error"] - exact["layer_error"]) <= 0.05 * exact["layer_error"]
    llmc = next(r for r in peers if r["job"].startswith("llm-compressor"))
    assert "skipped" in llmc or abs(llmc["layer_error"] - exact["layer_error"]) <= 0.1 * exact["layer_error"]
    assert "| quantlm exact (fp32) |" in md and "reference GPTQ" in md and "trainer (" in md


def test_a_failed_stage_keeps_the_others_and_is_named(tmp_path):
    """Stage 3 killed by its timeout: stage 1's file stays, stage 5 still runs, the exit code and the table say so."""
    proc = _check(tmp_path, "--skip", "tests,4", TIMEOUT_GPTQ="1")
    assert proc.returncode == 1
    assert "FAILED stages: 3-gptq" in proc.stderr
    md = (tmp_path / "gpu_check_dry.md").read_text()
    assert "| 1 env | ok |" in md and "| 3 gptq | TIMEOUT" in md and "| 5 peers | ok |" in md
    assert "| 2 tests | skipped (--skip) |" in md and "| 4 train | skipped (--skip) |" in md
    assert _stage(tmp_path, "1-env")["env"]["torch"]
    assert any(r["job"].startswith("reference") for r in _stage(tmp_path, "5-peers")["rows"])
    assert not (tmp_path / "gpu_check_dry.2-tests.json").exists()


def test_gpu_check_refuses_unknown_arguments(tmp_path):
    proc = _check(tmp_path, "--frobnicate")
    assert proc.returncode == 2 and "unknown argument: --frobnicate" in proc.stderr
