"""Layer-sequential GPTQ over the tiny LLaMA: true-sequential inputs, all bitwidths, determinism, errors."""

from __future__ import annotations

import pytest
import torch

from quantlm.architectures import LLAMA
from quantlm.errors import QuantlmError
from quantlm.gptq.hessian import HessianAccumulator
from quantlm.gptq.memory import MemorySettings
from quantlm.gptq.pipeline import quantize_blocks
from quantlm.gptq.settings import GPTQSettings
from quantlm.gptq.solver import reconstruction_error
from quantlm.hf_checkpoint import load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def fresh(tiny_model_dir):
    """A function returning a fresh copy of the tiny model (loading it from disk once is the slow part)."""
    import copy

    base = load_causal_lm(tiny_model_dir)
    return lambda: copy.deepcopy(base)


@pytest.fixture(scope="module")
def tokens(tiny_model_dir):
    from quantlm.calibration import calibration_tokens

    return calibration_tokens(load_tokenizer(tiny_model_dir), None, 8, 48, seed=0)


def _recipe(**kw) -> GPTQSettings:
    return GPTQSettings(**{"bits": 4, "group_size": 4, **kw})


def _final_model_errors(original, quantized, tokens) -> dict[str, float]:
    """reconstruction_error of every module on the inputs it sees inside the fully quantized model."""
    accs, handles = {}, []
    layers = quantized.get_submodule(LLAMA.layers_path)
    for i, block in enumerate(layers):
        for group in LLAMA.sequential:
            lin = block.get_submodule(group[0])
            acc = HessianAccumulator(lin.in_features, "cpu")
            for name in group:
                accs[f"{LLAMA.layers_path}.{i}.{name}"] = acc
            handles.append(lin.register_forward_pre_hook(lambda _m, a, acc=acc: acc.add(a[0].float())))
    with torch.no_grad():
        for b in range(0, tokens.shape[0], 8):
            quantized(input_ids=tokens[b : b + 8])
    for h in handles:
        h.remove()
    return {name: reconstruction_error(original.get_submodule(name).weight.detach().float(),
                                       quantized.get_submodule(name).weight.detach().float(), acc.H)
            for name, acc in accs.items()}


def test_true_sequential_hessians_are_those_of_the_quantized_model(fresh, tokens):
    original = fresh()
    model = fresh()
    run = quantize_blocks(model, LLAMA, tokens, _recipe(bits=3), progress=False)
    names = [f"{LLAMA.layers_path}.{i}.{n}" for i in range(2) for n in LLAMA.linears]
    assert [m.name for m in run.modules] == names and set(run.results) == set(names)
    # each module's error, as the pipeline saw it, equals the error on its inputs in the final quantized
    # model: proof that every group was calibrated on the outputs of the already-quantized layers
    expected = _final_model_errors(original, model, tokens)
    for m in run.modules:
        assert m.error == pytest.approx(expected[m.name], rel=1e-3), m.name
        assert m.loss > 0 and m.seconds >= 0 and m.damp > 0 and m.nsamples == tokens.numel()
    for name, res in run.results.items():  # weights in the model are the dequantized codes
        assert torch.equal(model.get_submodule(name).weight.data, res.dequantize())
    # with true_sequential off the later groups see unquantized inputs: different Hessians, different codes
    other = fresh()
    run2 = quantize_blocks(other, LLAMA, tokens, _recipe(bits=3, true_sequential=False), progress=False)
    q0 = run.results[f"{LLAMA.layers_path}.0.self_attn.q_proj"]
    assert torch.equal(q0.q, run2.results[f"{LLAMA.layers_path}.0.self_attn.q_proj"].q)  # first group: same
    assert not torch.equal(run.results[f"{LLAMA.layers_path}.0.mlp.down_proj"].q,
                           run2.results[f"{LLAMA.layers_path}.0.mlp.down_proj"].q)


@pytest.mark.parametrize("bits", range(2, 9))
def test_every_bitwidth_quantizes_the_172_wide_down_proj(fresh, tokens, bits):
    model = fresh()
    gs = -1 if bits % 2 else 4
    run = quantize_blocks(model, LLAMA, tokens[:4], _recipe(bits=bits, group_size=gs), progress=False)
    down = run.results[f"{LLAMA.layers_path}.1.mlp.down_proj"]
    assert down.q.shape == (64, 172) and int(down.q.max()) <= (1 << bits) - 1
    assert down.scale.shape == (64, 1 if gs == -1 else 43)
    assert all(torch.isfinite(torch.tensor(m.error)) for m in run.modules)


def test_gptq_beats_round_to_nearest(fresh, tokens):
    for bits in (3, 4):
        errs = {}
        for rtn in (False, True):
            model = fresh()
            method = "rtn" if rtn else "gptq"
            run = quantize_blocks(model, LLAMA, tokens, _recipe(bits=bits, group_size=-1, method=method),
                                  progress=False)
            errs[rtn] = sum(m.error for m in run.modules)
        assert errs[False] < 0.9 * errs[True], (bits, errs)


def test_deterministic(fresh, tokens):
    runs = []
    for _ in range(2):
        model = fresh()
        runs.append(quantize_blocks(model, LLAMA, tokens, _recipe(bits=3), memory=MemorySettings(batch_size=3),
                                    progress=False))
    for name, res in runs[0].results.items():
        other = runs[1].results[name]
        assert torch.equal(res.q, other.q) and torch.equal(res.scale, other.scale)
        assert res.loss == other.loss


def test_batch_size_does_not_change_the_result(fresh, tokens):
    out = []
    for bs in (1, 8):
        model = fresh()
        out.append(quantize_blocks(model, LLAMA, tokens, _recipe(), memory=MemorySettings(batch_size=bs),
                                   progress=False))
    for name, res in out[0].results.items():
        torch.testing.assert_close(res.dequantize(), out[1].results[name].dequantize(), rtol=0, atol=0.05)


def test_errors(fresh, tokens):
    model = fresh()
    with pytest.raises(QuantlmError, match="does not divide the input width 64"):
        quantize_blocks(model, LLAMA, tokens, _recipe(group_size=128), progress=False)
    with pytest.raises(QuantlmError, match="does not divide the input width 172"):
        quantize_blocks(model, LLAMA, tokens, _recipe(group_size=8), progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(QuantlmError, match="no CUDA GPU"):
            quantize_blocks(model, LLAMA, tokens, _recipe(), device="cuda", progress=False)
    model.get_submodule("model.layers.1.mlp.up_proj").weight.data[3, 5] = float("nan")
    with pytest.raises(QuantlmError, match="NaN or Inf"):
        quantize_blocks(model, LLAMA, tokens, _recipe(), progress=False)


@pytest.mark.gpu
def test_cuda_matches_cpu(fresh, tokens):
    runs = {}
    for device in ("cpu", "cuda"):
        model = fresh()
        runs[device] = quantize_blocks(model, LLAMA, tokens, _recipe(bits=4), device=device, progress=False)
        assert all(p.device.type == "cpu" for p in model.parameters())  # the model ends on the CPU
    cpu = sum(m.error for m in runs["cpu"].modules)
    gpu = sum(m.error for m in runs["cuda"].modules)
    assert gpu == pytest.approx(cpu, rel=0.05)


def test_solves_and_hessians_run_in_full_fp32_whatever_the_caller_set(fresh, tokens, monkeypatch):
    """A caller's global TF32 (CUDA) or bf16 (oneDNN) setting for fp32 matmuls does not reach the Hessians or the
    solves, and comes back unchanged afterwards; the codes are those of a run without it."""
    from quantlm.gptq import hessian
    from quantlm.gptq.methods import Quantizer, get_quantizer, register_quantizer

    cuda, mkl = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    seen = []

    def flags():
        return cuda.fp32_precision, mkl.fp32_precision

    gptq = get_quantizer("gptq")

    def spying(Ws, H, s, names):
        seen.append(("solve", flags()))
        return gptq.solve(Ws, H, s, names)

    panels = hessian.gram_panels

    def spying_panels(*a, **kw):
        seen.append(("hessian", flags()))
        yield from panels(*a, **kw)

    register_quantizer(Quantizer("test-spy-gptq", spying), replace=True)
    monkeypatch.setattr(hessian, "gram_panels", spying_panels)
    plain = quantize_blocks(fresh(), LLAMA, tokens, _recipe(bits=3), progress=False)
    cuda.fp32_precision, mkl.fp32_precision = "tf32", "bf16"
    try:
        run = quantize_blocks(fresh(), LLAMA, tokens, _recipe(bits=3, method="test-spy-gptq"), progress=False)
        assert flags() == ("tf32", "bf16")  # the caller's settings are back
    finally:
        cuda.fp32_precision, mkl.fp32_precision = "none", "none"
    assert {k for k, _ in seen} == {"solve", "hessian"}
    assert all(f == ("ieee", "ieee") for _, f in seen), seen
    for name, res in plain.results.items():
        assert torch.equal(res.q, run.results[name].q), name


def test_solve_times_wait_for_the_device(monkeypatch):
    """On CUDA the solve timer starts and stops only after the queued kernels finish (the forwards and Hessian
    products before it would otherwise count as solve time); on the CPU nothing is synchronized."""
    from quantlm.gptq import pipeline

    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    pipeline._clock(torch.device("cpu"))
    assert synced == []
    pipeline._clock(torch.device("cuda:1"))
    assert synced == [torch.device("cuda:1")]
