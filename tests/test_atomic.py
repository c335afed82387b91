import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from quantlm import outputs
from quantlm.atomic import atomic_path, write_text
from quantlm.errors import QuantlmError
from quantlm.outputs import output_dir


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = write_text(tmp_path / "a.json", "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_output_dir_appears_only_when_complete(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), output_dir(out) as work:
        (work / "x").write_text("1")
        raise RuntimeError("crash")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with output_dir(out) as work:
        (work / "x").write_text("1")
    assert (out / "x").read_text() == "1"
    with pytest.raises(QuantlmError, match="already exists; choose another --out or pass --overwrite"), \
            output_dir(out):
        pass
    with output_dir(out, overwrite=True) as work:
        (work / "y").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [".quantlm-output", "y"]


# --------------------------------------------------------------------------- never delete what we did not write


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_output_dir_marks_what_it_writes_and_overwrite_replaces_only_marked_or_empty(tmp_path):
    out = tmp_path / "out"
    with output_dir(out) as work:
        (work / "a").write_text("1")
    assert (out / outputs.MARKER).is_file() and outputs.is_quantlm_output(out)
    with output_dir(out, overwrite=True) as work:  # a previous quantlm output: replaced
        (work / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [outputs.MARKER, "b"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with output_dir(empty, overwrite=True) as work:
        (work / "c").write_text("3")
    assert (empty / "c").is_file()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(QuantlmError, match="is not a quantlm output .* choose another --out or empty it"):
        with output_dir(foreign, overwrite=True):
            raise AssertionError("never reached")
    assert (foreign / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mine", "out"]


def test_overwrite_refuses_the_input_its_ancestors_the_cwd_and_home(tmp_path, monkeypatch):
    model = tmp_path / "models" / "floatlm"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    write_text(tmp_path / "models" / outputs.MARKER, "{}")  # even a marked ancestor is refused
    for out, what in ((model, "is the input"), (tmp_path / "models", "contains the input"),
                      (tmp_path, "contains the input")):
        with pytest.raises(QuantlmError, match=what):
            outputs.check_output(out, overwrite=True, protect=[model])
    work = tmp_path / "work" / "sub"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    with pytest.raises(QuantlmError, match="is the working directory"):
        outputs.check_output(".", overwrite=True)
    with pytest.raises(QuantlmError, match="is an ancestor of the working directory"):
        outputs.check_output("..", overwrite=True)
    home = tmp_path / "home" / "alice"
    home.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(QuantlmError, match="is a home directory"):
        outputs.check_output(home, overwrite=True)
    with pytest.raises(QuantlmError, match="is an ancestor of the working directory"):
        outputs.check_output("/", overwrite=True)
    assert outputs.check_output(home / "q4") == (home / "q4").resolve()  # a new folder inside home is fine


def test_check_output_refuses_files_unwritable_parents_and_full_disks(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(QuantlmError, match="exists and is not a directory"):
        outputs.check_output(f, overwrite=True)
    with pytest.raises(QuantlmError, match="GB free"):
        outputs.check_output(tmp_path / "big", need_bytes=10**18)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            with pytest.raises(QuantlmError, match="is not writable"):
                outputs.check_output(ro / "deeper" / "out")
        finally:
            ro.chmod(0o755)


def test_outputs_get_the_umask_modes_not_mkdtemp_ones(tmp_path):
    old = os.umask(0o022)
    try:
        with output_dir(tmp_path / "out") as work:
            (work / "w.bin").write_bytes(b"1")
        write_text(tmp_path / "out" / "note.txt", "x")
        assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
        assert (tmp_path / "out" / outputs.MARKER).stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "out" / "note.txt").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        with output_dir(tmp_path / "private") as work:
            pass
        assert (tmp_path / "private").stat().st_mode & 0o777 == 0o700
    finally:
        os.umask(old)


def test_stale_partials_of_dead_processes_are_removed_by_the_next_run(tmp_path, caplog):
    host = outputs.hostname()
    dead = _dead_pid()
    stale = [tmp_path / f".out.{dead}@{host}.abcd1234.partial", tmp_path / f".out.old-{dead}@{host}"]
    alive = [tmp_path / f".out.{os.getpid()}@{host}.zzzz9999.partial",  # a live writer
             tmp_path / f".out.{dead}@other-host.abcd1234.partial",  # another node of a shared file system
             tmp_path / ".out.abcd1234.partial",  # no pid@host: not one of quantlm's, never touched
             tmp_path / f".outer.{dead}@{host}.abcd1234.partial"]  # another output's
    for p in stale + alive:
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"0" * 10)
    with caplog.at_level("WARNING"), output_dir(tmp_path / "out") as work:
        (work / "x").write_text("1")
    assert not any(p.exists() for p in stale) and all(p.exists() for p in alive)
    assert "left by a killed quantlm run" in caplog.text


def test_sigterm_during_the_write_phase_leaves_no_partial(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from quantlm.outputs import output_dir
        with output_dir({str(tmp_path / 'out')!r}) as work:
            (work / "model.safetensors").write_bytes(b"0" * 1000)
            print("writing", flush=True)
            time.sleep(60)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout.readline().strip() == "writing"
    assert len(list(tmp_path.glob(".out.*.partial"))) == 1
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "Terminated" in err
    assert list(tmp_path.iterdir()) == []


def test_sigkill_leaves_a_partial_that_the_next_run_removes(tmp_path):
    script = f"""
import time
from quantlm.outputs import output_dir
with output_dir({str(tmp_path / 'out')!r}) as work:
    print("writing", flush=True)
    time.sleep(60)
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait(timeout=30)
    assert len(list(tmp_path.glob(".out.*.partial"))) == 1
    with output_dir(tmp_path / "out") as work:
        (work / "x").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sigterm_handler_is_restored_and_only_installed_inside(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with output_dir(tmp_path / "a"):
        assert signal.getsignal(signal.SIGTERM) is not before
        with output_dir(tmp_path / "b"):
            pass
    assert signal.getsignal(signal.SIGTERM) is before


def test_nothing_is_written_into_the_installed_package():
    from quantlm.paths import recipes_dir

    with pytest.raises(QuantlmError, match="inside quantlm's installed package"):
        write_text(recipes_dir() / "results" / "x.json", "{}")
    with pytest.raises(QuantlmError, match="inside quantlm's installed package"):
        outputs.check_output(recipes_dir().parent / "suite-tiny")
    assert not (recipes_dir() / "results").exists()


def test_write_errors_are_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(QuantlmError, match="is a directory; name a file"):
        write_text(tmp_path, "x")
    with pytest.raises(QuantlmError, match="a part of its folder .* is a file"):
        write_text(tmp_path / "f" / "g.txt", "x")
    with pytest.raises(QuantlmError, match="is a file, not a directory"):
        outputs.check_dir_writable(tmp_path / "f")
    assert outputs.check_dir_writable(tmp_path / "new" / "records") == (tmp_path / "new" / "records").resolve()
    assert not (tmp_path / "new").exists()
