"""TriLM: the ternary quantizer, its straight-through gradient, conversion and the unpacked export."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from quantlm.architectures import COLUMN, LLAMA, ROW
from quantlm.errors import QuantlmError
from quantlm.models.trilm import (
    TernaryLinear,
    build_trilm,
    convert_to_trilm,
    dequantize,
    export_unpacked,
    ternarize,
)
from quantlm.specs import ModelSpec


def _spec(mp: int) -> ModelSpec:
    # Widths divisible by 1, 2, 3 and 6 so every MP of the test shards evenly.
    return ModelSpec(name=f"t-mp{mp}", family="trilm", size="t", hidden_size=96, intermediate_size=192,
                     num_attention_heads=4, num_hidden_layers=2, model_parallel=mp, vocab_size=256,
                     max_position_embeddings=64)


@pytest.mark.parametrize("kind", [COLUMN, ROW])
@pytest.mark.parametrize("mp", [1, 2, 3])
def test_ternarize_matches_the_per_shard_definition(kind, mp):
    torch.manual_seed(mp)
    w = torch.randn(12, 18)
    codes, gamma = ternarize(w, mp, kind)
    assert codes.dtype == torch.int8 and set(codes.unique().tolist()) <= {-1, 0, 1}
    chunks = w.chunk(mp, dim=0 if kind == COLUMN else 1)
    code_chunks = codes.chunk(mp, dim=0 if kind == COLUMN else 1)
    for s, (chunk, c) in enumerate(zip(chunks, code_chunks, strict=True)):
        g = 1e-5 + chunk.abs().mean()
        assert torch.isclose(gamma[s], g, rtol=0, atol=1e-7)
        assert torch.equal(c.float(), torch.round(torch.clamp(chunk / g, -1, 1)))


def test_ternary_linear_forward_and_straight_through_backward():
    torch.manual_seed(0)
    lin = TernaryLinear(16, 12, mp=2, kind=ROW)
    x = torch.randn(5, 16, requires_grad=True)
    y = lin(x)
    codes, gamma = ternarize(lin.weight, 2, ROW)
    w_eff = dequantize(codes, gamma, ROW)
    assert torch.equal(y, torch.nn.functional.linear(x, w_eff))
    g = torch.randn_like(y)
    y.backward(g)
    # Straight-through: the latent weight gets dL/dW_eff = g^T x; the input sees the ternary weight.
    assert torch.allclose(lin.weight.grad, g.T @ x.detach(), atol=1e-6)
    assert torch.allclose(x.grad, g @ w_eff, atol=1e-6)


def test_wrong_mp_is_a_clear_error():
    with pytest.raises(QuantlmError, match="model_parallel=5 does not divide"):
        TernaryLinear(16, 12, mp=5, kind=COLUMN)
    with pytest.raises(QuantlmError, match="does not divide"):
        ternarize(torch.randn(12, 16), 3, ROW)


def test_convert_floatlm_replaces_every_block_linear(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    convert_to_trilm(model, mp=2)
    ternary = [n for n, m in model.named_modules() if isinstance(m, TernaryLinear)]
    assert len(ternary) == len(LLAMA.linears) * model.config.num_hidden_layers
    kinds = {n.split(".", 3)[-1]: m.kind for n, m in model.named_modules() if isinstance(m, TernaryLinear)}
    assert kinds["self_attn.o_proj"] == ROW and kinds["mlp.gate_proj"] == COLUMN
    assert not isinstance(model.lm_head, TernaryLinear)
    assert model.config.pretraining_model_parallel == 2


def _train_a_little(model, steps=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 256, (2, 16), generator=g)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("mp", [1, 2, 3, 6])
def test_export_has_at_most_1_plus_mp_distinct_magnitudes(tmp_path, mp):
    torch.manual_seed(mp)
    model = build_trilm(_spec(mp))
    _train_a_little(model, steps=1)
    export_unpacked(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["pretraining_model_parallel"] == mp and config["quantlm_family"] == "trilm"
    state = load_file(tmp_path / "model.safetensors")
    checked = 0
    for name, w in state.items():
        if LLAMA.block_linear_of(name) is None:
            continue
        assert w.dtype == torch.float16 and w.dim() == 2
        n = w.abs().unique().numel()
        assert n <= 1 + mp, (name, n)
        assert n >= 2  # zero and at least one scale (two shards' scales may round to one fp16 value)
        checked += 1
    assert checked == 2 * len(LLAMA.linears)


def test_exported_trilm_logits_equal_the_training_model(tmp_path):
    torch.manual_seed(0)
    model = build_trilm(_spec(2))
    _train_a_little(model)
    model.eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    export_unpacked(model, tmp_path / "fp32", dtype=torch.float32)
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "fp32").eval()
    assert not any(isinstance(m, TernaryLinear) for m in plain.modules())
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, ref)  # bit-identical at the training precision
    export_unpacked(model, tmp_path / "fp16")  # the release form: fp16 scales and weights
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "fp16", dtype=torch.float32).eval()
    with torch.no_grad():
        out = half(input_ids=ids).logits
    assert torch.allclose(out, ref, atol=2e-2), (out - ref).abs().max()


def test_export_refuses_a_floatlm(tmp_path, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(QuantlmError, match="needs a TriLM"):
        export_unpacked(model, tmp_path)


@pytest.mark.parametrize("scheme,per_byte", [("2bit", 4), ("base3", 5)])
def test_pack_codes_round_trip_and_density(scheme, per_byte):
    from quantlm.formats.ternary import pack_codes, unpack_codes

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-1, 2, (37, 23), generator=g, dtype=torch.int8)
    packed = pack_codes(codes, scheme)  # each row on its own
    assert packed.dtype == torch.uint8 and packed.shape == (37, -(-23 // per_byte))
    assert torch.equal(unpack_codes(packed, 23, scheme), codes)
    if scheme == "base3":
        assert int(packed.max()) <= 242


@pytest.mark.parametrize("fmt,per_byte", [("ternary-2", 4), ("ternary-1.6", 5)])
def test_packed_checkpoint_round_trip_is_lossless(tmp_path, fmt, per_byte):
    from quantlm import accounting as acc
    from quantlm.export import export_model
    from quantlm.formats.loader import QuantLinear, load_model

    torch.manual_seed(0)
    model = build_trilm(_spec(3))
    _train_a_little(model, steps=1)
    export_unpacked(model, tmp_path / "unpacked")
    export_model(tmp_path / "unpacked", fmt, tmp_path / "packed")
    export_model(tmp_path / "packed", "unpacked", tmp_path / "back")
    a = load_file(tmp_path / "unpacked" / "model.safetensors")
    b = load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    packed = load_file(tmp_path / "packed" / "model.safetensors")
    codes = packed["model.layers.0.mlp.down_proj.weight_trits"]
    assert codes.shape == (96, -(-192 // per_byte))
    assert packed["model.layers.0.mlp.down_proj.weight_scale"].shape == (3,)
    LlamaForCausalLM.from_pretrained(tmp_path / "back")  # loads as a plain LLaMA again
    # the packed TriLM reloads (packed in memory) with the unpacked TriLM's logits
    ref = LlamaForCausalLM.from_pretrained(tmp_path / "unpacked", dtype=torch.float32).eval()
    qm = load_model(tmp_path / "packed")
    assert sum(isinstance(m, QuantLinear) for m in qm.modules()) == 7 * 2
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(qm(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=1e-4)
    # sized: params and paper bits equal the unpacked TriLM's; exact bits = 8 x payload = the prediction
    sp, su = acc.budget(tmp_path / "packed"), acc.budget(tmp_path / "unpacked")
    assert sp.family == su.family == "trilm" and sp.params == su.params
    assert sp.total_bits("paper") == pytest.approx(su.total_bits("paper"))
    f = tmp_path / "packed" / "model.safetensors"
    payload = f.stat().st_size - 8 - int.from_bytes(f.read_bytes()[:8], "little")
    assert sp.total_bits("exact") == 8 * payload
    assert acc.budget(tmp_path / "packed" / "config.json").total_bits("exact") == 8 * payload


def test_packing_a_non_ternary_weight_is_an_error(tmp_path, tiny_model_dir):
    import shutil

    from quantlm.export import export_model

    d = tmp_path / "fake"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    with pytest.raises(QuantlmError, match="holds a floatlm; it exports to gguf, unpacked, not"):
        export_model(d, "ternary-1.6", tmp_path / "out")
    cfg["pretraining_model_parallel"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantlmError, match="distinct magnitudes"):
        export_model(d, "ternary-1.6", tmp_path / "out")
    assert not (tmp_path / "out").exists()
