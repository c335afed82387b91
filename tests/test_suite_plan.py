import json
from pathlib import Path

import pytest

from quantlm import suite
from quantlm.cli import main
from quantlm.errors import QuantlmError
from quantlm.paths import recipes_dir

RECIPES = recipes_dir()


def test_spectra_plan_has_36_quantlm_jobs_per_seed():
    manifest, base = suite.load_manifest(RECIPES / "suite-spectra.yaml")
    jobs = suite.plan(manifest, base)
    quant = [j for j in jobs if j.kind == "quantize"]
    assert len(quant) == 9 * 4 * 3
    assert len({(j.model, j.bits) for j in quant}) == 36
    assert {j.seed for j in quant} == {0, 1, 2}
    assert {j.bits for j in quant} == {3, 4, 6, 8}
    # every quantize job is evaluated, as is every FloatLM and TriLM
    assert len([j for j in jobs if j.kind == "eval"]) == len(quant) + 18
    g = {j.bits: j.payload["recipe"].gptq.group_size for j in quant}
    assert g == {3: 128, 4: 128, 6: -1, 8: -1}


def test_spectra_dry_run_lists_sizes_without_model_files(capsys):
    assert main(["suite", str(RECIPES / "suite-spectra.yaml"), "--dry-run", "--only", "quantize/*"]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.strip().startswith("quantize/")]
    assert len(rows) == 108
    assert "quantize/quantlm-3.9b-4bit-s2" in out
    assert "expected new disk usage" in out


def _manifest(tmp_path: Path, **extra) -> Path:
    (tmp_path / "fl").mkdir(exist_ok=True)
    text = {
        "kind": "suite", "name": "t", "output": str(tmp_path / "out"),  # outputs and paths are cwd-relative
        "models": [{"name": "floatlm-a", "family": "floatlm", "path": str(tmp_path / "fl")},
                   {"name": "trilm-a", "family": "trilm", "path": str(tmp_path / "tri")}],
        "bits": [3, 8], "seeds": [0, 1], "group_size": {3: 4, 8: 4}, "quant": {"calibration": {"nsamples": 4, "seqlen": 16}},
        "eval": {"ppl": ["wikitext2"], "ppl_limit_windows": 1}, **extra,
    }
    p = tmp_path / "m.yaml"
    import yaml

    p.write_text(yaml.safe_dump(text))
    return p


def test_plan_ids_and_dependencies(tmp_path):
    manifest, base = suite.load_manifest(_manifest(tmp_path))
    jobs = suite.plan(manifest, base)
    ids = [j.id for j in jobs]
    assert ids == ["eval/floatlm-a",
                   "quantize/quantlm-a-3bit-s0", "eval/quantlm-a-3bit-s0",
                   "quantize/quantlm-a-3bit-s1", "eval/quantlm-a-3bit-s1",
                   "quantize/quantlm-a-8bit-s0", "eval/quantlm-a-8bit-s0",
                   "quantize/quantlm-a-8bit-s1", "eval/quantlm-a-8bit-s1",
                   "eval/trilm-a"]
    ev = next(j for j in jobs if j.id == "eval/quantlm-a-3bit-s1")
    assert ev.needs == ("quantize/quantlm-a-3bit-s1",)
    assert ev.source == (tmp_path / "out" / "quantlm" / "quantlm-a-3bit-s1" / "unpacked").resolve()


def test_hash_decides_done_and_recipe_changes_invalidate(tmp_path):
    manifest, base = suite.load_manifest(_manifest(tmp_path))
    job = next(j for j in suite.plan(manifest, base) if j.kind == "quantize")
    assert not suite.job_done(job)
    job.out.mkdir(parents=True)
    (job.out / suite.JOB_FILE).write_text(json.dumps({"suite_job": {"hash": job.hash}}))
    assert not suite.job_done(job)  # a quantization is done once every format it writes is there
    (job.out / "unpacked").mkdir()
    assert suite.job_done(job)
    manifest2, _ = suite.load_manifest(_manifest(tmp_path, quant={"calibration": {"nsamples": 8, "seqlen": 16}}))
    job2 = next(j for j in suite.plan(manifest2, base) if j.id == job.id)
    assert job2.hash != job.hash and not suite.job_done(job2)


def test_adding_a_seed_or_a_format_keeps_finished_jobs(tmp_path):
    manifest, base = suite.load_manifest(_manifest(tmp_path))
    before = {j.id: j.hash for j in suite.plan(manifest, base)}
    more, _ = suite.load_manifest(_manifest(tmp_path, seeds=[0, 1, 2],
                                            quant={"calibration": {"nsamples": 4, "seqlen": 16},
                                                   "export": {"formats": ["unpacked", "gptq"]}}))
    after = {j.id: j.hash for j in suite.plan(more, base)}
    assert {k: after[k] for k in before} == before  # seeds 0 and 1: the same jobs, still done
    assert sorted(set(after) - set(before)) == ["eval/quantlm-a-3bit-s2", "eval/quantlm-a-8bit-s2",
                                                "quantize/quantlm-a-3bit-s2", "quantize/quantlm-a-8bit-s2"]


def test_quantize_job_hash_is_pinned_across_processes():
    """The identity of a job must not depend on the process (dict order, hash seeds): a suite resumed on another
    node finds its outputs. Changing this value means every user's finished suite jobs rerun."""
    import subprocess
    import sys

    from quantlm.quantize import QuantRecipe

    code = ("from quantlm.quantize import QuantRecipe; from quantlm.suite import quantize_job_hash; "
            "print(quantize_job_hash(QuantRecipe(), 'src'))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": "", "PYTHONPATH": str(Path(__file__).parent.parent)})
    mine = suite.quantize_job_hash(QuantRecipe(), "src")
    assert other.stdout.strip() == mine == "bcf815b6a5adac3e"


def test_failed_job_does_not_stop_the_others(tmp_path, monkeypatch, tiny_model_dir):
    import shutil

    for name in ("fl", "tri"):  # the suite checks the checkpoints it is given before any job runs
        shutil.rmtree(tmp_path / name, ignore_errors=True)
        shutil.copytree(tiny_model_dir, tmp_path / name)
    manifest, base = suite.load_manifest(_manifest(tmp_path))
    ran = []

    def fake(job, manifest, progress=True):
        ran.append(job.id)
        if job.id == "quantize/quantlm-a-3bit-s0":
            raise RuntimeError("boom")
        out = job.out if job.kind == "eval" else job.out / suite.JOB_FILE
        out.parent.mkdir(parents=True, exist_ok=True)
        if job.kind == "quantize":
            (job.out / "unpacked").mkdir()
        out.write_text(json.dumps({"suite_job": {"hash": job.hash}}))

    monkeypatch.setattr("quantlm.suite.runner.run_job", fake)
    s = suite.run(manifest, base, progress=False)
    assert s.failed == {"quantize/quantlm-a-3bit-s0": "RuntimeError: boom"}
    assert s.blocked == {"eval/quantlm-a-3bit-s0": "needs quantize/quantlm-a-3bit-s0, which failed"}
    assert "eval/trilm-a" in s.done and len(s.done) == 8
    status = json.loads((tmp_path / "out" / "suite-status.json").read_text())
    assert status["pending"] == ["quantize/quantlm-a-3bit-s0", "eval/quantlm-a-3bit-s0"]
    # rerun after the cause is fixed: only the two unfinished jobs run
    ran.clear()
    failing = fake

    def fixed(job, m, progress=True):
        if job.id == "quantize/quantlm-a-3bit-s0":
            (job.out / "unpacked").mkdir(parents=True, exist_ok=True)
            (job.out / suite.JOB_FILE).write_text(json.dumps({"suite_job": {"hash": job.hash}}))
            ran.append(job.id)
            return
        failing(job, m)

    monkeypatch.setattr("quantlm.suite.runner.run_job", fixed)
    s2 = suite.run(manifest, base, progress=False)
    assert ran == ["quantize/quantlm-a-3bit-s0", "eval/quantlm-a-3bit-s0"]
    assert len(s2.skipped) == 8 and not s2.failed


def test_manifest_errors(tmp_path):
    with pytest.raises(QuantlmError, match="unknown key 'bit'"):
        suite.load_manifest(_manifest(tmp_path, bit=[4]))
    manifest, base = suite.load_manifest(_manifest(tmp_path, bits=[4]))
    with pytest.raises(QuantlmError, match="--only nope matches no job"):
        suite.select(suite.plan(manifest, base), ["nope"])
    with pytest.raises(QuantlmError, match="bits=9 is outside 2..8"):
        suite.load_manifest(_manifest(tmp_path, bits=[9]))


def test_models_trained_by_the_suite_are_not_preflighted_as_checkpoints(tmp_path, monkeypatch):
    """A model the suite trains has no checkpoint yet: the pre-flight checks only the checkpoints a manifest names."""
    import yaml

    m = {"kind": "suite", "name": "t", "output": str(tmp_path / "out"), "bits": [4], "seeds": [0],
         "models": [{"name": "floatlm-micro", "family": "floatlm", "preset": "floatlm-micro",
                     "train": "floatlm-micro.yaml"}],  # a shipped train recipe
         "eval": {"ppl": ["wikitext2"], "ppl_limit_windows": 1}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(m))
    manifest, base = suite.load_manifest(tmp_path / "m.yaml")
    ran = []

    def fake(job, manifest, progress=True):
        ran.append(job.id)
        out = job.out if job.kind == "eval" else job.out / suite.JOB_FILE
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"suite_job": {"hash": job.hash}}))
        for fmt in job.payload["recipe"].export.formats if job.kind == "quantize" else ():
            (job.out / fmt).mkdir()

    monkeypatch.setattr("quantlm.suite.runner.run_job", fake)
    s = suite.run(manifest, base, progress=False)
    assert ran[0] == "train/floatlm-micro" and not s.failed and len(s.done) == 4


def test_deploy_adds_one_job_per_model_and_keeps_the_other_hashes(tmp_path):
    manifest, base = suite.load_manifest(_manifest(tmp_path))
    before = {j.id: j.hash for j in suite.plan(manifest, base)}
    with_deploy, _ = suite.load_manifest(_manifest(tmp_path, deploy=True, bench={"threads": 1, "decode_tokens": 16}))
    jobs = suite.plan(with_deploy, base)
    after = {j.id: j.hash for j in jobs}
    assert {k: after[k] for k in before} == before
    assert sorted(set(after) - set(before)) == ["deploy/floatlm-a", "deploy/quantlm-a-3bit", "deploy/quantlm-a-8bit",
                                                "deploy/trilm-a"]
    d = next(j for j in jobs if j.id == "deploy/quantlm-a-3bit")
    assert d.needs == ("quantize/quantlm-a-3bit-s0",) and d.source.name == "compressed-tensors"
    q = next(j for j in jobs if j.id == "quantize/quantlm-a-3bit-s0")
    assert q.payload["recipe"].export.formats == ("unpacked", "compressed-tensors")
    # a quantization finished before deploy was switched on lacks the packed export: it runs again
    q.out.mkdir(parents=True)
    (q.out / "unpacked").mkdir()
    (q.out / suite.JOB_FILE).write_text(json.dumps({"suite_job": {"hash": q.hash}}))
    assert not suite.job_done(q)
    (q.out / "compressed-tensors").mkdir()
    assert suite.job_done(q)


def test_deploy_jobs_without_llama_cpp_are_not_run_and_fail_nothing(tmp_path, monkeypatch, tiny_model_dir):
    import shutil

    import quantlm.deploy

    for name in ("fl", "tri"):  # the suite checks the checkpoints it is given before any job runs
        shutil.rmtree(tmp_path / name, ignore_errors=True)
        shutil.copytree(tiny_model_dir, tmp_path / name)

    manifest, base = suite.load_manifest(_manifest(tmp_path, deploy=True))
    monkeypatch.setattr(quantlm.deploy, "llama_cpp_available", lambda python=None: False)
    ran = []

    def fake(job, manifest, progress=True):
        if job.kind == "deploy":
            return real(job, manifest, progress)
        ran.append(job.id)
        out = job.out if job.kind == "eval" else job.out / suite.JOB_FILE
        out.parent.mkdir(parents=True, exist_ok=True)
        for f in job.payload["recipe"].export.formats if job.kind == "quantize" else ():
            (job.out / f).mkdir()
        out.write_text(json.dumps({"suite_job": {"hash": job.hash}}))

    real = suite.run_job
    monkeypatch.setattr("quantlm.suite.runner.run_job", fake)
    s = suite.run(manifest, base, progress=False)
    assert not s.failed and not s.blocked and len(s.done) == len(ran) == 10
    assert sorted(s.not_run) == ["deploy/floatlm-a", "deploy/quantlm-a-3bit", "deploy/quantlm-a-8bit",
                                 "deploy/trilm-a"]
    assert all("bash .ci/llamacpp.sh" in r for r in s.not_run.values())
    status = json.loads((tmp_path / "out" / "suite-status.json").read_text())
    assert sorted(status["not_run"]) == sorted(s.not_run)


def test_quantize_job_hash_follows_resolved_activation_dtypes():
    """``activation_dtype: auto`` (the forward dtype) and the dtype it resolves to are one recipe: a suite that spells
    it out does not rerun its jobs."""
    from dataclasses import replace

    from quantlm.gptq.memory import MemorySettings
    from quantlm.quantize import QuantRecipe

    def h(**memory):
        return suite.quantize_job_hash(replace(QuantRecipe(), memory=MemorySettings(**memory)), "src")

    assert h() == h(activation_dtype="float32") == suite.quantize_job_hash(QuantRecipe(), "src")
    assert h(forward_dtype="bfloat16") == h(forward_dtype="bfloat16", activation_dtype="bfloat16")
    assert h(forward_dtype="bfloat16", activation_dtype="float32") != h(forward_dtype="bfloat16")
    assert h(activation_dtype="bfloat16") != h()


def test_a_later_option_changes_the_hash_only_when_used():
    from dataclasses import replace

    from quantlm.quantize import QuantRecipe

    base = QuantRecipe()
    used = replace(base, gptq=replace(base.gptq, signed_absmax=True))
    assert suite.quantize_job_hash(used, "src") != suite.quantize_job_hash(base, "src")  # default: pinned above
