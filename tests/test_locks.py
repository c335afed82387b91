"""Locks: one holder at a time, stale locks of dead processes taken over, clear errors naming the holder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quantlm import locks
from quantlm.errors import QuantlmError
from quantlm.outputs import hostname

REPO = Path(__file__).resolve().parent.parent


def _holder_process(directory: Path):
    script = ("import sys, time\nfrom quantlm import locks\n"
              f"with locks.hold({str(directory)!r}, 'suite'):\n    print('held', flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_is_exclusive_names_its_holder_and_goes_away(tmp_path):
    out = tmp_path / "suite"
    proc = _holder_process(out)
    try:
        holder = locks.read_holder(locks.lock_path(out))
        assert holder["pid"] == proc.pid and holder["host"] == hostname()
        with pytest.raises(QuantlmError, match=rf"in use by another quantlm suite \(pid {proc.pid} on .* delete "):
            locks.acquire(out, "suite")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert not out.exists()  # the directory itself is never touched


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    proc = _holder_process(out)
    proc.kill()  # SIGKILL: no clean-up, the lock file stays
    proc.wait(timeout=30)
    assert locks.lock_path(out).is_file()
    with caplog.at_level("WARNING"), locks.hold(out, "train") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text and not locks.lock_path(out).exists()


def test_lock_of_another_host_is_respected_and_nesting_works(tmp_path):
    out = tmp_path / "run"
    path = locks.lock_path(out)
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x", "command": "quantlm suite"}))
    with pytest.raises(QuantlmError, match="on elsewhere"):
        locks.acquire(out)
    path.unlink()
    with locks.hold(out), locks.hold(out):
        assert path.is_file()
    assert not path.exists()
    other = tmp_path / "other"
    with locks.hold(other):
        locks.lock_path(other).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    assert locks.lock_path(other).is_file()  # never removes a lock another process holds now
