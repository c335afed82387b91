"""bench/gpu_check.sh's CPU dry mode, so the GPU script cannot rot where no GPU is (CI, most sessions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run(tmp_path):
    """The shell script itself, as the device runs it (its environment probe included), in its CPU dry mode."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    cmd = ["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--skip", "train"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = (tmp_path / "gpu_check_dry.env.txt").read_text()
    assert "torch" in probe and (tmp_path / "gpu_check_dry.md").read_text() == proc.stdout
    rows = json.loads((tmp_path / "gpu_check_dry.json").read_text())["rows"]
    jobs = [(r["shape"], r["job"]) for r in rows]
    assert len(jobs) == 7 and sum("reference" in j for _, j in jobs) == 2
    exact, fast, ref = rows[0], rows[1], rows[2]
    # the reference GPTQ (written from the paper) and quantlm agree on the same weights and windows
    assert abs(ref["layer_error"] - exact["layer_error"]) <= 0.02 * exact["layer_error"]
    assert abs(fast["layer_error"] - exact["layer_error"]) <= 0.05 * exact["layer_error"]
    assert "| quantlm exact (fp32) |" in proc.stdout


def test_gpu_check_script_passes_its_arguments():
    text = (REPO / "bench" / "gpu_check.sh").read_text()
    assert "bench_gpu.py" in text and '"$@"' in text
