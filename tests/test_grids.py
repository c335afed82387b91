"""llama.cpp's signed-absmax grid as a recipe option: the largest-magnitude weight of every group is reproduced
exactly on the outer level, scales may be negative, and every export (GGUF included) stays exact."""

from __future__ import annotations

import pytest
import torch

from quantlm import accounting as acc
from quantlm.errors import QuantlmError
from quantlm.gptq.grid import GridSpec, fake_quantize, find_params, quantize_codes
from quantlm.quantize import QuantRecipe, quantize_model
from quantlm.recipes import replace_fields


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_the_peak_lands_on_the_outer_level_and_every_level_is_reachable(bits):
    W = torch.randn(64, 32, generator=torch.Generator().manual_seed(bits))
    spec = GridSpec(bits, signed_absmax=True)
    scale, zero = find_params(W, spec)
    q = quantize_codes(W, scale, zero, spec.maxq)
    peak = W.abs().argmax(dim=1)
    assert torch.all(q.gather(1, peak[:, None]) == 0)  # the outer level, on the peak's side
    back = fake_quantize(W, scale, zero, spec.maxq)
    torch.testing.assert_close(back.gather(1, peak[:, None]), W.gather(1, peak[:, None]), rtol=1e-6, atol=0)
    assert (scale < 0).any() and (scale > 0).any()  # the sign follows the peak
    ref_err = (fake_quantize(W, *find_params(W, GridSpec(bits)), spec.maxq) - W).pow(2).sum()
    assert (back - W).pow(2).sum() < ref_err  # every level faces the peak's side: a finer grid


def test_zero_rows_and_bad_combinations():
    scale, zero = find_params(torch.zeros(2, 8), GridSpec(4, signed_absmax=True))
    assert torch.all(scale > 0) and torch.all(zero == 8)
    with pytest.raises(QuantlmError, match="signed_absmax is a symmetric grid"):
        GridSpec(4, sym=False, signed_absmax=True)
    with pytest.raises(QuantlmError, match="signed_absmax is a symmetric grid"):
        GridSpec(4, mse=True, signed_absmax=True)


def test_gptq_on_the_signed_grid_exports_exactly(tiny_tokenizer_dir, tmp_path):
    """Negative scales through every format: packed exports reload with the dequantized logits, the GGUF's Q4_0
    blocks are the QuantLM's weights bit for bit (llama.cpp's own grid, so no re-quantization), sizes exact."""
    import gguf
    import numpy as np
    from gguf_tiny import save_tiny_llama

    from quantlm.formats.gguf import hf_name, rope_permutation
    from quantlm.formats.loader import load_model

    src = save_tiny_llama(tmp_path / "m", tiny_tokenizer_dir, hidden_size=64, intermediate_size=128)
    fmts = ("unpacked", "gptq", "compressed-tensors", "gguf")
    recipe = replace_fields(QuantRecipe(), bits=4, group_size=32, nsamples=4, seqlen=32, formats=fmts,
                            signed_absmax=True)
    rep = quantize_model(src, recipe, tmp_path / "q", progress=False)
    gptq = load_model(rep["paths"]["gptq"])
    assert any((m.scales.float() < 0).any() for m in gptq.modules() if hasattr(m, "scales"))
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = load_model(rep["paths"]["unpacked"])(ids).logits
        for fmt in ("gptq", "compressed-tensors"):
            torch.testing.assert_close(load_model(rep["paths"][fmt])(ids).logits, ref, rtol=0, atol=2e-3)
    reader = gguf.GGUFReader(f"{rep['paths']['gguf']}/model.gguf")
    linears = [t for t in reader.tensors if t.name.startswith("blk.") and "norm" not in t.name]
    assert {t.tensor_type for t in linears} == {gguf.GGMLQuantizationType.Q4_0}
    for t in linears:
        got = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        got = got.reshape([int(n) for n in reversed(t.shape)])
        if t.name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = 4 if ".attn_q." in t.name else 2
            got = got[torch.argsort(rope_permutation(got.shape[0], heads)).numpy()]
        hf = hf_name(t.name, "llama")
        np.testing.assert_array_equal(got, gptq.get_submodule(hf[: -len(".weight")]).dequantize().numpy(), hf)
    for fmt in fmts:
        assert acc.budget(rep["paths"][fmt]).total_bits("exact") == acc.budget(
            src / "config.json", layout=recipe.layout(fmt)).total_bits("exact"), fmt
