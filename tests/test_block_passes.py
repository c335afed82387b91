"""Replayed block passes and the oneDNN CPU products: same numbers as recomputing, safe fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantlm.architectures import LLAMA
from quantlm.gptq.block_passes import BlockPasses
from quantlm.gptq.cpu_linear import gram_panels, linear, onednn_available, onednn_linears, override_forward
from quantlm.gptq.pipeline import capture_block_inputs, quantize_blocks
from quantlm.gptq.settings import GPTQSettings
from quantlm.hf_checkpoint import load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def model_and_tokens(tiny_model_dir):
    from quantlm.calibration import calibration_tokens

    tokens = calibration_tokens(load_tokenizer(tiny_model_dir), None, 6, 40, seed=1)
    return load_causal_lm(tiny_model_dir), tokens


def _run(model, tokens, replay_cache_gb=-1.0, **kw):
    import copy

    from quantlm.gptq.memory import MemorySettings

    recipe = GPTQSettings(bits=3, group_size=4)
    memory = MemorySettings(batch_size=4, replay_cache_gb=replay_cache_gb)
    return quantize_blocks(copy.deepcopy(model), LLAMA, tokens, recipe, memory=memory, progress=False, **kw)


def test_replay_gives_the_same_codes_as_recomputing(model_and_tokens):
    model, tokens = model_and_tokens
    replayed, recomputed = _run(model, tokens), _run(model, tokens, replay_cache_gb=0)
    for name, res in replayed.results.items():
        other = recomputed.results[name]
        assert torch.equal(res.q, other.q) and torch.equal(res.scale, other.scale), name
    assert [m.error for m in replayed.modules] == [m.error for m in recomputed.modules]


def _llama_passes(block, hidden, kwargs, tails):
    """The true-sequential passes over ``block`` with unchanged weights: what each pass left to replay."""
    passes = BlockPasses(block, LLAMA.linears, hidden, kwargs, torch.device("cpu"), torch.device("cpu"), 2**30, tails)
    seen = []
    for group in LLAMA.sequential:
        passes.collect([block.get_submodule(group[0])], [lambda x: None], stop=True)
        seen.append(passes.cached)
    return passes, seen


def test_llama_passes_replay_the_finished_submodules(model_and_tokens):
    model, tokens = model_and_tokens
    hidden, per_block = capture_block_inputs(model, LLAMA, tokens, 4, torch.device("cpu"))
    kwargs = {b: kws[0] for b, kws in per_block.items()}  # the first block's
    blocks = model.get_submodule(LLAMA.layers_path)
    with torch.no_grad():
        passes, seen = _llama_passes(blocks[0], hidden, kwargs, None)
        assert seen == [[], ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn"],
                        ["self_attn", "mlp.gate_proj", "mlp.up_proj"]]
        hidden1 = passes.outputs()
        reference = [blocks[0](h, **kwargs[h.shape[0]]) for h in hidden]
        for out, ref in zip(hidden1, reference, strict=True):
            assert torch.equal(out, (ref[0] if isinstance(ref, tuple) else ref).float())
        assert passes.cached == [] and "forward" not in blocks[0].self_attn.__dict__  # overrides are gone
        # the passes learned which submodules end in a linear; the next block uses that: the attention is
        # finished (o_proj's output left as a slot) in the pass for o_proj, the MLP in the pass for down_proj
        assert passes.tails == {"self_attn": "self_attn.o_proj", "mlp": "mlp.down_proj"}
        passes1, seen1 = _llama_passes(blocks[1], hidden1, kwargs, passes.tails)
        assert seen1 == [[], ["self_attn"], ["self_attn"], ["self_attn", "mlp"]]
        reference = [blocks[1](h, **kwargs[h.shape[0]]) for h in hidden1]
        for out, ref in zip(passes1.outputs(), reference, strict=True):
            assert torch.equal(out, (ref[0] if isinstance(ref, tuple) else ref).float())
        assert "forward" not in blocks[1].self_attn.o_proj.__dict__


class _Toy(nn.Module):
    """a -> (edited in place) -> b; ``twice`` calls ``a`` two times per forward."""

    def __init__(self, twice: bool = False, in_place: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)
        self.twice, self.in_place = twice, in_place

    def forward(self, h):
        y = self.a(h)
        if self.in_place:
            y.mul_(2.0)  # corrupts a's recorded output after the fact
        if self.twice:
            y = y + self.a(h * 0.5)
        return self.b(torch.relu(y))


@pytest.mark.parametrize("kind", ["plain", "in_place", "twice", "over_budget"])
def test_replay_falls_back_to_recomputing_when_unsafe(kind):
    toy = _Toy(twice=kind == "twice", in_place=kind == "in_place")
    hidden = [torch.randn(3, 5, 8), torch.randn(2, 5, 8)]
    budget = 16 if kind == "over_budget" else 2**20
    passes = BlockPasses(toy, ["a", "b"], hidden, {3: {}, 2: {}}, torch.device("cpu"), torch.device("cpu"), budget)
    inputs = []
    passes.collect([toy.a], [inputs.append], stop=True)
    passes.collect([toy.b], [inputs.append], stop=True)
    assert passes.cached == (["a"] if kind == "plain" else [])
    with torch.no_grad():
        toy.b.weight.mul_(-1)  # "quantize" b: the outputs must use the new weight and a's true output
        expected = [toy(h) for h in hidden]
        outs = passes.outputs()
    for out, ref in zip(outs, expected, strict=True):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert len(inputs) == 4


@pytest.mark.skipif(not onednn_available(), reason="torch without oneDNN")
def test_onednn_products_match_torch():
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 7, 40, generator=gen), torch.randn(24, 40, generator=gen), torch.randn(24, generator=gen)
    torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear(x.double(), w.double()), F.linear(x.double(), w.double()))  # fallback
    flat = x.reshape(-1, 40)
    upper = torch.zeros(40, 40)
    for a, e, panel in gram_panels(flat, [0, 16, 32]):
        upper[a:e, a:] = panel
    torch.testing.assert_close(torch.triu(upper), torch.triu(flat.T @ flat), rtol=1e-5, atol=1e-4)
    lin = nn.Linear(40, 24)
    with torch.no_grad(), onednn_linears(nn.Sequential(lin)) as n:
        assert n == 1 and "forward" in lin.__dict__
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    assert "forward" not in lin.__dict__
    marker = lin.forward
    lin.forward = marker  # an existing instance override survives a nested override
    with override_forward(lin, lambda x: x):
        assert lin(x) is x
    assert lin.forward is marker


class _Inner(nn.Module):
    def __init__(self, ends_in_linear: bool):
        super().__init__()
        self.l1, self.l = nn.Linear(8, 8), nn.Linear(8, 8)
        self.ends_in_linear = ends_in_linear

    def forward(self, x):
        y = self.l(torch.tanh(self.l1(x)))
        return y if self.ends_in_linear else y * 2


class _TailToy(nn.Module):
    def __init__(self, ends_in_linear: bool):
        super().__init__()
        torch.manual_seed(0)
        self.p, self.b = _Inner(ends_in_linear), nn.Linear(8, 4)

    def forward(self, h):
        return self.b(self.p(h) + h)


@pytest.mark.parametrize("ends_in_linear", [True, False])
@pytest.mark.parametrize("told", [True, False])
def test_tails_are_learned_used_and_dropped_when_wrong(ends_in_linear, told):
    toy = _TailToy(ends_in_linear)
    hidden = [torch.randn(3, 5, 8), torch.randn(2, 5, 8)]
    tails = {"p": "p.l"} if told else None  # told: as if an earlier block had taught it (wrongly, if not ends)
    passes = BlockPasses(toy, ["p.l1", "p.l", "b"], hidden, {3: {}, 2: {}}, torch.device("cpu"),
                         torch.device("cpu"), 2**20, tails)
    with torch.no_grad():
        cached = []
        for name in ("p.l1", "p.l", "b"):
            lin = toy.get_submodule(name)
            passes.collect([lin], [lambda x: None], stop=True)
            lin.weight.mul_(-0.5)  # "quantize" the group: later passes must see the new weight
            cached.append(passes.cached)
        outs = passes.outputs()
        expected = [toy(h) for h in hidden]
    for out, ref in zip(outs, expected, strict=True):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    used = told and ends_in_linear
    assert cached[1] == (["p"] if used else ["p.l1"])
    assert passes.tails == ({"p": "p.l"} if ends_in_linear else {})
    assert "forward" not in toy.p.l.__dict__


@pytest.mark.parametrize("stop", [False, True])
def test_a_batch_linear_outputs_are_released_before_the_next_batch(model_and_tokens, stop):
    """No pass keeps batch 0's linear outputs (watched to learn the tails) alive while the later batches run
    (at 3.9B they were ~2.8 GB fp32 held for the whole pass)."""
    import weakref

    model, tokens = model_and_tokens
    hidden, per_block = capture_block_inputs(model, LLAMA, tokens, 2, torch.device("cpu"))
    kwargs = {b: kws[0] for b, kws in per_block.items()}  # the first block's
    assert len(hidden) == 3
    block = model.get_submodule(LLAMA.layers_path)[0]
    refs: dict[int, list] = {}
    alive: dict[int, int] = {}
    batch = {"i": -1}

    def watch(_m, _args, out):
        refs.setdefault(batch["i"], []).append(weakref.ref(out))

    def at_batch_start(_m, _args):
        batch["i"] += 1
        alive[batch["i"]] = sum(r() is not None for b, rs in refs.items() if b < batch["i"] for r in rs)

    handles = [block.register_forward_pre_hook(at_batch_start)]
    handles += [block.get_submodule(n).register_forward_hook(watch) for n in LLAMA.linears]
    passes = BlockPasses(block, LLAMA.linears, hidden, kwargs, torch.device("cpu"), torch.device("cpu"),
                         0, None)  # no replay records: nothing may outlive its batch
    try:
        with torch.no_grad():
            target = block.get_submodule("mlp.down_proj") if stop else block.get_submodule(LLAMA.linears[0])
            passes.collect([target], [lambda x: None], stop=stop)
    finally:
        for h in handles:
            h.remove()
    assert len(refs[0]) == (len(LLAMA.linears) - 1 if stop else len(LLAMA.linears))
    assert alive == {0: 0, 1: 0, 2: 0}
