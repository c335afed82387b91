"""Exports: unpacked / gptq / compressed-tensors at every bitwidth, their layouts, and reload parity."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantlm.errors import QuantlmError
from quantlm.formats.loader import QuantLinear
from quantlm.formats.loader import load_model as load_quantized
from quantlm.quantize import QuantRecipe, quantize_model
from quantlm.recipes import replace_fields

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def recipe(bits: int, **kw) -> QuantRecipe:
    formats = ("unpacked", "gptq", "compressed-tensors") if bits in (2, 3, 4, 8) else ("unpacked", "compressed-tensors")
    base = {"bits": bits, "group_size": 4 if bits % 2 == 0 else -1, "nsamples": 4, "seqlen": 32, "formats": formats}
    return replace_fields(QuantRecipe(), **{**base, **kw})


@pytest.fixture(scope="module")
def exports(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {b: quantize_model(tiny_model_dir, recipe(b), root / f"q{b}", progress=False) for b in range(2, 9)}


def ref_unpack(word_column: list[int], bits: int, n: int) -> list[int]:
    """Independent reference: concatenate the words as one little-endian integer, read b-bit fields."""
    stream = sum((w & 0xFFFFFFFF) << (32 * j) for j, w in enumerate(word_column))
    return [(stream >> (k * bits)) & ((1 << bits) - 1) for k in range(n)]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("bits", range(2, 9))
def test_every_format_reloads_with_the_same_logits(exports, bits):
    rep = exports[bits]
    unpacked = load_quantized(rep["paths"]["unpacked"])
    assert not any(isinstance(m, QuantLinear) for m in unpacked.modules())  # plain transformers model
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(bits))
    ref = logits(unpacked, ids)
    for fmt in rep["paths"]:
        if fmt == "unpacked":
            continue
        packed = load_quantized(rep["paths"][fmt])
        qls = {n: m for n, m in packed.named_modules() if isinstance(m, QuantLinear)}
        assert len(qls) == 2 * len(LINEARS)
        for name, ql in qls.items():  # the same weights, bit for bit, once rounded to fp16
            assert torch.equal(ql.dequantize().half(), unpacked.get_submodule(name).weight.half()), (fmt, name)
        torch.testing.assert_close(logits(packed, ids), ref, rtol=0, atol=2e-3)
    assert rep["recipe"]["gptq"]["bits"] == bits and len(rep["modules"]) == 14


def test_gptq_layout_matches_the_documented_bit_stream(exports):
    for bits in (2, 3, 4, 8):
        d = exports[bits]["paths"]["gptq"]
        t = load_file(f"{d}/model.safetensors")
        w16 = load_file(f"{exports[bits]['paths']['unpacked']}/model.safetensors")
        for name in ("model.layers.1.mlp.down_proj", "model.layers.0.self_attn.k_proj"):
            W = w16[f"{name}.weight"]
            out, n = W.shape
            qweight, qzeros, scales, g_idx = (t[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
            G = scales.shape[0]
            assert qweight.dtype == torch.int32 and qweight.shape == (-(-n * bits // 32), out)
            assert qzeros.dtype == torch.int32 and qzeros.shape == (G, -(-out * bits // 32))
            assert scales.dtype == torch.float16 and g_idx.dtype == torch.int32 and g_idx.shape == (n,)
            gs = n // G
            assert g_idx.tolist() == [i // gs for i in range(n)]
            zeros = [[z + 1 for z in ref_unpack(qzeros[g].tolist(), bits, out)] for g in range(G)]
            for o in (0, 5, out - 1):  # W[o, i] = scales[g, o] * (q[i, o] - (qzeros[g, o] + 1))
                q = ref_unpack(qweight[:, o].tolist(), bits, n)
                expect = torch.tensor([float(scales[g_idx[i], o]) * (q[i] - zeros[g_idx[i]][o]) for i in range(n)])
                assert torch.equal(expect.half(), W[o]), (bits, name, o)
            if bits in (2, 4, 8):  # symmetric grid: zero point 2**(b-1), stored minus one
                assert set(sum(zeros, [])) == {1 << (bits - 1)}
        cfg = json.load(open(f"{d}/config.json"))
        qc = cfg["quantization_config"]
        assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq" and qc["bits"] == bits
        assert qc["sym"] is True and qc["desc_act"] is False and qc["group_size"] in (4, -1)
        assert cfg["dtype"] == "float16" and "lm_head.weight" in t and t["lm_head.weight"].dtype == torch.float16


def test_compressed_tensors_layout(exports):
    for bits in range(2, 9):
        d = exports[bits]["paths"]["compressed-tensors"]
        t = load_file(f"{d}/model.safetensors")
        name = "model.layers.0.mlp.down_proj"
        assert t[f"{name}.weight_shape"].tolist() == [64, 172]
        assert t[f"{name}.weight_packed"].shape == (64, -(-172 * bits // 32))
        assert f"{name}.weight_zero_point" not in t  # symmetric
        if bits in (2, 3, 4, 8):  # the same bit stream as the gptq qweight, transposed
            g = load_file(f"{exports[bits]['paths']['gptq']}/model.safetensors")
            assert torch.equal(t[f"{name}.weight_packed"], g[f"{name}.qweight"].T)
            assert torch.equal(t[f"{name}.weight_scale"], g[f"{name}.scales"].T)
        qc = json.load(open(f"{d}/config.json"))["quantization_config"]
        w = qc["config_groups"]["group_0"]["weights"]
        assert qc["format"] == "pack-quantized" and w["num_bits"] == bits and qc["ignore"] == ["lm_head"]
        assert w["strategy"] == ("group" if bits % 2 == 0 else "channel")


def test_asymmetric_and_deterministic_exports(tiny_model_dir, tmp_path):
    r = recipe(5, sym=False, group_size=4, formats=("unpacked", "compressed-tensors"))
    a = quantize_model(tiny_model_dir, r, tmp_path / "a", progress=False)
    b = quantize_model(tiny_model_dir, r, tmp_path / "b", progress=False)
    for fmt in ("unpacked", "compressed-tensors"):
        assert open(f"{a['paths'][fmt]}/model.safetensors", "rb").read() == \
            open(f"{b['paths'][fmt]}/model.safetensors", "rb").read()
    t = load_file(f"{a['paths']['compressed-tensors']}/model.safetensors")
    assert t["model.layers.0.self_attn.q_proj.weight_zero_point"].shape == (-(-64 * 5 // 32), 16)
    unpacked, packed = load_quantized(a["paths"]["unpacked"]), load_quantized(a["paths"]["compressed-tensors"])
    ids = torch.arange(20).view(1, 20)
    torch.testing.assert_close(logits(packed, ids), logits(unpacked, ids), rtol=0, atol=2e-3)
    # the same settings with the gptq format: v1 stores zero-1, which a zero point of 0 cannot take
    with pytest.raises(QuantlmError, match="zero point of 0"):
        quantize_model(tiny_model_dir, recipe(4, sym=False, formats=("gptq",)), tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial output left behind


def test_rtn_goes_through_the_same_export(tiny_model_dir, tmp_path):
    r = recipe(4)
    rep = quantize_model(tiny_model_dir, replace(r, gptq=replace(r.gptq, method="rtn")), tmp_path / "rtn",
                         progress=False)
    assert rep["method"] == "rtn" and json.load(open(f"{rep['paths']['gptq']}/quantlm.json"))["method"] == "rtn"
    load_quantized(rep["paths"]["gptq"])


def test_arbitrary_g_idx_is_never_exported(tiny_model_dir, tmp_path):
    with pytest.raises(QuantlmError, match="static_groups"):
        quantize_model(tiny_model_dir, recipe(4, static_groups=False), tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_tied_embeddings(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    tied = tmp_path / "tied"
    shutil.copytree(tiny_model_dir, tied)
    cfg = json.load(open(tied / "config.json"))
    cfg["tie_word_embeddings"] = True
    (tied / "config.json").write_text(json.dumps(cfg))
    rep = quantize_model(tied, recipe(4), tmp_path / "q", progress=False)
    for fmt, path in rep["paths"].items():
        assert "lm_head.weight" not in load_file(f"{path}/model.safetensors"), fmt
        m = load_quantized(path)
        assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr(), fmt
    plain = AutoModelForCausalLM.from_pretrained(rep["paths"]["unpacked"], local_files_only=True, dtype=torch.float32)
    ids = torch.arange(16).view(1, 16)
    torch.testing.assert_close(logits(load_quantized(rep["paths"]["gptq"]), ids), logits(plain, ids), rtol=0, atol=2e-3)


def test_unpacked_is_a_plain_checkpoint_with_tokenizer_and_meta(exports):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = exports[4]["paths"]["unpacked"]
    m = AutoModelForCausalLM.from_pretrained(d, local_files_only=True)
    assert m.model.layers[1].mlp.down_proj.weight.dtype == torch.float16
    AutoTokenizer.from_pretrained(d, local_files_only=True)
    meta = json.load(open(f"{d}/quantlm.json"))
    assert meta["format"] == "unpacked" and meta["bits"] == 4 and meta["schema"] == "quantlm.model/1"
    assert meta["settings"]["gptq"]["bits"] == 4 and len(meta["modules"]) == 14
    assert {"quantlm", "torch", "transformers"} <= set(meta["versions"])
    report = json.load(open(f"{exports[4]['out_dir']}/report.json"))
    assert report["paths"] == exports[4]["paths"] and report["seconds"]["total"] > 0


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_exact_accounting_of_real_exports_equals_payload(exports, bits):
    """quantlm size of every packed export = 8 x its safetensors payload = the layout predicted from config."""
    import struct

    from quantlm import accounting as acc

    root = Path(exports[bits]["paths"]["compressed-tensors"]).parent
    g = 4 if bits % 2 == 0 else -1
    for fmt in ("gptq", "compressed-tensors"):
        d = root / fmt
        if not d.is_dir():
            continue
        payload = sum(f.stat().st_size - 8 - struct.unpack("<Q", f.read_bytes()[:8])[0]
                      for f in d.glob("*.safetensors"))
        measured = acc.budget(d)
        assert measured.family == "quantlm" and measured.bits == bits
        assert measured.total_bits("exact") == 8 * payload
        predicted = acc.budget(d / "config.json", quant_format=fmt, group_size=g)
        assert predicted.total_bits("exact") == measured.total_bits("exact"), fmt
        meta = json.loads((d / "quantlm.json").read_text())
        assert meta["accounting"]["as_stored"]["exact"] == 8 * payload


def _payload_bits(d: Path) -> int:
    import struct

    return sum(8 * (f.stat().st_size - 8 - struct.unpack("<Q", f.read_bytes()[:8])[0]) for f in d.glob("*.safetensors"))


@pytest.fixture(scope="module")
def tiny_trilm_dir(tiny_model_dir, tmp_path_factory):
    """The tiny 172-wide LLaMA converted to a TriLM with 2 scale shards and exported unpacked."""
    from transformers import LlamaForCausalLM

    from quantlm.models.trilm import convert_to_trilm, export_unpacked

    model = convert_to_trilm(LlamaForCausalLM.from_pretrained(tiny_model_dir), mp=2)
    out = tmp_path_factory.mktemp("tiny-trilm")
    export_unpacked(model, out)
    for f in tiny_model_dir.glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    return out


def test_every_registered_format_round_trips_and_sizes_as_declared(exports, tiny_trilm_dir, tmp_path):
    """For every format of the registry, on widths that are not multiples of 32 (172): written, reloaded with the
    same weights, and sized from its headers at exactly 8 x its payload = the prediction from config + layout."""
    from quantlm import accounting as acc
    from quantlm.export import export_model
    from quantlm.formats.loader import load_model
    from quantlm.formats.registry import FORMATS, formats_for

    dirs = {("quantlm", f): Path(exports[4]["paths"][f]) for f in ("unpacked", "gptq", "compressed-tensors")}
    for f in (f for f in formats_for("trilm") if f != "gguf"):  # GGUF: tests/test_gguf.py (256-wide rows)
        d = tmp_path / f
        export_model(tiny_trilm_dir, f, d) if f != "unpacked" else shutil.copytree(tiny_trilm_dir, d)
        dirs[("trilm", f)] = d
    safetensors_formats = {n for n, fmt in FORMATS.items() if n != "gguf"}
    assert {f for _, f in dirs} == safetensors_formats  # every registered format is covered
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    ref = {"quantlm": logits(load_model(dirs[("quantlm", "unpacked")]), ids),
           "trilm": logits(load_model(tiny_trilm_dir), ids)}
    for (family, fmt), d in dirs.items():
        measured = acc.budget(d)
        assert measured.family == family, (family, fmt)
        assert measured.total_bits("exact") == _payload_bits(d), (family, fmt)
        layout = acc.checkpoint_layout(d, json.loads((d / "config.json").read_text()))
        assert layout.format == fmt
        predicted = acc.budget(d / "config.json", layout=layout, bits=layout.bits,
                               group_size=layout.group_size if family == "quantlm" else None)
        assert predicted.total_bits("exact") == measured.total_bits("exact"), (family, fmt)
        assert predicted.params == measured.params and predicted.total_bits("paper") == pytest.approx(
            measured.total_bits("paper")), (family, fmt)
        torch.testing.assert_close(logits(load_model(d), ids), ref[family], rtol=0, atol=2e-3)
