import json
import math
import struct
from pathlib import Path

import pytest

from quantlm import accounting as acc
from quantlm import hf_checkpoint
from quantlm.errors import QuantlmError
from quantlm.specs import get_preset

# ------------------------------------------------------------------------------------- paper convention
# Block linear params per block = 4 h^2 + 3 h f; embedding + head = 2 x 50304 x h at 16 bits.
LIN_99M = 16 * (4 * 512 * 512 + 3 * 512 * 1280)  # 48,234,496
LIN_39B = 30 * (4 * 3072 * 3072 + 3 * 3072 * 9216)  # 3,680,501,760
EMB_99M = 2 * 50304 * 512 * 16
EMB_39B = 2 * 50304 * 3072 * 16


@pytest.mark.parametrize("name,bits", [
    ("floatlm-99m", LIN_99M * 16 + EMB_99M),
    ("floatlm-3.9b", LIN_39B * 16 + EMB_39B),
    ("quantlm-99m-4bit", LIN_99M * 4.25 + EMB_99M),
    ("quantlm-99m-8bit", LIN_99M * 8 + EMB_99M),
    ("quantlm-3.9b-3bit", LIN_39B * 3.25 + EMB_39B),
    ("quantlm-3.9b-6bit", LIN_39B * 6 + EMB_39B),
    ("trilm-99m", LIN_99M * 1.58 + EMB_99M),
    ("trilm-3.9b", LIN_39B * 1.58 + EMB_39B),
])
def test_paper_bits_by_hand(name, bits):
    assert acc.budget(name).total_bits("paper") == pytest.approx(bits, rel=1e-12)


# The Spectra size table (DESIGN section 3), typed in here independently of quantlm.specs: hidden, GLU, layers.
SPECTRA_TABLE = {"99m": (512, 1280, 16), "190m": (768, 2048, 16), "390m": (1024, 2560, 24),
                 "560m": (1280, 3072, 24), "830m": (1536, 4096, 24), "1.1b": (1792, 5120, 24),
                 "1.5b": (2048, 6144, 24), "2.4b": (2304, 7680, 30), "3.9b": (3072, 9216, 30)}
B_EFF = {"floatlm": 16, "quantlm-8bit": 8, "quantlm-6bit": 6, "quantlm-4bit": 4.25, "quantlm-3bit": 3.25,
         "trilm": 1.58}


@pytest.mark.parametrize("size", SPECTRA_TABLE)
@pytest.mark.parametrize("family", B_EFF)
def test_paper_bits_golden_for_all_nine_sizes(size, family):
    """paper bits = L (4 h^2 + 3 h f) b_eff + 2 x 50304 x h x 16, for all 54 Spectra models (MHA, untied)."""
    h, f, layers = SPECTRA_TABLE[size]
    name = f"{family.split('-')[0]}-{size}" + (f"-{family.split('-')[1]}" if "-" in family else "")
    expected = layers * (4 * h * h + 3 * h * f) * B_EFF[family] + 2 * 50304 * h * 16
    assert acc.budget(name).total_bits("paper") == pytest.approx(expected, rel=1e-12)


def test_paper_convention_ignores_norms_and_padding():
    b = acc.budget("trilm-3.9b")  # stored vocab 50688 at MP 6; the paper counts 50304
    assert b.role_bits("norm", "paper") == 0
    assert b.role_bits("embedding", "paper") == pytest.approx(50304 * 3072 * 16)


# ------------------------------------------------------------------------------------- exact convention

def test_exact_floatlm_is_16_bits_per_stored_param():
    spec = get_preset("floatlm-1.1b")
    assert acc.budget("floatlm-1.1b").total_bits("exact") == 16 * spec.num_params(padded_vocab=True)


def test_exact_quantlm_counts_codes_scales_and_layout():
    h, n = 512, 16
    b = acc.budget("quantlm-99m-4bit")  # compressed-tensors, group 128, fp16 scales, sym
    codes = sum(o * math.ceil(i * 4 / 32) * 32 for o, i in get_preset("floatlm-99m").linear_shapes().values()) * n
    scales = sum(o * (i // 128) * 16 for o, i in get_preset("floatlm-99m").linear_shapes().values()) * n
    shapes = 7 * 2 * 64 * n
    float_part = (2 * 50304 * h + (2 * n + 1) * h) * 16
    assert b.total_bits("exact") == codes + scales + shapes + float_part
    gptq = acc.budget("quantlm-99m-4bit", quant_format="gptq")
    assert gptq.total_bits("exact") > b.total_bits("exact")  # g_idx and packed zeros cost extra


def test_exact_ternary_layouts():
    b16 = acc.budget("trilm-99m", ternary_format="ternary-1.6")
    b2 = acc.budget("trilm-99m", ternary_format="ternary-2")
    assert b16.role_bits("block_linear", "exact") == pytest.approx(
        sum(o * math.ceil(i / 5) * 8 + 16 for o, i in get_preset("trilm-99m").linear_shapes().values()) * 16)
    assert b2.role_bits("block_linear", "exact") == pytest.approx(
        sum(o * math.ceil(i / 4) * 8 + 16 for o, i in get_preset("trilm-99m").linear_shapes().values()) * 16)


def test_entropy_convention():
    b = acc.budget("trilm-99m")
    lin = b.role_bits("block_linear", "entropy")
    assert lin == pytest.approx(LIN_99M * math.log2(3) + 7 * 16 * 16)  # trits + one fp16 scale per linear
    q = acc.budget("quantlm-99m-3bit")
    assert q.role_bits("block_linear", "entropy") == pytest.approx(
        LIN_99M * 3 + sum(o * (i // 128) * 16 + 128 for o, i in get_preset("floatlm-99m").linear_shapes().values()) * 16)


def test_ratio_to_floatlm_and_ordering():
    rows = {r["model"]: r for r in acc.summarize([acc.budget(n) for n in
            ("floatlm-390m", "quantlm-390m-8bit", "quantlm-390m-4bit", "quantlm-390m-3bit", "trilm-390m")], ["exact"])}
    sizes = [rows[n]["bits"] for n in ("floatlm-390m", "quantlm-390m-8bit", "quantlm-390m-4bit",
                                        "quantlm-390m-3bit", "trilm-390m")]
    assert sizes == sorted(sizes, reverse=True)
    assert rows["floatlm-390m"]["ratio_to_floatlm"] == 1.0
    assert rows["trilm-390m"]["ratio_to_floatlm"] == pytest.approx(sizes[-1] / sizes[0])


# ------------------------------------------------------------------------------------- checkpoints

def _config(**extra) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
            "intermediate_size": 172, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_hidden_layers": 2, "vocab_size": 512, "tie_word_embeddings": False, **extra}


def _write_packed_checkpoint(path: Path, bits: int) -> None:
    """A GPTQ-layout checkpoint (qweight/qzeros/scales/g_idx, per-channel) with real tensors."""
    import torch
    from safetensors.torch import save_file

    cfg = _config(quantization_config={"quant_method": "gptq", "bits": bits, "group_size": -1, "sym": True,
                                       "desc_act": False})
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    spec = acc.checkpoint_spec(cfg, "x")
    t = {"model.embed_tokens.weight": torch.randn(512, 64, dtype=torch.float16),
         "lm_head.weight": torch.randn(512, 64, dtype=torch.float16),
         "model.norm.weight": torch.ones(64, dtype=torch.float16)}
    words = lambda n: -(-n * bits // 32)  # noqa: E731
    for i in range(2):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = torch.ones(64, dtype=torch.float16)
        t[p + "post_attention_layernorm.weight"] = torch.ones(64, dtype=torch.float16)
        for name, (o, k) in spec.linear_shapes().items():
            t[p + name + ".qweight"] = torch.randint(-2**31, 2**31 - 1, (words(k), o), dtype=torch.int32)
            t[p + name + ".qzeros"] = torch.zeros(1, words(o), dtype=torch.int32)
            t[p + name + ".scales"] = torch.rand(1, o, dtype=torch.float16)
            t[p + name + ".g_idx"] = torch.zeros(k, dtype=torch.int32)
    save_file(t, str(path / "model.safetensors"))


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_exact_bits_of_packed_checkpoint_equal_payload(tmp_path, bits):
    ckpt = tmp_path / "q"
    _write_packed_checkpoint(ckpt, bits)
    b = acc.budget(ckpt)
    assert b.family == "quantlm" and b.bits == bits
    f = ckpt / "model.safetensors"
    (n,) = struct.unpack("<Q", f.read_bytes()[:8])
    payload = f.stat().st_size - 8 - n
    assert b.total_bits("exact") == 8 * payload
    assert b.header_bytes == 8 + n
    # the same layout predicted from the config alone
    predicted = acc.budget(ckpt / "config.json", quant_format="gptq", group_size=-1)
    assert predicted.total_bits("exact") == b.total_bits("exact")
    # codes carry b bits of information per weight
    codes = [r for r in b.records if r.part == "codes"]
    assert sum(r.bits("entropy") for r in codes) == bits * sum(r.params for r in codes)


def test_unpacked_trilm_checkpoint_is_accounted_as_trilm(tiny_model_dir, tmp_path):
    import shutil

    d = tmp_path / "tri"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["pretraining_model_parallel"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    b = acc.budget(d)
    assert b.family == "trilm"
    lin = sum(r.params for r in b.records if r.role == "block_linear")
    assert b.role_bits("block_linear", "paper") == pytest.approx(1.58 * lin)
    assert b.role_bits("block_linear", "exact") == 32 * lin  # stored in fp32 here: exact is what is stored


def _fake_huge_checkpoint(path: Path, shards: int = 8) -> int:
    """A sharded 70B-shaped bf16 checkpoint whose files are sparse: headers real, data never written."""
    h, f, layers, vocab = 8192, 28672, 80, 128256
    cfg = _config(hidden_size=h, intermediate_size=f, num_attention_heads=64, num_key_value_heads=8,
                  num_hidden_layers=layers, vocab_size=vocab)
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    spec = acc.checkpoint_spec(cfg, "big")
    shapes = spec.tensor_shapes()
    names = list(shapes)
    weight_map, total = {}, 0
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        header, off = {}, 0
        for name in names[s::shards]:
            nbytes = math.prod(shapes[name]) * 2
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [off, off + nbytes]}
            weight_map[name] = fname
            off += nbytes
        raw = json.dumps(header).encode()
        with open(path / fname, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            fh.truncate(8 + len(raw) + off)  # sparse: no data blocks on disk
        total += off
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return total


def test_measuring_reads_headers_only(tmp_path, monkeypatch):
    ckpt = tmp_path / "big"
    payload = _fake_huge_checkpoint(ckpt)
    assert payload > 100e9  # a 140 GB checkpoint
    read_bytes = []
    real_open = open

    class Spy:
        def __init__(self, fh):
            self.fh = fh

        def read(self, n=-1):
            data = self.fh.read(n)
            read_bytes.append(len(data))
            return data

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.fh.close()

    # the headers are read by hf_checkpoint (accounting's reader of checkpoint files)
    monkeypatch.setattr(hf_checkpoint, "open", lambda p, mode="r", *a, **k: Spy(real_open(p, mode, *a, **k)),
                        raising=False)
    b = acc.budget(ckpt)
    assert b.total_bits("exact") == 8 * payload
    assert sum(read_bytes) == b.header_bytes  # 8-byte lengths + JSON headers, not one byte of tensor data


# ------------------------------------------------------------------------------------- errors

def test_unknown_preset(tmp_path):
    with pytest.raises(QuantlmError, match="unknown preset 'trilm-3.9'; did you mean trilm-3.9b"):
        acc.budget("trilm-3.9")


def test_no_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_config()))
    with pytest.raises(QuantlmError, match="no \\*.safetensors"):
        acc.budget_from_checkpoint(tmp_path)


def test_corrupt_and_truncated_headers(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_config()))
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\xff" * 64)
    with pytest.raises(QuantlmError, match="corrupt safetensors header"):
        acc.budget(tmp_path)
    raw = json.dumps({"model.norm.weight": {"dtype": "F16", "shape": [64], "data_offsets": [0, 128]}}).encode()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 10)
    with pytest.raises(QuantlmError, match="truncated"):
        acc.budget(tmp_path)
    f.write_bytes(struct.pack("<Q", 20) + b"{not json at all!!!}")
    with pytest.raises(QuantlmError, match="not valid JSON"):
        acc.budget(tmp_path)


def test_not_llama(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(QuantlmError, match="is not supported; quantlm handles llama"):
        acc.budget(tmp_path)


def test_bits_and_group_size_errors():
    with pytest.raises(QuantlmError, match="outside 2..8"):
        acc.budget("floatlm-99m", bits=9)
    with pytest.raises(QuantlmError, match="group size 100 does not divide the input width 128"):
        acc.budget("floatlm-micro", bits=4, group_size=100)


def test_paper_vocab_is_50304_for_gpt_neox_only():
    assert acc.paper_vocab(50277) == acc.paper_vocab(50304) == acc.paper_vocab(50688) == 50304
    assert acc.paper_vocab(4096) == 4096 and acc.paper_vocab(128256) == 128256
    b = acc.budget("floatlm-micro")  # own 4096-token BPE: embedding and head counted over their own rows
    assert b.role_bits("embedding", "paper") == 4096 * 128 * 16
