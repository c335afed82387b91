"""GGUF through the registry and the commands: `quantlm quantize --formats gguf`, `quantlm export --format gguf`,
`quantlm size FILE.gguf`; the exact size of every export equals the prediction from config + recipe and 8 x its
tensor payload, and the file holds quantlm's weights bit for bit (gguf-py's decoding as the oracle).

The model is tests/gguf_tiny.py's tiny LLaMA (hidden 256, FFN 512): widths that every GGUF type accepts.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from quantlm import accounting as acc
from quantlm.cli import main
from quantlm.formats.registry import Layout

gguf = pytest.importorskip("gguf")

FAST = ["--nsamples", "4", "--seqlen", "32", "--no-progress"]


@pytest.fixture(scope="module")
def tiny256(tmp_path_factory, tiny_tokenizer_dir):
    from gguf_tiny import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("gguf-export") / "floatlm", tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def quantized(tiny256, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "q4"
    assert main(["quantize", str(tiny256), "--bits", "4", "--group-size", "128", "--formats", "gptq,gguf",
                 "--out", str(out), *FAST]) == 0
    return out


@pytest.fixture(scope="module")
def trilm_dir(tiny256, tmp_path_factory):
    """The tiny model as an unpacked TriLM with one scale shard (every block lies in one shard)."""
    import shutil

    from transformers import AutoModelForCausalLM

    from quantlm.models.trilm import convert_to_trilm, export_unpacked

    out = tmp_path_factory.mktemp("tri") / "trilm"
    export_unpacked(convert_to_trilm(AutoModelForCausalLM.from_pretrained(tiny256), mp=1), out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny256 / f, out / f)
    return out


def file_weights(path) -> dict[str, np.ndarray]:
    """gguf-py's decoding of every tensor of a GGUF file, [out, in] (q/k rows as llama.cpp stores them)."""
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        out[t.name] = w.reshape([int(n) for n in reversed(t.shape)])
    return out


def unpermute(name: str, w: np.ndarray, config: dict) -> np.ndarray:
    from quantlm.formats.gguf import rope_permutation

    if ".attn_q." in name or ".attn_k." in name:
        heads = config["num_attention_heads"] if ".attn_q." in name else config["num_key_value_heads"]
        return w[torch.argsort(rope_permutation(w.shape[0], heads)).numpy()]
    return w


def assert_size_is_predicted(model_dir, config_path, layout: Layout):
    """The header-only size equals 8 x the payload and the prediction from config.json + layout."""
    from quantlm.formats.gguf import read_gguf_header

    path = model_dir / "model.gguf"
    header = read_gguf_header(path)
    measured = acc.budget(model_dir)
    assert measured.source == "gguf" and acc.budget(path).total_bits("exact") == measured.total_bits("exact")
    predicted = acc.budget(config_path, layout=layout)
    assert measured.total_bits("exact") == 8 * header["payload_bytes"] == predicted.total_bits("exact")
    assert header["consistent"] and header["file_bytes"] == measured.file_bytes
    assert header["header_bytes"] + header["payload_bytes"] + header["padding_bytes"] == header["file_bytes"]
    meta = json.loads((model_dir / "quantlm.json").read_text())
    assert meta["format"] == "gguf" and meta["accounting"]["as_stored"]["exact"] == 8 * header["payload_bytes"]
    return measured


def test_quantize_writes_gguf_holding_the_gptq_codes(quantized, tiny256):
    from quantlm.formats.gguf import hf_name
    from quantlm.formats.loader import read_linears
    from quantlm.hf_checkpoint import block_map_for, read_config

    d = quantized / "gguf"
    assert sorted(p.name for p in d.iterdir()) == ["model.gguf", "quantlm.json"]
    report = json.loads((quantized / "report.json").read_text())
    assert report["paths"]["gguf"] == str(d) and "changes" not in report
    measured = assert_size_is_predicted(d, tiny256 / "config.json", Layout("quantlm", "gguf", bits=4, group_size=128))
    assert {r.storage for r in measured.records if r.role == "block_linear"} == {"Q4_0"}
    assert measured.bits == 4 and measured.family == "quantlm"
    # bit for bit the gptq sibling's codes: the same QuantizedLinear, decoded by gguf-py
    cfg = read_config(quantized / "gptq")
    _, linears = read_linears(quantized / "gptq", cfg, acc.checkpoint_layout(quantized / "gptq", cfg),
                              block_map_for(cfg))
    weights = file_weights(d / "model.gguf")
    for name, w in weights.items():
        hf = hf_name(name)[: -len(".weight")]
        if hf in linears:
            np.testing.assert_array_equal(unpermute(name, w, cfg), linears[hf].dequantize().numpy())


def test_export_of_the_gptq_checkpoint_writes_the_same_tensors(quantized, tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["export", str(quantized / "gptq"), "--format", "gguf", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "quantlm gptq -> gguf" in stdout and "changed" not in stdout
    a, b = file_weights(out / "model.gguf"), file_weights(quantized / "gguf" / "model.gguf")
    assert a.keys() == b.keys()
    for k in a:  # norms differ: the gptq checkpoint keeps them in fp16, quantize's own export in fp32
        if not k.endswith("norm.weight"):
            np.testing.assert_array_equal(a[k], b[k])


def test_floatlm_exports_f16_and_round_to_nearest_on_request(tiny256, tmp_path, capsys):
    from safetensors.torch import load_file

    from quantlm.formats.gguf import gguf_name

    cfg = json.loads((tiny256 / "config.json").read_text())
    assert main(["export", str(tiny256), "--format", "gguf", "--out", str(tmp_path / "f16")]) == 0
    assert "changed" not in capsys.readouterr().out
    assert_size_is_predicted(tmp_path / "f16", tiny256 / "config.json", Layout("floatlm", "gguf"))
    weights = file_weights(tmp_path / "f16" / "model.gguf")
    for name, t in load_file(str(tiny256 / "model.safetensors")).items():
        want = t.to(torch.float32 if "norm" in name else torch.float16).float().numpy()
        np.testing.assert_array_equal(unpermute(gguf_name(name), weights[gguf_name(name)], cfg), want)

    assert main(["export", str(tiny256), "--format", "gguf", "--type", "Q4_0", "--out", str(tmp_path / "rtn")]) == 0
    assert "changed 14 tensor(s) written as Q4_0" in capsys.readouterr().out  # reported: not exact
    assert_size_is_predicted(tmp_path / "rtn", tiny256 / "config.json",
                             Layout("floatlm", "gguf", options={"gguf_type": "Q4_0"}))


@pytest.mark.parametrize("type_name", ["TQ1_0", "TQ2_0"])
def test_trilm_exports_losslessly_as_tq(trilm_dir, tmp_path, capsys, type_name):
    from safetensors.torch import load_file

    from quantlm.formats.gguf import gguf_name

    out = tmp_path / type_name
    argv = ["export", str(trilm_dir), "--format", "gguf", "--out", str(out)]
    assert main(argv + ([] if type_name == "TQ1_0" else ["--type", type_name])) == 0
    assert "changed" not in capsys.readouterr().out
    measured = assert_size_is_predicted(out, trilm_dir / "config.json", Layout("trilm", "gguf", options={"gguf_type": type_name}))
    assert measured.family == "trilm" and {r.storage for r in measured.records if r.role == "block_linear"} == {
        type_name}
    cfg = json.loads((trilm_dir / "config.json").read_text())
    weights = file_weights(out / "model.gguf")
    for name, t in load_file(str(trilm_dir / "model.safetensors")).items():
        if ".mlp." in name or ".self_attn." in name:  # gamma * W_t, exact in fp16
            np.testing.assert_array_equal(unpermute(gguf_name(name), weights[gguf_name(name)], cfg), t.float().numpy())


def test_straddling_shards_name_the_layer_and_the_options(trilm_dir, tmp_path, capsys):
    import shutil

    two = tmp_path / "mp2"
    shutil.copytree(trilm_dir, two)
    from safetensors.torch import load_file, save_file

    from quantlm.models.trilm import ternary_weight

    cfg = json.loads((two / "config.json").read_text())
    cfg["pretraining_model_parallel"] = 2
    (two / "config.json").write_text(json.dumps(cfg))
    state = load_file(str(two / "model.safetensors"))
    for name in list(state):  # re-ternarize the row-parallel layers with two shards of 128 columns
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            state[name] = ternary_weight(torch.randn(state[name].shape), mp=2, kind="row").half()
    save_file(state, str(two / "model.safetensors"), metadata={"format": "pt"})
    argv = ["export", str(two), "--format", "gguf", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "model.layers.N.self_attn.o_proj: TQ1_0 cannot hold" in err and "merge_shard_scales=True" in err
    assert not (tmp_path / "out").exists()
    assert main(argv + ["--merge-shard-scales"]) == 0
    stdout = capsys.readouterr().out
    assert "written as TQ1_0" in stdout and "got one merged scale" in stdout
    meta = json.loads((tmp_path / "out" / "quantlm.json").read_text())
    # o_proj's shards are 128 wide; down_proj's (512 / 2) are whole TQ blocks
    assert {c["name"].split(".")[2] for c in meta["info"]["changes"]} == {"attn_output"}


def test_kquant_opt_in_is_reported_and_accounted(quantized, tmp_path, capsys):
    out = tmp_path / "q6k"
    argv = ["export", str(quantized / "gptq"), "--format", "gguf", "--type", "Q6_K", "--out", str(out)]
    assert main(argv) == 2
    assert "Q6_K with kquant_grouped=True" in capsys.readouterr().err
    assert main(argv + ["--kquant-grouped"]) == 0
    assert "changed 14 tensor(s) written as Q6_K: largest scale change" in capsys.readouterr().out
    assert_size_is_predicted(out, quantized / "gptq" / "config.json",
                             Layout("quantlm", "gguf", bits=4, group_size=128, options={"gguf_type": "Q6_K", "kquant_grouped": True}))


def test_dequantized_quantlm_cannot_be_exported_exactly(tiny256, tmp_path, capsys):
    q = tmp_path / "q"
    assert main(["quantize", str(tiny256), "--bits", "8", "--group-size", "-1", "--out", str(q), *FAST]) == 0
    assert main(["export", str(q / "unpacked"), "--format", "gguf", "--out", str(tmp_path / "g")]) == 2
    assert "its integer codes are gone" in capsys.readouterr().err


def test_size_of_a_gguf_file_from_its_header(quantized, capsys):
    path = quantized / "gguf" / "model.gguf"
    assert main(["size", str(path), "--convention", "all", "--format", "json"]) == 0
    rows = {r["convention"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["exact"]["bits"] == 8 * rows["exact"]["payload_bytes"]
    assert rows["exact"]["header_bytes"] + rows["exact"]["payload_bytes"] <= rows["exact"]["file_bytes"]
    assert rows["exact"]["bpp_block_linear"] == 4.5 and rows["entropy"]["bpp_block_linear"] == 4.5
    assert rows["paper"]["bpp_block_linear"] == 4.25  # the paper's b_eff of 4-bit group 128
    assert main(["size", str(path), "--per-tensor", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "storage" in lines[0].split(",") and any(",Q4_0," in ln for ln in lines)
    assert main(["size", str(path)]) == 0
    assert "tensor payload" in capsys.readouterr().out
    assert main(["size", str(path), "--bits", "4"]) == 2
    assert "measured as stored" in capsys.readouterr().err


@pytest.mark.parametrize("bits, group, want", [(8, -1, "Q8_0"), (6, -1, "Q6_K"), (3, -1, "Q3_K"), (5, 128, "Q5_0"),
                                               (3, 128, "Q4_0")])
def test_predicted_type_per_recipe(tiny256, bits, group, want):
    """`quantlm size CONFIG --layout gguf` predicts the smallest exact type and its bytes."""
    b = acc.budget(tiny256 / "config.json", layout=Layout("quantlm", "gguf", bits=bits, group_size=group))
    from quantlm.formats.gguf import blocks as gb

    linear = [r for r in b.records if r.role == "block_linear"]
    assert all(r.dtype == "U8" for r in linear)
    assert sum(r.bits("exact") for r in linear) == gb.bits_per_weight(want) * sum(r.params * r.count for r in linear)


def test_quantize_reports_the_kquant_changes(tiny256, tmp_path, capsys):
    out = tmp_path / "q3k"
    argv = ["quantize", str(tiny256), "--bits", "3", "--group-size", "32", "--formats", "gguf", "--gguf-type", "Q3_K",
            "--out", str(out), *FAST]
    assert main(argv) == 2  # grouped 3-bit codes fit Q3_K only with re-quantized scales: asked for, not assumed
    assert "kquant_grouped=True" in capsys.readouterr().err and not out.exists()
    assert main(argv + ["--kquant-grouped"]) == 0
    assert "changed 14 tensor(s) written as Q3_K: largest scale change" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert len(report["changes"]["gguf"]) == 14 and all(c["weight_error"] > 0 for c in report["changes"]["gguf"])
    assert_size_is_predicted(out / "gguf", tiny256 / "config.json",
                             Layout("quantlm", "gguf", bits=3, group_size=32, options={"gguf_type": "Q3_K", "kquant_grouped": True}))


def test_gguf_options_belong_to_the_gguf_format():
    from quantlm.errors import QuantlmError

    with pytest.raises(QuantlmError, match="option gguf_type applies to the gguf format, not gptq"):
        Layout("quantlm", "gptq", bits=4, group_size=128, options={"gguf_type": "Q4_0"})
    plain = Layout("quantlm", "gguf", bits=4, group_size=128)
    spelled = Layout("quantlm", "gguf", bits=4, group_size=128, options={"gguf_type": "", "kquant_grouped": False})
    assert plain == spelled and plain.option("gguf_type") == "" and plain.option("merge_shard_scales") is False
    assert Layout("quantlm", "gguf", bits=4, group_size=128, options={"gguf_type": "Q8_0"}).option("gguf_type") == "Q8_0"
