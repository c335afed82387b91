"""Memory settings of the GPTQ pipeline: the plan, storage dtypes, disk offload (and its resume), bf16 forwards."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantlm.architectures import LLAMA
from quantlm.errors import QuantlmError
from quantlm.gptq.hessian import HessianAccumulator, tf32_matmul
from quantlm.gptq.memory import (
    DTYPE_BYTES,
    MemorySettings,
    check_plan,
    param_count,
    plan_memory,
    replay_bytes,
    result_bytes,
)
from quantlm.gptq.offload import HiddenStates, RunState, batches_of
from quantlm.gptq.pipeline import quantize_blocks
from quantlm.hf_checkpoint import load_causal_lm
from quantlm.locks import lock_path

REPO = Path(__file__).resolve().parent.parent


def gptq_settings(**kw):
    """The GPTQ settings the pipeline reads (bits, group size, ...)."""
    from quantlm.gptq.settings import GPTQSettings

    names = {f.name for f in dataclasses.fields(GPTQSettings)}
    return GPTQSettings(**{k: v for k, v in kw.items() if k in names})


RECIPE = {"bits": 3, "group_size": 4}
# the device tests run on the CPU everywhere and on CUDA where there is one (gpu-marked: skipped without)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_causal_lm(tiny_model_dir)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 512, (10, 40), generator=torch.Generator().manual_seed(3))


def _run(base, tokens, memory=None, recipe=None, **kw):
    model = copy.deepcopy(base)
    memory = memory or MemorySettings()
    memory = memory if memory.batch_size else dataclasses.replace(memory, batch_size=4)
    recipe = recipe or gptq_settings(**RECIPE)
    run = quantize_blocks(model, LLAMA, tokens, recipe, progress=False, memory=memory, **kw)
    return model, run


def _same(a, b) -> None:
    assert a.results.keys() == b.results.keys()
    for name, r in a.results.items():
        o = b.results[name]
        for f in ("q", "scale", "zero", "g_idx"):
            assert torch.equal(getattr(r, f), getattr(o, f)), (name, f)
        assert r.loss == o.loss, name
    assert [m.error for m in a.modules] == [m.error for m in b.modules]


# ------------------------------------------------------------------------------------------- the plan

SPECTRA_39B = {"model_type": "llama", "hidden_size": 3072, "intermediate_size": 9216, "num_hidden_layers": 30, "num_attention_heads": 24,
               "num_key_value_heads": 24, "vocab_size": 50688, "tie_word_embeddings": False}


def test_plan_counts_exact_components_of_the_39b_shape():
    s = MemorySettings(offload="host")
    plan = plan_memory(SPECTRA_39B, 512, 2048, s, 4, 128, "cpu", available_bytes=24 * 2**30)
    b = plan["bytes"]
    assert b["hidden_buffers"] == 2 * 512 * 2048 * 3072 * 4  # 25.8 GB: the two fp32 buffers
    n, per_block = param_count(plan["shape"])
    assert per_block == 4 * 3072**2 + 3 * 3072 * 9216 + 2 * 3072
    assert b["weights"] == n * 4 and abs(n - 3.99e9) < 0.01e9
    assert b["results"] == result_bytes(plan["shape"], 128)
    assert plan["hidden_states"] == "host" and not plan["fits"]
    with pytest.raises(QuantlmError, match=r"needs about .* GB of host memory.*--offload disk"):
        check_plan(plan)
    # auto: disk offload is chosen; the buffers leave host memory and go to disk
    auto = plan_memory(SPECTRA_39B, 512, 2048, MemorySettings(), 4, 128, "cpu", available_bytes=24 * 2**30,
                       disk_available_bytes=10**12)
    assert auto["hidden_states"] == "disk" and auto["bytes"]["hidden_buffers"] == 0
    assert auto["disk_bytes"] >= 2 * 512 * 2048 * 3072 * 4 and auto["fits"], auto
    check_plan(auto)
    assert json.loads(json.dumps(auto)) == auto  # report.json-ready


def test_plan_storage_dtype_batch_and_failure_message():
    p32 = plan_memory(SPECTRA_39B, 512, 2048, MemorySettings(offload="host"), 4, 128, "cpu", available_bytes=10**12)
    p16 = plan_memory(SPECTRA_39B, 512, 2048, MemorySettings(offload="host", activation_dtype="bfloat16"), 4, 128,
                      "cpu", available_bytes=10**12)
    assert p16["bytes"]["hidden_buffers"] * 2 == p32["bytes"]["hidden_buffers"]
    assert p32["batch_size"] == 8 and p32["fits"]
    small = plan_memory(SPECTRA_39B, 512, 2048, MemorySettings(offload="disk", batch_size=1), 4, 128, "cpu",
                        available_bytes=10**12, disk_available_bytes=10**12)
    big = plan_memory(SPECTRA_39B, 512, 2048, MemorySettings(offload="disk", batch_size=8), 4, 128, "cpu",
                      available_bytes=10**12, disk_available_bytes=10**12)
    assert small["working_sets"]["forward"] < big["working_sets"]["forward"]
    # nothing fits 2 GB (the weights alone are 16 GB): the message says so
    tiny = plan_memory(SPECTRA_39B, 512, 2048, MemorySettings(), 4, 128, "cpu", available_bytes=2 * 2**30,
                       disk_available_bytes=10**12)
    with pytest.raises(QuantlmError, match="no setting fits"):
        check_plan(tiny)
    # a disk too small for the offload files
    nodisk = plan_memory(SPECTRA_39B, 512, 2048, MemorySettings(offload="disk"), 4, 128, "cpu",
                         available_bytes=10**12, disk_available_bytes=10**9)
    with pytest.raises(QuantlmError, match="offload-dir"):
        check_plan(nodisk)


def test_failure_offers_releasing_the_weights_as_a_cli_flag():
    """An explicit --offload disk that does not fit names --no-keep-weights as the fix."""
    plan = plan_memory(SPECTRA_39B, 512, 2048, MemorySettings(offload="disk"), 4, 128, "cpu",
                       available_bytes=int(22.5e9), disk_available_bytes=10**13)
    assert not plan["fits"]
    with pytest.raises(QuantlmError, match=r"--no-keep-weights \(about 18\.\d GB\)"):
        check_plan(plan)


@pytest.mark.parametrize("gb", [22.5, 24])
def test_auto_plans_the_39b_spectra_recipe_on_a_24gb_machine(gb):
    """Under the default flags auto's last resort releases each block's weights once its codes are kept."""
    plan = plan_memory(SPECTRA_39B, 512, 2048, MemorySettings(), 4, 128, "cpu", available_bytes=int(gb * 1e9),
                       disk_available_bytes=10**13)
    assert plan["fits"] and plan["hidden_states"] == "disk" and plan["keep_weights"] is False
    assert plan["predicted_peak_bytes"] < 0.95 * gb * 1e9 and "--no-keep-weights" in plan["warning"]
    check_plan(plan)
    roomy = plan_memory(SPECTRA_39B, 512, 2048, MemorySettings(), 4, 128, "cpu", available_bytes=64 * 10**9,
                        disk_available_bytes=10**13)
    assert roomy["fits"] and roomy["keep_weights"] is True  # released only when nothing else fits


def test_plan_gpu_keeps_hidden_states_on_the_device_when_they_fit():
    kw = dict(available_bytes=10**12, disk_available_bytes=10**12)
    h200 = plan_memory(SPECTRA_39B, 512, 2048, MemorySettings(), 4, 128, "cuda", device_available_bytes=140 * 10**9,
                       **kw)
    assert h200["hidden_states"] == "device" and h200["fits"]
    assert h200["device_bytes"]["hidden_buffers"] == 2 * 512 * 2048 * 3072 * 4
    assert h200["batch_size"] == 16
    small = plan_memory(SPECTRA_39B, 512, 2048, MemorySettings(), 4, 128, "cuda", device_available_bytes=24 * 10**9,
                        **kw)
    assert small["hidden_states"] == "host" and small["bytes"]["hidden_buffers"] > 0


def test_replay_model_follows_the_all_or_nothing_rule():
    shape = {"hidden": 512, "intermediate": 1280, "heads": 8, "kv_heads": 8, "head_dim": 64}
    tokens = 512 * 2048
    # 4 GiB cap: q/k/v (3 x 512 values per token) do not fit, the attention output (512) does, the MLP's
    # records (2 x 1280 in the first block, 1280 later) do not: 2.1 GB kept
    assert replay_bytes(shape, tokens, 4, 4 * 2**30) == tokens * 512 * 4
    assert replay_bytes(shape, tokens, 4, 0) == 0
    # the pass whose records do not fit still holds its first batch (16 K tokens of gate + up) for a moment
    assert replay_bytes(shape, tokens, 4, 4 * 2**30, batch_tokens=16384) == tokens * 512 * 4 + 2 * 1280 * 16384 * 4
    assert replay_bytes(shape, tokens, 4, 10**12) == tokens * (512 + 2 * 1280) * 4  # first block's peak
    assert replay_bytes(shape, tokens, 4, 10**12, true_sequential=False) == 0


def test_plan_from_a_checkpoint_config_alone(tiny_model_dir, tmp_path):
    from quantlm.gptq.memory import plan_for_checkpoint

    plan = plan_for_checkpoint(tiny_model_dir, 512, 2048, MemorySettings(), 4, 4, available_bytes=10**11)
    assert plan["shape"]["hidden"] == 64 and plan["shape"]["layers"] == 2 and plan["fits"]
    with pytest.raises(QuantlmError, match="config.json"):
        plan_for_checkpoint(tmp_path, 8, 8)


def test_settings_validate():
    with pytest.raises(QuantlmError):
        MemorySettings(batch_size=-1)
    with pytest.raises(QuantlmError):
        MemorySettings(replay_cache_gb=-2)
    for f in dataclasses.fields(MemorySettings):  # CLI help for every field
        assert f.metadata.get("help"), f.name


# ------------------------------------------------------------------------------------------ storage

@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("where", ["host", "disk"])
def test_hidden_states_round_trip(tmp_path, storage, where):
    batches = batches_of(7, 3)
    x = torch.randn(7, 5, 6)
    hs = HiddenStates(batches, 5, 6, storage, where=where, device=torch.device("cpu"), dtype=torch.float32,
                      path=tmp_path / "h.bin")
    for b, (s, e) in enumerate(batches):
        hs.write(b, x[s:e])
    hs.flush()
    got = torch.cat(list(hs))
    assert got.dtype == torch.float32 and torch.equal(got, x.to(storage).float())
    assert torch.equal(hs.tensor(), x.to(storage))
    if where == "disk":
        import numpy as np

        assert (tmp_path / "h.bin").stat().st_size == hs.nbytes
        if storage == torch.float32:  # the file is a plain memmap-able array
            mm = np.memmap(tmp_path / "h.bin", dtype=np.float32, mode="r", shape=(7, 5, 6))
            assert np.array_equal(mm, x.numpy())
        hs.close()
        again = HiddenStates(batches, 5, 6, storage, where=where, device=torch.device("cpu"), dtype=torch.float32,
                             path=tmp_path / "h.bin", create=False)
        assert torch.equal(again.read(1), x[3:6].to(storage).float())
        again.close()


def test_storage_dtype_and_plan_in_the_result(base, tokens):
    _, fp32 = _run(base, tokens)
    _, legacy = _run(base, tokens, memory=MemorySettings(activation_dtype="float32", offload="host"))
    _same(fp32, legacy)
    assert fp32.plan["hidden_states"] == "host" and fp32.plan["activation_dtype"] == "float32"
    assert fp32.measured["measured_peak_bytes"] > 0 and fp32.measured["pipeline_peak_bytes"] > 0
    assert fp32.plan["predicted_peak_bytes"] > 0 and "plan" in fp32.memory_report()
    for dt in ("bfloat16", "float16"):
        model, run = _run(base, tokens, memory=MemorySettings(activation_dtype=dt))
        assert run.plan["bytes"]["hidden_buffers"] * 2 == fp32.plan["bytes"]["hidden_buffers"]
        e32, e16 = sum(m.error for m in fp32.modules), sum(m.error for m in run.modules)
        assert e16 == pytest.approx(e32, rel=0.05) and e16 != e32  # rounded inputs, nearly the same error
        for name, res in run.results.items():  # the model still holds the exact fp32 dequantized codes
            assert torch.equal(model.get_submodule(name).weight.data, res.dequantize())


def test_each_block_logs_its_time_error_and_the_peak_so_far(base, tokens, caplog):
    import re

    with caplog.at_level("INFO", logger="quantlm.gptq.pipeline"):
        _, run = _run(base, tokens)
    lines = [r.getMessage() for r in caplog.records if " done in " in r.getMessage()]
    n = base.config.num_hidden_layers
    assert len(lines) == n
    peaks = []
    for i, line in enumerate(lines):
        m = re.fullmatch(rf"gptq block {i + 1}/{n} done in [\d.]+ s \(error ([\d.e+-]+); peak RSS so far "
                         r"([\d.]+) GB\)", line)
        assert m, line
        peaks.append(float(m.group(2)))
    assert peaks == sorted(peaks) and peaks[0] > 0.05  # a running maximum of the process's resident memory
    assert peaks[-1] <= run.measured["measured_peak_bytes"] / 1e9 + 0.01


def test_allocator_trimmed_only_near_the_limit_same_results(base, tokens):
    from quantlm.gptq.memory import GB, TRIM_FRACTION

    _, ample = _run(base, tokens)
    assert not ample.plan["trim_allocator"]  # far from the limit: freed pages stay for the next block
    peak = ample.plan["predicted_peak_bytes"]
    # a limit that leaves the plan fitting but above TRIM_FRACTION of it
    _, tight = _run(base, tokens, memory=MemorySettings(max_memory_gb=peak / (TRIM_FRACTION + 0.2) / GB))
    assert tight.plan["trim_allocator"] and tight.plan["fits"]
    _same(ample, tight)  # trimming moves pages, never numbers


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_disk_offload_matches_memory_and_cleans_up(base, tokens, tmp_path, storage):
    _, host = _run(base, tokens, memory=MemorySettings(activation_dtype=storage, offload="host"))
    folder = tmp_path / "off"
    _, disk = _run(base, tokens, memory=MemorySettings(activation_dtype=storage, offload="disk",
                                                       offload_dir=str(folder)))
    assert disk.plan["hidden_states"] == "disk" and disk.measured["resumed_from_block"] == 0
    _same(host, disk)
    assert not folder.exists()  # deleted on success


# The child kills itself (SIGKILL, as a crash would) right after block 1's gate/up group is quantized: the
# test wraps the block loop's group step from outside the library.
_CHILD = r"""
import os, signal, sys, torch
from quantlm.hf_checkpoint import load_causal_lm
from quantlm.locks import lock_path
from quantlm.gptq import pipeline
from quantlm.gptq.memory import MemorySettings
from quantlm.architectures import LLAMA
sys.path.insert(0, sys.argv[3])
from test_memory import gptq_settings, RECIPE
step = pipeline.BlockLoop._quantize_group
def dying(self, names, *args):
    out = step(self, names, *args)
    if names[0] == "model.layers.1.mlp.gate_proj":
        os.kill(os.getpid(), signal.SIGKILL)
    return out
pipeline.BlockLoop._quantize_group = dying
model = load_causal_lm(sys.argv[1])
tokens = torch.randint(0, 512, (10, 40), generator=torch.Generator().manual_seed(3))
pipeline.quantize_blocks(model, LLAMA, tokens, gptq_settings(**RECIPE), progress=False,
                         memory=MemorySettings(offload="disk", offload_dir=sys.argv[2], activation_dtype="bfloat16",
                                               batch_size=4))
print("finished")
"""


def test_killed_disk_run_resumes_at_its_block_to_identical_results(base, tokens, tiny_model_dir, tmp_path):
    folder = tmp_path / "off"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tiny_model_dir), str(folder), str(REPO / "tests")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = json.loads((folder / "state.json").read_text())
    assert state["next_block"] == 1  # killed inside block 1 (after its gate/up group): block 0 is saved
    assert (folder / "block-0000.pt").is_file() and not (folder / "block-0001.pt").exists()
    settings = MemorySettings(offload="disk", offload_dir=str(folder), activation_dtype="bfloat16")
    model, resumed = _run(base, tokens, memory=settings)
    assert resumed.measured["resumed_from_block"] == 1 and not folder.exists()
    _, straight = _run(base, tokens, memory=dataclasses.replace(settings, offload_dir=str(tmp_path / "other")))
    _same(resumed, straight)
    for name, res in resumed.results.items():  # block 0's weights were restored from the saved codes
        assert torch.equal(model.get_submodule(name).weight.data, res.dequantize())


def test_released_weights_same_results_less_memory(base, tokens, tmp_path):
    _, kept = _run(base, tokens)
    model, released = _run(base, tokens, memory=MemorySettings(keep_weights=False))
    _same(kept, released)
    assert all(model.get_submodule(n).weight.numel() == 0 for n in released.results)
    assert model.model.embed_tokens.weight.numel() > 0
    # the plans' own parts, less the measured baseline (the process's RSS when each run started differs)
    def planned(p):
        return p["predicted_peak_bytes"] - p["bytes"]["baseline"]

    assert planned(released.plan) < planned(kept.plan)
    s = MemorySettings(offload="disk", keep_weights=False)
    big = plan_memory(SPECTRA_39B, 512, 2048, s, 4, 128, "cpu", available_bytes=10**12, disk_available_bytes=10**12)
    full = plan_memory(SPECTRA_39B, 512, 2048, dataclasses.replace(s, keep_weights=True), 4, 128, "cpu",
                       available_bytes=10**12, disk_available_bytes=10**12)
    assert full["predicted_peak_bytes"] - big["predicted_peak_bytes"] > 3.5e9  # the 3.9B codes


def test_run_state_removes_its_own_files_only(tmp_path):
    folder = tmp_path / "off"
    state = RunState.open(folder, "f" * 64)  # a fresh state: folder, marker and lock
    own = ["state.json", ".state.json.k2j.json", "block-0003.pt", ".block-0004.pt.x9.pt", "hidden-0.bin"]
    foreign = ["block-diagram.png", "state.json.bak", "notes.txt"]
    for name in own + foreign:
        (folder / name).write_text("x")
    state.remove()
    assert sorted(p.name for p in folder.iterdir()) == sorted(foreign)
    assert not lock_path(folder).exists()


def test_a_folder_quantlm_did_not_mark_is_refused_never_emptied(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in ("state.json", "hidden-0.bin", "block-0001.pt"):  # the user's files, with quantlm's names
        (folder / name).write_text("the user's")
    with pytest.raises(QuantlmError, match=r"mine holds block-0001.pt, hidden-0.bin, state.json that quantlm did "
                                           r"not write .*choose an empty folder"):
        RunState.open(folder, "f" * 64)
    assert all((folder / n).read_text() == "the user's" for n in ("state.json", "hidden-0.bin", "block-0001.pt"))
    assert not lock_path(folder).exists()  # released on the refusal
    RunState(folder, "f" * 64).remove()  # no marker: removes nothing
    assert len(list(folder.iterdir())) == 3
    (tmp_path / "file").write_text("x")
    with pytest.raises(QuantlmError, match="is a file; name a folder"):
        RunState.open(tmp_path / "file", "f" * 64)


def test_stale_state_of_another_run_is_not_resumed(tmp_path):
    state = RunState.open(tmp_path / "s", "aaaa")
    state.mark_started()
    state.release()
    fresh = RunState.open(tmp_path / "s", "bbbb")
    assert not fresh.started and fresh.next_block == 0 and not (tmp_path / "s" / "state.json").exists()
    fresh.release()
    again = RunState.open(tmp_path / "t", "cccc")
    again.mark_started()
    again.release()
    resumed = RunState.open(tmp_path / "t", "cccc")
    assert resumed.started
    resumed.release()
    assert not RunState.open(tmp_path / "t", "cccc", resume=False).started


_HOLD_STATE = """
import sys, time
from quantlm.gptq.offload import RunState
RunState.open(sys.argv[1], "a" * 64)
print("held", flush=True)
time.sleep(120)
"""


def test_a_live_run_s_offload_folder_is_refused_to_a_second_run(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_STATE, str(tmp_path / "off")], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(QuantlmError, match=rf"off is in use by another quantlm quantize \(offload state\) "
                                               rf"\(pid {holder.pid} on"):
            RunState.open(tmp_path / "off", "a" * 64)  # the same run, even: never two writers on one state
    finally:
        holder.kill()
        holder.wait()
    RunState.open(tmp_path / "off", "a" * 64).remove()  # the holder is dead: its lock is stale


# ----------------------------------------------------------------------------------- forward dtypes

@pytest.mark.parametrize("device", DEVICES)
def test_bf16_forwards_keep_fp32_hessians_and_exact_codes(base, tokens, device):
    _, fp32 = _run(base, tokens, device=device)
    model, bf16 = _run(base, tokens, memory=MemorySettings(forward_dtype="bfloat16"), device=device)
    e32, e16 = sum(m.error for m in fp32.modules), sum(m.error for m in bf16.modules)
    assert e16 == pytest.approx(e32, rel=0.1)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())  # back afterwards
    for name, res in bf16.results.items():
        assert torch.equal(model.get_submodule(name).weight.data, res.dequantize())
    assert bf16.measured["activation_dtype"] == "bfloat16" and fp32.measured["activation_dtype"] == "float32"
    if device == "cuda":  # the device's memory as the allocator held it, next to the plan
        for run in (fp32, bf16):
            assert 0 < run.measured["device_peak_bytes"] <= run.measured["device_reserved_peak_bytes"]
            assert run.plan["predicted_device_peak_bytes"] >= run.plan["predicted_device_allocated_bytes"]
        assert bf16.plan["device_bytes"]["hidden_buffers"] * 2 == fp32.plan["device_bytes"]["hidden_buffers"]


@pytest.mark.parametrize("device", DEVICES)
def test_tf32_hessians_only_when_the_recipe_opts_in(base, tokens, device):
    """With the caller's global matmul precision at "high" (TF32 on CUDA), a Hessian is full fp32 unless the recipe
    opts in; opted in, CUDA accumulates in TF32 (close, not equal) and the CPU, which has no TF32, is unchanged."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 300, 256, generator=gen) + 0.5 * torch.randn(256, generator=gen)
    exact = (2 / 1200) * (x.reshape(-1, 256).double().T @ x.reshape(-1, 256).double())
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        errs = {}
        for tf32 in (False, True):
            acc = HessianAccumulator(256, device, allow_tf32=tf32)
            for part in x:
                acc.add(part.to(device))
            errs[tf32] = float((acc.H.double().cpu() - exact).norm() / exact.norm())
        _, plain = _run(base, tokens, device=device)
        _, opted = _run(base, tokens, device=device, recipe=gptq_settings(**RECIPE, hessian_tf32=True))
    finally:
        torch.set_float32_matmul_precision(previous)
    assert errs[False] < 1e-5
    e0, e1 = sum(m.error for m in plain.modules), sum(m.error for m in opted.modules)
    if device == "cpu":
        assert errs[True] == errs[False]
        _same(plain, opted)
    else:
        assert 1e-5 < errs[True] < 1e-2
        assert e1 == pytest.approx(e0, rel=0.05)


@pytest.mark.parametrize("forward", ["bfloat16", "float16"])
def test_half_precision_forwards_store_hidden_states_in_their_dtype(base, tokens, forward):
    """By default (activation_dtype auto) the hidden states are kept in the forward dtype: half the memory of fp32
    buffers for the same codes (each block reads its inputs in the forward dtype either way); the plan counts what
    the pipeline stores; an explicit activation_dtype wins; fp32 forwards keep fp32."""
    kw = dict(available_bytes=10**12, disk_available_bytes=10**12)
    half = plan_memory(SPECTRA_39B, 512, 2048, MemorySettings(offload="host", forward_dtype=forward), 4, 128, "cpu",
                       **kw)
    wide = plan_memory(SPECTRA_39B, 512, 2048, MemorySettings(offload="host", forward_dtype=forward,
                                                              activation_dtype="float32"), 4, 128, "cpu", **kw)
    fp32 = plan_memory(SPECTRA_39B, 512, 2048, MemorySettings(offload="host"), 4, 128, "cpu", **kw)
    assert (half["activation_dtype"], wide["activation_dtype"], fp32["activation_dtype"]) == (forward, "float32",
                                                                                              "float32")
    assert half["bytes"]["hidden_buffers"] * 2 == wide["bytes"]["hidden_buffers"] == fp32["bytes"]["hidden_buffers"]
    gpu = plan_memory(SPECTRA_39B, 512, 2048, MemorySettings(forward_dtype=forward), 4, 128, "cuda",
                      device_available_bytes=140 * 10**9, **kw)
    assert gpu["hidden_states"] == "device" and gpu["device_bytes"]["hidden_buffers"] == 2 * 512 * 2048 * 3072 * 2
    _, auto = _run(base, tokens, memory=MemorySettings(forward_dtype=forward))
    _, stored32 = _run(base, tokens, memory=MemorySettings(forward_dtype=forward, activation_dtype="float32"))
    assert auto.measured["activation_dtype"] == auto.plan["activation_dtype"] == forward
    assert stored32.measured["activation_dtype"] == stored32.plan["activation_dtype"] == "float32"
    assert auto.plan["bytes"]["hidden_buffers"] * 2 == stored32.plan["bytes"]["hidden_buffers"]
    _same(auto, stored32)
    _, plain = _run(base, tokens)
    assert plain.measured["activation_dtype"] == plain.plan["activation_dtype"] == "float32"


def test_plan_counts_what_the_gpu_allocator_reserves():
    """The device plan counts the caching allocator's reserve on top of the tensors (max_memory_reserved, not only
    max_memory_allocated): a GPU whose free memory holds the tensors but not the reserve gets another placement."""
    from quantlm.gptq.memory import K_CUDA_RESERVED

    kw = dict(available_bytes=10**12, disk_available_bytes=10**12)
    fixed = MemorySettings(offload="none", batch_size=16, replay_cache_gb=20.0)
    roomy = plan_memory(SPECTRA_39B, 512, 2048, fixed, 4, 128, "cuda", device_available_bytes=10**12, **kw)
    dev = roomy["device_bytes"]
    assert dev["replay_cache"] > 0
    assert dev["allocator_reserve"] == int(K_CUDA_RESERVED * (dev["replay_cache"] + dev["working_set"]))
    allocated = roomy["predicted_device_allocated_bytes"]
    assert allocated == sum(v for k, v in dev.items() if k != "allocator_reserve")
    assert roomy["predicted_device_peak_bytes"] == sum(dev.values()) > allocated
    # free memory between the two: the tensors would fit, what the allocator holds would not
    between = int((allocated + roomy["predicted_device_peak_bytes"]) / 2 / 0.95)
    tight = plan_memory(SPECTRA_39B, 512, 2048, fixed, 4, 128, "cuda", device_available_bytes=between, **kw)
    assert not tight["fits"]
    auto = plan_memory(SPECTRA_39B, 512, 2048, MemorySettings(batch_size=16, replay_cache_gb=20.0), 4, 128, "cuda",
                       device_available_bytes=between, **kw)
    assert auto["fits"] and auto["hidden_states"] == "host"
    # the auto replay cache leaves room for the reserve: the whole plan fits whatever the GPU
    for gb in (40, 80, 140):
        p = plan_memory(SPECTRA_39B, 512, 2048, MemorySettings(), 4, 128, "cuda", device_available_bytes=gb * 10**9,
                        **kw)
        assert p["fits"] and p["predicted_device_peak_bytes"] <= 0.95 * gb * 10**9, (gb, p["device_bytes"])


def test_a_model_loaded_in_bf16_quantizes_like_its_fp32_upcast(base, tokens):
    rounded = copy.deepcopy(base)
    for p in rounded.parameters():
        p.data = p.data.bfloat16().float()
    half = copy.deepcopy(rounded)
    for p in half.parameters():  # parameters only: from_pretrained(dtype=bf16) keeps the rotary buffer fp32
        p.data = p.data.bfloat16()
    _, a = _run(rounded, tokens)
    model, b = _run(half, tokens)
    _same(a, b)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_hessian_take_and_bf16_inputs():
    x = torch.randn(3, 7, 40).bfloat16()
    acc, ref = HessianAccumulator(40), HessianAccumulator(40)
    acc.add(x)
    ref.add(x.float())
    H = ref.H.clone()
    assert torch.equal(acc.H, H)
    assert torch.equal(acc.take(), H) and torch.equal(H, H.t())
    with pytest.raises(RuntimeError):
        acc.take()


@pytest.mark.parametrize("caller", ["high", "medium", "highest"])
def test_tf32_context_never_leaves_the_two_torch_apis_disagreeing(caller):
    """Under a caller's set_float32_matmul_precision, the full-fp32 (and the TF32) block reads consistently through
    the legacy flag (torch raises on a state mixed by its two APIs: the solver's block did that under "high"), and
    the caller's precision and flags come back exactly."""
    mm = torch.backends.cuda.matmul
    if not hasattr(mm, "fp32_precision"):
        pytest.skip("torch without the fp32_precision API")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(caller)
    try:
        before = (torch.get_float32_matmul_precision(), mm.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
        with tf32_matmul(False):
            assert mm.allow_tf32 is False and mm.fp32_precision == "ieee"
            assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
        with tf32_matmul(True):
            assert mm.allow_tf32 is True and mm.fp32_precision == "tf32"
            assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
        assert (torch.get_float32_matmul_precision(), mm.fp32_precision,
                torch.backends.mkldnn.matmul.fp32_precision) == before
        assert mm.allow_tf32 == (caller != "highest")  # still readable: the caller's consistent state is back
    finally:
        torch.set_float32_matmul_precision(previous)


def test_tf32_context_restores_the_global_setting():
    mm = torch.backends.cuda.matmul
    before = mm.fp32_precision if hasattr(mm, "fp32_precision") else mm.allow_tf32
    with tf32_matmul(True):
        now = mm.fp32_precision if hasattr(mm, "fp32_precision") else mm.allow_tf32
        assert now in ("tf32", True)
    after = mm.fp32_precision if hasattr(mm, "fp32_precision") else mm.allow_tf32
    assert after == before


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("forward", ["float32", "bfloat16"])
def test_hidden_state_locations_give_identical_codes(base, tokens, tmp_path, device, forward):
    """Device-resident (a CPU run keeps them in host memory), host and disk hidden states: the same codes."""
    runs = {}
    for where in ("none", "host", "disk"):
        s = MemorySettings(offload=where, offload_dir=str(tmp_path / where), forward_dtype=forward)
        _, runs[where] = _run(base, tokens, memory=s, device=device)
    assert runs["none"].plan["hidden_states"] == ("device" if device == "cuda" else "host")
    assert runs["host"].plan["hidden_states"] == "host" and runs["disk"].plan["hidden_states"] == "disk"
    _same(runs["none"], runs["host"])
    _same(runs["none"], runs["disk"])
    if device == "cuda":
        assert runs["none"].measured["device_peak_bytes"] > 0


def test_dtype_bytes_cover_every_setting():
    hints = MemorySettings.__annotations__
    for name in ("activation_dtype", "forward_dtype"):
        assert set(str(hints[name]).split("[")[1].rstrip("]").replace("'", "").replace('"', "").split(", ")) <= set(
            DTYPE_BYTES) | {"auto"}
    assert MemorySettings(activation_dtype="auto", forward_dtype="float16").storage_dtype == "float16"


def test_large_batches_run_from_the_heap_with_trims_same_results(base, tokens, monkeypatch):
    from quantlm.gptq import memory
    from quantlm.specs import get_preset

    config = get_preset("floatlm-99m").to_hf_config().to_dict()
    spectra = plan_memory(config, 512, 2048, MemorySettings(), 4, 128, "cpu", available_bytes=24 * 2**30)
    assert spectra["large_tensors_in_heap"] and spectra["trim_allocator"]  # 84 MB MLP activations per batch
    bench = plan_memory(config, 32, 512, MemorySettings(), 4, 128, "cpu", available_bytes=24 * 2**30)
    assert not bench["large_tensors_in_heap"] and not bench["trim_allocator"]  # 21 MB: glibc keeps them in the heap
    assert spectra["bytes"]["heap_fragments"] > 0 and "heap_fragments" not in bench["bytes"]
    big = plan_memory(get_preset("floatlm-390m").to_hf_config().to_dict(), 512, 2048, MemorySettings(), 4, 128, "cpu",
                      available_bytes=24 * 2**30)
    assert not big["large_tensors_in_heap"]  # 16 GB of 24: not ample, the mmap-served (validated) model applies
    _, plain = _run(base, tokens)
    monkeypatch.setattr(memory, "MMAP_THRESHOLD_MAX", 0)  # every batch counts as large
    _, heap = _run(base, tokens)
    assert heap.plan["large_tensors_in_heap"] and heap.plan["trim_allocator"]
    _same(plain, heap)  # the allocator moves pages, never numbers


def test_plan_counts_pinned_host_buffers_at_the_allocators_power_of_two():
    """On a GPU run with hidden states in host memory the buffers are pinned, and PyTorch's pinned allocator rounds
    each up to a power of two: the 3.9B shape's two 12.9 GB fp32 buffers pin 2 x 16 GiB, not 25.8 GB."""
    from quantlm.gptq.memory import pinned_bytes

    assert pinned_bytes(1) == 1 and pinned_bytes(4096) == 4096 and pinned_bytes(4097) == 8192 and pinned_bytes(0) == 0
    one = 512 * 2048 * 3072 * 4
    kw = dict(available_bytes=10**12, disk_available_bytes=10**12, device_available_bytes=24 * 10**9)
    gpu = plan_memory(SPECTRA_39B, 512, 2048, MemorySettings(offload="host"), 4, 128, "cuda", **kw)
    cpu = plan_memory(SPECTRA_39B, 512, 2048, MemorySettings(offload="host"), 4, 128, "cpu", **kw)
    assert gpu["bytes"]["hidden_buffers"] == 2 * 2**34 > 2 * one
    assert cpu["bytes"]["hidden_buffers"] == 2 * one  # not pinned on a CPU run
