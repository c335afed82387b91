"""GGUF: quantlm's codes laid out as llama.cpp blocks, checked against gguf-py's dequantizers (the oracle),
and whole LLaMA files written with GGUFWriter and read back (header sizes, tensors, tokenizer metadata)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from quantlm.errors import QuantlmError
from quantlm.formats.gguf import blocks as gb
from quantlm.quantized import QuantizedLinear, TernaryWeight

gguf = pytest.importorskip("gguf")


def _lin(bits, sym, group_size, out=6, width=512, seed=0, scale=None):
    """A QuantizedLinear with every code value present in each row (extremes included) and fp16 scales."""
    g = torch.Generator().manual_seed(seed)
    G = 1 if group_size == -1 else width // group_size
    q = torch.randint(0, 1 << bits, (out, width), generator=g, dtype=torch.int32)
    q[:, : 1 << bits] = torch.arange(1 << bits)  # 0 and maxq in every row (q - zero = -128 for 8-bit Q8_0)
    s = scale if scale is not None else (torch.rand(out, G, generator=g) * 0.05 + 1e-3).half()
    if sym:
        z = torch.full((out, G), 1 << (bits - 1), dtype=torch.int32)
    else:
        z = torch.randint(0, 1 << bits, (out, G), generator=g, dtype=torch.int32)
        z[:, 0] = (1 << bits) - 1
    return QuantizedLinear(q.to(torch.uint8), s, z, bits, group_size, sym)


def _ternary(out=8, width=512, mp=2, kind="column", seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (out, width), generator=g).to(torch.int8)
    scales = (torch.rand(mp, generator=g) * 0.1 + 0.01).half()
    return TernaryWeight(codes, scales, kind)


def _decode(enc: gb.Encoded) -> np.ndarray:
    return gguf.quants.dequantize(enc.data, gguf.GGMLQuantizationType[enc.type])


def test_type_table_matches_gguf():
    for name, t in gb.TYPES.items():
        qt = gguf.GGMLQuantizationType[name]
        assert int(qt) == t.ggml_id, name
        assert gguf.GGML_QUANT_SIZES[qt] == (t.block_size, t.type_size), name
    assert gb.bits_per_weight("Q4_0") == 4.5 and gb.bits_per_weight("Q8_0") == 8.5
    assert gb.bits_per_weight("TQ2_0") == 2.0625 and gb.bits_per_weight("TQ1_0") == 1.6875
    assert gb.bytes_per_row("TQ1_0", 512) == 108 and gb.bytes_per_row("Q6_K", 256) == 210


EXACT = [  # bits, sym, group size, type
    (4, True, 128, "Q4_0"), (4, True, -1, "Q4_0"), (3, True, 32, "Q4_0"), (2, True, 64, "Q4_0"),
    (3, False, 32, "Q4_0"), (5, True, 128, "Q5_0"), (4, False, 64, "Q5_0"),
    (8, True, 32, "Q8_0"), (6, True, 64, "Q8_0"), (2, True, -1, "Q8_0"), (7, False, 32, "Q8_0"),
    (6, True, -1, "Q6_K"), (6, True, 256, "Q6_K"), (5, False, -1, "Q6_K"), (4, True, -1, "Q6_K"),
    (3, True, -1, "Q3_K"), (2, True, 512, "Q3_K"), (2, True, -1, "Q2_K"), (2, False, -1, "Q2_K"),
]


@pytest.mark.parametrize("bits, sym, group_size, type_name", EXACT)
def test_exact_types_decode_to_quantlm_weights(bits, sym, group_size, type_name):
    lin = _lin(bits, sym, group_size)
    enc = gb.encode(lin, type_name, name="blk")
    assert enc.exact and enc.scale_error == 0.0 and enc.weight_error == 0.0
    assert enc.data.dtype == np.uint8 and enc.data.shape == (6, gb.bytes_per_row(type_name, 512))
    ref = lin.stored().dequantize(torch.float32).numpy()
    np.testing.assert_array_equal(_decode(enc), ref)


def test_fp32_scales_are_stored_as_fp16():
    lin = _lin(4, True, 128)
    lin32 = QuantizedLinear(lin.q, lin.scale.float() * (1 + 1e-6), lin.zero, 4, 128, True)
    np.testing.assert_array_equal(_decode(gb.encode(lin32, "Q4_0")), lin32.stored().dequantize().numpy())


def test_q4_1_and_q5_1_exact_only_when_the_offset_is_fp16():
    pow2 = torch.full((6, 4), 2.0**-7, dtype=torch.float16)  # -d * zero is an fp16 number for any zero
    for bits, t in ((4, "Q4_1"), (3, "Q4_1"), (5, "Q5_1")):
        lin = _lin(bits, False, 128, scale=pow2)
        np.testing.assert_array_equal(_decode(gb.encode(lin, t)), lin.dequantize().numpy())
    awkward = torch.full((6, 4), 0.0123, dtype=torch.float16)  # 0.0123 * 13 needs more than 11 bits
    with pytest.raises(QuantlmError, match="Q4_1 is not exact.*use Q5_0"):
        gb.encode(_lin(4, False, 128, scale=awkward), "Q4_1", name="blk.0.ffn_up")


@pytest.mark.parametrize("t", ["TQ1_0", "TQ2_0", "Q4_0", "Q8_0"])
@pytest.mark.parametrize("kind, width, mp", [("column", 512, 2), ("row", 512, 2), ("row", 1024, 4)])
def test_ternary_types_are_lossless_inside_shards(t, kind, width, mp):
    tw = _ternary(width=width, mp=mp, kind=kind)
    enc = gb.encode(tw, t, name="blk.0.attn_q")
    assert enc.exact
    np.testing.assert_array_equal(_decode(enc), tw.dequantize().numpy())


def test_choose_type_is_the_smallest_exact_type():
    cases = {(4, True, 128): "Q4_0", (3, True, 128): "Q4_0", (2, True, 32): "Q4_0", (5, True, 128): "Q5_0",
             (6, True, 128): "Q8_0", (8, True, 128): "Q8_0", (6, True, -1): "Q6_K", (3, True, -1): "Q3_K",
             (2, True, -1): "Q2_K", (4, True, -1): "Q4_0", (5, True, -1): "Q5_0", (3, False, 128): "Q4_0",
             (4, False, 128): "Q5_0", (7, False, -1): "Q8_0", (5, False, -1): "Q6_K", (6, True, 256): "Q6_K"}
    for (bits, sym, gs), want in cases.items():
        assert gb.choose_type(_lin(bits, sym, gs)) == want, (bits, sym, gs)
    assert gb.choose_type(_lin(3, True, 128), kquant_grouped=True) == "Q3_K"
    assert gb.choose_type(_lin(6, True, 128, width=256)) == "Q8_0"
    assert gb.choose_type(_lin(3, True, -1, width=96)) == "Q4_0"  # K types need 256-multiples
    assert gb.choose_type(_ternary()) == "TQ1_0"


def test_asymmetric_8_bit_has_no_exact_home():
    with pytest.raises(QuantlmError, match=r"blk\.1\.attn_k.*asymmetric 8-bit.*sym: true"):
        gb.choose_type(_lin(8, False, 128), name="blk.1.attn_k")
    with pytest.raises(QuantlmError, match=r"Q4_0 cannot hold.*asymmetric 4-bit.*would work: Q4_1 \(if .*\), Q5_0"):
        gb.encode(_lin(4, False, 128), "Q4_0")


def test_odd_widths_name_the_layer_the_type_and_what_works():
    lin = _lin(4, True, -1, width=172)
    with pytest.raises(QuantlmError, match=r"model\.layers\.0\.mlp\.down_proj.*Q4_0.*multiple of 32.*172.*F16.*F32"):
        gb.encode(lin, "Q4_0", name="model.layers.0.mlp.down_proj")
    with pytest.raises(QuantlmError, match=r"blk\.0\.attn_v: Q3_K.*multiple of 256.*96 wide.*would work: Q4_0, Q4_1, Q5_0"):
        gb.encode(_lin(3, True, -1, width=96), "Q3_K", name="blk.0.attn_v")
    with pytest.raises(QuantlmError, match="TQ2_0.*multiple of 256.*would work: Q4_0, Q8_0"):
        gb.encode(_ternary(width=96, mp=1), "TQ2_0", name="blk.0.ffn_down")
    with pytest.raises(QuantlmError, match="multiple of 32"):
        gb.bytes_per_row("Q8_0", 100)


def test_groups_that_split_a_block_are_refused():
    with pytest.raises(QuantlmError, match="group size 16 is not a multiple of its 32-weight blocks.*kquant_grouped"):
        gb.encode(_lin(4, True, 16), "Q4_0")


def test_straddling_ternary_shards_need_merge_and_report_the_change():
    tw = _ternary(width=768, mp=2, kind="row")  # 384-wide shards: the middle 256-block holds two scales
    with pytest.raises(QuantlmError, match=r"blk\.3\.ffn_down.*TQ1_0.*384.*would work: Q4_0.*TQ1_0 with merge_shard_scales=True"):
        gb.encode(tw, "TQ1_0", name="blk.3.ffn_down")
    with pytest.raises(QuantlmError, match="TQ1_0 cannot hold"):
        gb.choose_type(tw, name="blk.3.ffn_down")
    assert gb.choose_type(tw, merge_shard_scales=True) == "TQ1_0"
    np.testing.assert_array_equal(_decode(gb.encode(tw, "Q4_0")), tw.dequantize().numpy())  # 32 | 384
    enc = gb.encode(tw, "TQ1_0", merge_shard_scales=True)
    assert not enc.exact and enc.changed_blocks == 8  # one block per row
    got, ref = _decode(enc), tw.dequantize().numpy()
    np.testing.assert_array_equal(got[:, :256], ref[:, :256])
    np.testing.assert_array_equal(got[:, 512:], ref[:, 512:])
    assert np.abs(got - ref).max() == pytest.approx(enc.weight_error)
    lo, hi = sorted(tw.scales.float().tolist())
    assert 0 < enc.scale_error <= hi - lo


@pytest.mark.parametrize("bits, t, group_size", [(3, "Q3_K", 32), (6, "Q6_K", 64), (2, "Q2_K", 32),
                                                 (6, "Q6_K", 16), (3, "Q3_K", 128)])
def test_kquant_for_grouped_codes_is_opt_in_and_reports_its_error(bits, t, group_size):
    lin = _lin(bits, True, group_size)
    with pytest.raises(QuantlmError, match=f"{t} cannot hold.*kquant_grouped=True"):
        gb.encode(lin, t, name="blk.0.attn_output")
    enc = gb.encode(lin, t, kquant_grouped=True)
    assert not enc.exact and enc.changed_blocks == 6 * 2
    got, ref = _decode(enc), lin.dequantize().numpy()
    assert np.abs(got - ref).max() == pytest.approx(enc.weight_error, rel=1e-6)
    rel = enc.scale_error / float(lin.scale.float().max())
    assert 0 < rel < {"Q6_K": 0.01, "Q3_K": 0.04, "Q2_K": 0.07}[t]
    if bits == 2:  # symmetric Q2_K keeps the zero code exactly zero: the offset is 2 * the new scale
        assert np.all(got[lin.q.numpy() == 2] == 0)


def test_kquant_uniform_groups_stay_exact():
    lin = _lin(6, True, 64)
    same = QuantizedLinear(lin.q, lin.scale[:, :1].expand(-1, 8).contiguous(), lin.zero, 6, 64, True)
    enc = gb.encode(same, "Q6_K", kquant_grouped=True)
    assert enc.exact
    np.testing.assert_array_equal(_decode(enc), same.dequantize().numpy())


# ---------------------------------------------------------------------------------------------------------
# Whole files: a tiny LLaMA written with GGUFWriter and read back


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer_dir):
    from gguf_tiny import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("gguf-llama"), tiny_tokenizer_dir)


def _read_back(path, cfg):
    """{HF-order gguf name: fp32 weights} through GGUFReader + gguf-py's dequantizer, q/k rows un-permuted."""
    from quantlm.formats.gguf import rope_permutation

    out = {}
    for t in gguf.GGUFReader(path).tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        w = torch.from_numpy(np.array(w, dtype=np.float32)).reshape([int(n) for n in reversed(t.shape)])
        for kind, heads in ((".attn_q.", cfg["num_attention_heads"]), (".attn_k.", cfg["num_key_value_heads"])):
            if kind in t.name:
                inverse = torch.argsort(rope_permutation(w.shape[0], heads))
                w = w[inverse]
        out[t.name] = w
    return out


@pytest.mark.parametrize("variant", ["F16", "Q8_0", "Q4_0", "TQ1_0"])
def test_written_gguf_holds_quantlm_weights(tiny_dir, tmp_path, variant):
    from gguf_tiny import dequantized_state, load_tensors, quantize_linears, ternarize_linears

    from quantlm.formats.gguf import gguf_name, read_gguf_header, write_gguf

    cfg, state = load_tensors(tiny_dir)
    if variant == "F16":
        tensors = state
    elif variant == "TQ1_0":
        tensors = ternarize_linears(state, mp=1)  # o_proj's 256-wide rows hold one shard (see the block tests)
    else:
        tensors = quantize_linears(state, bits=8 if variant == "Q8_0" else 4, group_size=32 if variant == "Q4_0"
                                   else 128)
    path = tmp_path / f"tiny-{variant}.gguf"
    report = write_gguf(path, cfg, tensors, tiny_dir)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind
    assert report["file_type"] == variant and not report["changes"]

    header = read_gguf_header(path)
    assert header["consistent"] and header["file_bytes"] == path.stat().st_size
    assert header["payload_bytes"] == sum(r["nbytes"] for r in report["tensors"])
    data_bytes = header["file_bytes"] - header["header_bytes"] - header["padding_bytes"]
    assert 8 * header["payload_bytes"] == 8 * data_bytes
    by_type = {t["name"]: t["type"] for t in header["tensors"]}
    assert by_type["token_embd.weight"] == "F16" and by_type["output.weight"] == "F16"
    assert by_type["blk.0.attn_norm.weight"] == "F32" and by_type["blk.1.ffn_down.weight"] == variant
    md = header["metadata"]
    assert md["general.architecture"] == "llama" and md["llama.block_count"] == 2
    assert md["llama.attention.head_count_kv"] == 2 and md["llama.rope.dimension_count"] == 64
    assert md["general.quantization_version"] == 2 if variant != "F16" else "general.quantization_version" not in md
    assert md["tokenizer.ggml.model"] == "gpt2" and len(md["tokenizer.ggml.tokens"]) == 512

    reader = gguf.GGUFReader(path)  # the header parser agrees with gguf-py's reader
    assert [(t.name, int(t.data_offset), int(t.n_bytes), t.tensor_type.name) for t in reader.tensors] == \
        [(t["name"], t["offset"], t["nbytes"], t["type"]) for t in header["tensors"]]
    assert header["header_bytes"] == reader.data_offset

    want = {gguf_name(k): v for k, v in dequantized_state(tensors).items()}
    got = _read_back(path, cfg)
    assert set(got) == set(want)
    for name, w in want.items():
        assert torch.equal(got[name], w), name


def test_tokenizer_metadata_matches_the_hf_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    from quantlm.formats.gguf import tokenizer_metadata

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    md = tokenizer_metadata(tiny_dir, 520)
    assert md["tokenizer.ggml.tokens"][:len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert md["tokenizer.ggml.tokens"][-1] == "[PAD519]" and md["tokenizer.ggml.token_type"][-1] == 5
    assert md["tokenizer.ggml.token_type"][0] == 3 and md["tokenizer.ggml.token_type"][300] == 1
    assert md["tokenizer.ggml.eos_token_id"] == tok.eos_token_id and md["tokenizer.ggml.padding_token_id"] == 1
    assert md["tokenizer.ggml.add_bos_token"] is False
    assert all(len(m.split(" ")) == 2 for m in md["tokenizer.ggml.merges"])


def test_sentencepiece_style_tokenizer_metadata(tmp_path, corpus_text):
    from gguf_tiny import metaspace_bpe_dir
    from transformers import AutoTokenizer

    from quantlm.formats.gguf import tokenizer_metadata

    d = metaspace_bpe_dir(tmp_path / "spm", corpus_text[:50_000])
    tok = AutoTokenizer.from_pretrained(d)
    md = tokenizer_metadata(d, 512)
    assert md["tokenizer.ggml.model"] == "llama" and md["tokenizer.ggml.add_space_prefix"] is True
    assert md["tokenizer.ggml.add_bos_token"] is True and md["tokenizer.ggml.bos_token_id"] == 1
    types = md["tokenizer.ggml.token_type"]
    assert types[:4] == [2, 3, 3, 6] and types[258] == 6 and set(types[259:]) == {1}  # unk, <s>, </s>, bytes
    merges = json.loads((d / "tokenizer.json").read_text())["model"]["merges"]
    scores = md["tokenizer.ggml.scores"]
    for rank, (a, b) in enumerate(merges[:50]):  # llama.cpp merges the best score first: -rank of its merge
        assert scores[tok.convert_tokens_to_ids(a + b)] == -rank
    assert "tokenizer.ggml.merges" not in md


def test_unsupported_tokenizers_are_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from quantlm.formats.gguf import tokenizer_metadata

    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path)
    with pytest.raises(QuantlmError, match="byte-level BPE or SentencePiece-style BPE.*WordLevel"):
        tokenizer_metadata(tmp_path, 8)


def test_tied_head_is_omitted_and_bad_inputs_fail_before_writing(tmp_path, tiny_tokenizer_dir):
    from gguf_tiny import load_tensors, quantize_linears, save_tiny_llama

    from quantlm.formats.gguf import read_gguf_header, write_gguf

    model_dir = save_tiny_llama(tmp_path / "tied", tiny_tokenizer_dir, tied=True, layers=1)
    cfg, state = load_tensors(model_dir)
    state.pop("lm_head.weight", None)
    path = tmp_path / "out" / "tied.gguf"
    report = write_gguf(path, cfg, quantize_linears(state, bits=4, group_size=-1), model_dir)
    names = [t["name"] for t in read_gguf_header(path)["tensors"]]
    assert "output.weight" not in names and "token_embd.weight" in names
    assert report["file_type"] == "Q4_0"

    bad = dict(quantize_linears(state, bits=3, group_size=64))
    with pytest.raises(QuantlmError, match=r"model\.layers\.0\..*Q3_K cannot hold.*kquant_grouped=True"):
        write_gguf(tmp_path / "out" / "bad.gguf", cfg, bad, model_dir, linear_type="Q3_K")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tied.gguf"]
    report = write_gguf(tmp_path / "out" / "k.gguf", cfg, bad, model_dir, linear_type="Q3_K", kquant_grouped=True)
    assert len(report["changes"]) == 7 and all(c["weight_error"] > 0 for c in report["changes"])
    with pytest.raises(QuantlmError, match="not tied.*lm_head"):
        write_gguf(tmp_path / "out" / "untied.gguf", {**cfg, "tie_word_embeddings": False}, state, model_dir)


def test_plain_float_linears_take_gguf_py_round_to_nearest_on_request(tiny_dir, tmp_path):
    from gguf_tiny import load_tensors

    from quantlm.formats.gguf import read_gguf_header, write_gguf

    cfg, state = load_tensors(tiny_dir)
    path = tmp_path / "rtn.gguf"
    report = write_gguf(path, cfg, state, tiny_dir, linear_type="Q4_0")
    assert report["file_type"] == "Q4_0" and len(report["changes"]) == 14
    assert all("round-to-nearest" in c["note"] for c in report["changes"])
    types = {t["name"]: t["type"] for t in read_gguf_header(path)["tensors"]}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["token_embd.weight"] == "F16"
    with pytest.raises(QuantlmError, match="cannot be written as Q6_K.*quantize it with quantlm"):
        write_gguf(tmp_path / "k.gguf", cfg, state, tiny_dir, linear_type="Q6_K")


def test_truncated_or_lying_gguf_headers_are_one_error(tmp_path):
    """A GGUF file cut short, or a header claiming more tensors than the file can hold, is refused in one line
    naming the file (every count the header declares is checked against the file)."""
    import struct

    import numpy as np

    from quantlm.errors import QuantlmError
    from quantlm.formats.gguf import read_gguf_header

    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((64, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    whole = path.read_bytes()
    header = read_gguf_header(path)
    assert header["consistent"] and header["payload_bytes"] == 64 * 64 * 4
    for cut in (len(whole) - 100, header["header_bytes"] + 10, 30):
        path.write_bytes(whole[:cut])
        with pytest.raises(QuantlmError, match=r"t\.gguf: .*(truncated|corrupt)") as e:
            read_gguf_header(path)
        assert "\n" not in str(e.value)
    lying = bytearray(whole)
    lying[8:16] = struct.pack("<Q", 10**12)  # tensor count
    path.write_bytes(bytes(lying))
    with pytest.raises(QuantlmError, match="header declares 1,000,000,000,000 tensors but the file has only"):
        read_gguf_header(path)
    path.write_bytes(b"GGML" + whole[4:])
    with pytest.raises(QuantlmError, match="not a GGUF file"):
        read_gguf_header(path)
