"""Identity is content: a suite job whose input was edited in place (calibration text, evaluation data, the
checkpoint) runs again and says why; a disk-offloaded run resumes only into the same weights, tokens, settings
and output; a full disk mid-run leaves a state the rerun resumes from, counting what it already wrote."""

from __future__ import annotations

import copy
import dataclasses
import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from quantlm import digests, suite
from quantlm.architectures import LLAMA
from quantlm.errors import QuantlmError
from quantlm.gptq import offload, pipeline
from quantlm.gptq.memory import MemorySettings
from quantlm.gptq.offload import run_fingerprint
from quantlm.gptq.pipeline import offload_folder, quantize_blocks
from quantlm.gptq.settings import GPTQSettings
from quantlm.hf_checkpoint import load_causal_lm


@pytest.fixture
def ws(tmp_path, monkeypatch, tiny_model_dir, corpus_text) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QUANTLM_CACHE", str(tmp_path / ".cache"))
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    (tmp_path / "calib.txt").write_text(corpus_text[:40_000])
    (tmp_path / "eval.txt").write_text(corpus_text[40_000:60_000])
    body = {"kind": "suite", "name": "ident", "output": "out",
            "models": [{"name": "floatlm-a", "family": "floatlm", "path": "m"}], "bits": [4], "seeds": [0],
            "group_size": {4: 4}, "quant": {"calibration": {"nsamples": 4, "seqlen": 32, "data": "calib.txt"}},
            "eval": {"ppl": ["eval.txt"], "window": 32, "ppl_limit_windows": 4}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(body))
    return tmp_path


def _status(ws: Path) -> dict[str, tuple[bool, str]]:
    return {j.id: suite.job_status(j) for j in suite.plan(*suite.load_manifest(ws / "s.yaml"))}


def _run(ws: Path) -> suite.RunSummary:
    return suite.run(*suite.load_manifest(ws / "s.yaml"), progress=False)


def test_in_place_edits_of_every_input_rerun_the_jobs_that_read_it(ws):
    first = _run(ws)
    assert len(first.done) == 3 and not first.failed
    assert all(done for done, _ in _status(ws).values())

    with open(ws / "calib.txt", "a") as f:  # the calibration text, edited in place
        f.write(" x")
    assert _status(ws) == {"eval/floatlm-a": (True, ""),
                           "quantize/quantlm-a-4bit-s0": (False, "the calibration text changed"),
                           "eval/quantlm-a-4bit-s0": (False, "the checkpoint it reads changed")}
    again = _run(ws)
    assert sorted(again.done) == ["eval/quantlm-a-4bit-s0", "quantize/quantlm-a-4bit-s0"]
    assert again.rerun["quantize/quantlm-a-4bit-s0"] == "the calibration text changed"

    with open(ws / "eval.txt", "a") as f:  # the evaluation data
        f.write("\nmore text")
    assert {k: v for k, v in _status(ws).items() if not v[0]} == {
        "eval/floatlm-a": (False, "the evaluation data changed"),
        "eval/quantlm-a-4bit-s0": (False, "the evaluation data changed")}
    assert sorted(_run(ws).done) == ["eval/floatlm-a", "eval/quantlm-a-4bit-s0"]

    weights = ws / "m" / "model.safetensors"  # the checkpoint: one value, same size, same path
    tensors = load_file(weights)
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name][3, 7] += 0.25
    save_file(tensors, weights, metadata={"format": "pt"})
    status = _status(ws)
    assert status["eval/floatlm-a"] == (False, "the checkpoint it reads changed")
    assert status["quantize/quantlm-a-4bit-s0"] == (False, "the checkpoint it reads changed")
    assert len(_run(ws).done) == 3
    assert all(done for done, _ in _status(ws).values())


def test_a_replaced_model_folder_reruns_with_its_own_numbers(ws, tmp_path_factory, tiny_tokenizer_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    _run(ws)
    old = json.loads((ws / "out" / "results" / "floatlm-a.json").read_text())
    shutil.rmtree(ws / "m")  # another model under the same path: a wider MLP
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    LlamaForCausalLM(cfg).save_pretrained(ws / "m")
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, ws / "m" / f.name)
    assert {why for _, why in _status(ws).values()} == {"the checkpoint it reads changed"}
    assert len(_run(ws).done) == 3
    new = json.loads((ws / "out" / "results" / "floatlm-a.json").read_text())
    assert new["params"] > old["params"]


def test_a_job_made_before_inputs_were_recorded_says_so(ws):
    _run(ws)
    marker = ws / "out" / "quantlm" / "quantlm-a-4bit-s0" / suite.JOB_FILE
    body = json.loads(marker.read_text())
    body["suite_job"] = {"hash": "0" * 16}  # an older quantlm's stamp
    marker.write_text(json.dumps(body))
    assert _status(ws)["quantize/quantlm-a-4bit-s0"] == (
        False, "it was made by an older quantlm that did not record its inputs by content")


def test_digests_are_cached_by_size_mtime_and_inode_and_follow_edits(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLM_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "a.txt"
    f.write_text("one")
    first = digests.file_sha256(f, persist=True)
    assert len(list((tmp_path / "cache" / "digests").iterdir())) == 1
    digests._memo.clear()
    assert digests.file_sha256(f, persist=True) == first  # from the on-disk entry
    f.write_text("two")  # same size, new mtime
    assert digests.file_sha256(f, persist=True) != first
    g = tmp_path / "b.txt"
    g.write_text("three")
    digests.file_sha256(g)  # without persist: this process only
    assert len(list((tmp_path / "cache" / "digests").iterdir())) == 2
    with pytest.raises(QuantlmError, match="nope does not exist"):
        digests.file_sha256(tmp_path / "nope")


# ------------------------------------------------------------------------------------ disk offload

@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_causal_lm(tiny_model_dir)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(5))


RECIPE = GPTQSettings(bits=4, group_size=4)


def test_the_resume_fingerprint_sees_every_weight(base, tokens):
    model = copy.deepcopy(base)
    before = run_fingerprint(model, tokens, {})
    with torch.no_grad():  # one value a strided sample of 65536 per tensor would skip
        model.model.embed_tokens.weight.view(-1)[1] += 1e-3
    assert run_fingerprint(model, tokens, {}) != before


def test_two_outputs_never_share_an_offload_folder(tokens):
    s = MemorySettings(offload="disk")
    a, b = offload_folder(s, RECIPE, tokens, "/x/out-a"), offload_folder(s, RECIPE, tokens, "/x/out-b")
    assert a != b and a == offload_folder(s, RECIPE, tokens, "/x/out-a")
    assert offload_folder(dataclasses.replace(s, offload_dir="/y"), RECIPE, tokens, "/x/out-a") == Path("/y")


def _disk_run(base, tokens, folder: Path, **kw):
    model = copy.deepcopy(base)
    memory = MemorySettings(offload="disk", offload_dir=str(folder), batch_size=4)
    return model, quantize_blocks(model, LLAMA, tokens, RECIPE, progress=False, memory=memory, **kw)


def test_a_full_disk_mid_run_leaves_a_state_the_rerun_resumes(base, tokens, tmp_path, monkeypatch):
    folder = tmp_path / "off"
    real = offload.RunState.block_done

    def full_at_block_1(self, i, *a, **k):
        if i == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, i, *a, **k)

    monkeypatch.setattr(offload.RunState, "block_done", full_at_block_1)
    with pytest.raises(QuantlmError, match=r"the disk holding .*off is full \(No space left on device\); the 1 "
                                           r"finished blocks are kept there: free space and run the same command"):
        _disk_run(base, tokens, folder)
    monkeypatch.setattr(offload.RunState, "block_done", real)
    kept = offload.reusable_bytes(folder)
    assert kept > 0 and json.loads((folder / "state.json").read_text())["next_block"] == 1
    mask = os.umask(0)
    os.umask(mask)
    for f in folder.iterdir():  # the kept state follows the umask like every file quantlm writes
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f.name

    # the free-space check of the rerun counts the kept state as available
    free = {"bytes": 1000}
    monkeypatch.setattr(pipeline, "disk_free_bytes", lambda p: free["bytes"])
    assert pipeline.offload_disk_available(folder) == 1000 + kept
    free["bytes"] = 10**12
    _, resumed = _disk_run(base, tokens, folder)
    assert resumed.measured["resumed_from_block"] == 1 and not folder.exists()
    _, straight = _disk_run(base, tokens, tmp_path / "other")
    for name, r in straight.results.items():
        assert torch.equal(resumed.results[name].q, r.q)


@pytest.mark.parametrize("output, path, match", [
    ("m", "m", r"suite output .*m is inside the checkpoint of model floatlm-a"),
    ("m/runs", "m", r"suite output .*runs is inside the checkpoint of model floatlm-a"),
    ("out", "out/quantlm/x", r"checkpoint .*out/quantlm/x lies where the suite writes its quantlm/"),
])
def test_a_suite_never_writes_into_a_checkpoint_it_reads(ws, output, path, match, capsys):
    from quantlm.cli import main

    if path != "m":
        shutil.copytree(ws / "m", ws / path)
    body = yaml.safe_load((ws / "s.yaml").read_text())
    body.update(output=output, models=[{"name": "floatlm-a", "family": "floatlm", "path": path}])
    (ws / "s.yaml").write_text(yaml.safe_dump(body))
    before = sorted(p.name for p in (ws / "m").iterdir())
    assert main(["suite", str(ws / "s.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert re.search(match, err)
    assert sorted(p.name for p in (ws / "m").iterdir()) == before
