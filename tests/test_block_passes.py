"""Replayed block passes and the oneDNN CPU products: same numbers as recomputing, safe fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantlm.checkpoint import load_causal_lm, load_tokenizer
from quantlm.gptq.block_passes import BlockPasses
from quantlm.gptq.cpu_linear import gram_panels, linear, onednn_available, onednn_linears, override_forward
from quantlm.gptq.pipeline import capture_block_inputs, quantize_blocks
from quantlm.models.blocks import LLAMA
from quantlm.recipes import QuantRecipe


@pytest.fixture(scope="module")
def model_and_tokens(tiny_model_dir):
    from quantlm.calibration import calibration_tokens

    tokens = calibration_tokens(load_tokenizer(tiny_model_dir), None, 6, 40, seed=1)
    return load_causal_lm(tiny_model_dir), tokens


def _run(model, tokens, **kw):
    import copy

    recipe = QuantRecipe(bits=3, group_size=4, nsamples=tokens.shape[0], seqlen=tokens.shape[1])
    return quantize_blocks(copy.deepcopy(model), LLAMA, tokens, recipe, batch_size=4, progress=False, **kw)


def test_replay_gives_the_same_codes_as_recomputing(model_and_tokens):
    model, tokens = model_and_tokens
    replayed, recomputed = _run(model, tokens), _run(model, tokens, replay_cache_gb=0)
    for name, res in replayed.results.items():
        other = recomputed.results[name]
        assert torch.equal(res.q, other.q) and torch.equal(res.scale, other.scale), name
    assert [m.error for m in replayed.modules] == [m.error for m in recomputed.modules]


def test_llama_passes_replay_the_finished_submodules(model_and_tokens):
    model, tokens = model_and_tokens
    hidden, kwargs = capture_block_inputs(model, LLAMA, tokens, 4, torch.device("cpu"))
    block = model.get_submodule(LLAMA.layers_path)[0]
    passes = BlockPasses(block, LLAMA.linears, hidden, kwargs, torch.device("cpu"), torch.device("cpu"), 2**30)
    with torch.no_grad():
        reference = [block(h, **kwargs[h.shape[0]]) for h in hidden]
    reference = [r[0] if isinstance(r, tuple) else r for r in reference]
    seen = []
    for group in LLAMA.sequential:  # weights unchanged: only the replay is exercised
        passes.collect([block.get_submodule(group[0])], [lambda x: None], stop=True)
        seen.append(passes.cached)
    assert seen == [[], ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn"],
                    ["self_attn", "mlp.gate_proj", "mlp.up_proj"]]
    for out, ref in zip(passes.outputs(), reference, strict=True):
        assert torch.equal(out, ref.float())
    assert passes.cached == []
    assert "forward" not in block.self_attn.__dict__  # the replay overrides are gone


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
