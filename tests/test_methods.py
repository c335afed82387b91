"""The method seam, proven from outside the library: a quantizer and a per-block transform defined here, registered,
named by a recipe, and run through `quantize` into every format with no library edit."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from quantlm.errors import QuantlmError
from quantlm.gptq.methods import BlockTransform, Quantizer, register_quantizer, register_transform
from quantlm.gptq.settings import GPTQSettings
from quantlm.gptq.solver import GPTQResult
from quantlm.quantize import QuantRecipe, quantize_model
from quantlm.recipes import replace_fields

SCALE = 4.0


def absmax_quantizer(Ws, H, settings, names):
    """Symmetric round-to-nearest with scale = absmax / (2^(b-1) - 1) per group (zero at the grid's middle)."""
    out = []
    for W in Ws:
        rows, cols = W.shape
        group = cols if settings.group_size == -1 else settings.group_size
        half = 2 ** (settings.bits - 1)
        Wg = W.float().reshape(rows, cols // group, group)
        scale = (Wg.abs().amax(dim=2) / (half - 1)).clamp_min(1e-8)
        zero = torch.full_like(scale, float(half))
        q = torch.clamp(torch.round(Wg / scale[..., None]) + half, 0, 2 * half - 1).to(torch.uint8)
        g_idx = (torch.arange(cols) // group).to(torch.int32)
        deq = (q.float() - half) * scale[..., None]
        loss = float(((Wg - deq) ** 2).sum()) / 2
        out.append(GPTQResult(q=q.reshape(rows, cols), scale=scale, zero=zero, g_idx=g_idx, loss=loss,
                              damp=0.0, bits=settings.bits, group_size=settings.group_size, sym=True))
    return out


def scale_column(block, block_map, index):
    """A function-preserving pair: input column j of q, k, v times SCALE, the input norm's weight j over SCALE."""
    j = index % block.input_layernorm.weight.shape[0]
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(block.self_attn, name).weight[:, j] *= SCALE
        block.input_layernorm.weight[j] /= SCALE
    return {"column": j, "scale": SCALE}


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_quantizer(Quantizer("test-absmax", absmax_quantizer, "absmax RTN (test)", uses_hessian=False),
                       replace=True)
    register_transform(BlockTransform("test-scale-column", scale_column, "column scaling (test)"), replace=True)


@pytest.fixture(scope="module")
def tiny256(tmp_path_factory, tiny_tokenizer_dir):
    from gguf_tiny import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("methods") / "floatlm", tiny_tokenizer_dir)


def recipe(**kw) -> QuantRecipe:
    base = {"bits": 4, "group_size": 128, "nsamples": 4, "seqlen": 32, "method": "test-absmax",
            "transforms": ("test-scale-column",), "formats": ("unpacked", "gptq", "compressed-tensors", "gguf")}
    return replace_fields(QuantRecipe(), **{**base, **kw})


@pytest.fixture(scope="module")
def exported(tiny256, tmp_path_factory):
    return quantize_model(tiny256, recipe(), tmp_path_factory.mktemp("q") / "out", progress=False)


def test_a_method_defined_outside_runs_into_every_format(exported, tiny256):
    from safetensors.torch import load_file

    from quantlm.formats.loader import QuantLinear, load_model

    rep = exported
    assert rep["method"] == "test-absmax" and set(rep["paths"]) == {"unpacked", "gptq", "compressed-tensors", "gguf"}
    assert [(t["transform"], t["block"], t["column"]) for t in rep["transforms"]] == [
        ("test-scale-column", 0, 0), ("test-scale-column", 1, 1)]
    meta = json.loads(open(f"{rep['paths']['gptq']}/quantlm.json").read())
    assert meta["method"] == "test-absmax" and meta["settings"]["gptq"]["transforms"] == ["test-scale-column"]
    assert len(meta["info"]["transforms"]) == 2
    # the transform's norm change was written with the model; the codes are the test quantizer's
    src = load_file(f"{tiny256}/model.safetensors")
    out = load_file(f"{rep['paths']['unpacked']}/model.safetensors")
    norm = "model.layers.1.input_layernorm.weight"
    assert torch.equal(out[norm][1], (src[norm][1].float() / SCALE).to(out[norm].dtype))
    q = src["model.layers.1.self_attn.q_proj.weight"].float()
    q[:, 1] *= SCALE
    want = absmax_quantizer([q], None, GPTQSettings(bits=4, group_size=128, method="test-absmax"), ["q"])[0]
    want = replace(want, scale=want.scale.half().float())  # as every format stores it: fp16 scales
    assert torch.equal(out["model.layers.1.self_attn.q_proj.weight"], want.dequantize().half())
    unpacked = load_model(rep["paths"]["unpacked"])
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = unpacked(input_ids=ids).logits
        for fmt in ("gptq", "compressed-tensors"):
            packed = load_model(rep["paths"][fmt])
            for name, ql in packed.named_modules():  # the same weights, bit for bit, once rounded to fp16
                if isinstance(ql, QuantLinear):
                    assert torch.equal(ql.dequantize().half(), unpacked.get_submodule(name).weight.half()), name
            # packed layers multiply by the fp32 product code x fp16 scale, the unpacked one by its fp16 rounding
            torch.testing.assert_close(packed(input_ids=ids).logits, ref, rtol=0, atol=1e-2)


def test_the_gguf_export_holds_the_test_quantizers_codes(exported):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from quantlm.formats.gguf import hf_name
    from quantlm.formats.loader import load_model

    packed = load_model(exported["paths"]["gptq"])  # the codes x fp16 scales, unrounded
    reader = gguf.GGUFReader(f"{exported['paths']['gguf']}/model.gguf")
    seen = 0
    for t in reader.tensors:
        name = hf_name(t.name)
        if t.tensor_type.name != "Q4_0" or "attn_q" in t.name or "attn_k" in t.name:  # q/k rows are permuted
            continue
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        ref = packed.get_submodule(name[: -len(".weight")]).dequantize().numpy()
        np.testing.assert_array_equal(w.reshape(ref.shape), ref)
        seen += 1
    assert seen == 2 * 5


def test_unknown_method_and_transform_are_named(tiny256, tmp_path):
    with pytest.raises(QuantlmError, match="unknown quantization method 'nope'.*gptq, rtn"):
        GPTQSettings(method="nope")
    with pytest.raises(QuantlmError, match="unknown block transform 'nope'"):
        GPTQSettings(transforms=("nope",))
    with pytest.raises(QuantlmError, match="already registered"):
        register_quantizer(Quantizer("gptq", absmax_quantizer))


def test_a_quantizer_returning_the_wrong_count_is_refused(tiny256, tmp_path):
    register_quantizer(Quantizer("test-broken", lambda Ws, H, s, names: [], uses_hessian=False), replace=True)
    with pytest.raises(QuantlmError, match="returned 0 results for 3 layers"):
        quantize_model(tiny256, recipe(method="test-broken", transforms=(), formats=("unpacked",)), tmp_path / "o",
                       progress=False)
    assert not (tmp_path / "o").exists()


def test_builtin_methods_by_name_are_the_former_flag(tiny256, tmp_path):
    """`method: rtn` is what `--rtn` was: round to nearest on GPTQ's grid, through the same export path."""
    r = recipe(method="rtn", transforms=(), formats=("unpacked",))
    rep = quantize_model(tiny256, r, tmp_path / "rtn", progress=False)
    assert rep["method"] == "rtn" and rep["transforms"] == [] and all(m["damp"] == 0.0 for m in rep["modules"])
    assert replace(r.gptq, method="gptq") == GPTQSettings(bits=4, group_size=128)
