"""validate: the checkpoint reader every command uses, text files and devices (CPU, milliseconds each)."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoint_edits import copy_model
from safetensors.torch import load_file, save_file

from quantlm import textdocs, validate
from quantlm.errors import QuantlmError


def test_a_good_checkpoint_passes_every_check(tiny_model_dir):
    info = validate.check_model(tiny_model_dir, export_dtype="float16", seqlen=128)
    assert info.vocab_rows == 512 and not info.packed
    assert set(info.tensors) == set(validate.expected_tensors(info.config))
    assert validate.tokenizer_size(tiny_model_dir) <= 512


def test_expected_names_follow_the_config():
    cfg = {"hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
           "num_hidden_layers": 1, "vocab_size": 10, "tie_word_embeddings": True, "attention_bias": True, "model_type": "llama"}
    names = validate.expected_tensors(cfg)
    assert "lm_head.weight" not in names and names["model.layers.0.self_attn.k_proj.weight"] == (4, 8)
    assert names["model.layers.0.self_attn.q_proj.bias"] == (8,) and "model.layers.0.mlp.up_proj.bias" not in names


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop("model.layers.1.mlp.down_proj.weight"), "tensor model.layers.1.mlp.down_proj.weight is missing"),
    (lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.wieght", t.pop("model.layers.0.self_attn.q_proj.weight")),
     "a mangled name"),
    (lambda t: t.__setitem__("model.layers.5.mlp.up_proj.weight", torch.zeros(2, 2)), "unexpected tensor"),
    (lambda t: t.__setitem__("model.norm.weight", torch.ones(63)), r"has shape \[63\], the config implies \[64\]"),
    (lambda t: t.__setitem__("model.norm.weight", torch.ones(64, dtype=torch.int32)), "is stored as I32"),
    (lambda t: t.pop("lm_head.weight"), "tensor lm_head.weight is missing"),
])
def test_header_problems_are_one_line_errors(tiny_model_dir, tmp_path, edit, match):
    bad = copy_model(tiny_model_dir, tmp_path / "m", edit)
    with pytest.raises(QuantlmError, match=match) as e:
        validate.check_checkpoint(bad)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("value, dtype, export, match", [
    (float("nan"), torch.float32, None, r"holds NaN or Inf values \(1 NaN, 0 Inf"),
    (float("inf"), torch.bfloat16, None, r"holds NaN or Inf values \(0 NaN, 1 Inf"),
    (1e5, torch.bfloat16, "float16", "beyond float16's range .* --export-dtype bfloat16"),
])
def test_data_problems_name_the_tensor_and_the_fix(tiny_model_dir, tmp_path, value, dtype, export, match):
    def edit(t):
        w = t["model.layers.0.input_layernorm.weight"].to(dtype)
        w[3] = value
        t["model.layers.0.input_layernorm.weight"] = w

    bad = copy_model(tiny_model_dir, tmp_path / "m", edit)
    validate.check_checkpoint(bad)  # headers are fine
    with pytest.raises(QuantlmError, match=rf"tensor model.layers.0.input_layernorm.weight .*{match}"):
        validate.check_data(bad, export)
    if export:
        validate.check_data(bad, "bfloat16")  # fits bf16: fine


def test_truncated_corrupt_and_missing_shards(tiny_model_dir, tmp_path):
    trunc = copy_model(tiny_model_dir, tmp_path / "trunc")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(QuantlmError, match="file is truncated"):
        validate.check_checkpoint(trunc)
    corrupt = copy_model(tiny_model_dir, tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\xff" * 64 + data[64:])
    with pytest.raises(QuantlmError, match="corrupt safetensors header"):
        validate.check_checkpoint(corrupt)
    sharded = copy_model(tiny_model_dir, tmp_path / "sharded")
    tensors = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:5]}, sharded / "model-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in names[5:]}, sharded / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {n: f"model-0000{1 if i < 5 else 2}-of-00002.safetensors"
                                            for i, n in enumerate(names)}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    validate.check_model(sharded)
    index["weight_map"][names[0]] = "model-00002-of-00002.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(QuantlmError, match="the index and the shards do not match"):
        validate.check_checkpoint(sharded)
    (sharded / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(QuantlmError, match="shard model-00001-of-00002.safetensors named by .* is missing"):
        validate.check_checkpoint(sharded)


def test_tokenizer_and_seqlen_against_the_model(tiny_model_dir, tmp_path):
    small = copy_model(tiny_model_dir, tmp_path / "m", lambda t: None, config_edit=lambda c: c.update(vocab_size=100))
    with pytest.raises(QuantlmError):  # the embedding rows no longer match the config
        validate.check_checkpoint(small)
    validate.check_tokenizer_fits(512, 512)
    with pytest.raises(QuantlmError, match="the tokenizer has 600 tokens but the model embeds only 512"):
        validate.check_tokenizer_fits(600, 512, "m")
    with pytest.raises(QuantlmError, match=r"--seqlen 4096 exceeds the model's context \(max_position_embeddings 256\)"):
        validate.check_seqlen(4096, {"max_position_embeddings": 256})
    validate.check_seqlen(4096, {"max_position_embeddings": 256}, allow=True)


def test_packed_checkpoints_skip_block_linears(tiny_model_dir, tmp_path):
    def edit(t):
        w = t.pop("model.layers.0.self_attn.q_proj.weight")
        t["model.layers.0.self_attn.q_proj.qweight"] = torch.zeros(w.shape[1] // 8, w.shape[0], dtype=torch.int32)

    packed = copy_model(tiny_model_dir, tmp_path / "p", edit,
                        config_edit=lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4}))
    assert validate.check_checkpoint(packed).packed
    validate.check_data(packed)


def test_text_files(tmp_path):
    good = tmp_path / "good.txt"
    good.write_bytes("\ufeffcaf\u00e9\n".encode())
    assert textdocs.read_text_file(good) == "caf\u00e9\n"
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"line one\ncaf\xe9\n")
    with pytest.raises(QuantlmError, match=r"latin.txt is not UTF-8 \(byte 0xe9 at offset 12, line 2\); convert it"):
        textdocs.read_text_file(latin, "calibration file")
    binary = tmp_path / "x.jsonl"
    binary.write_bytes(b"{}\n\x00\x01\x02")
    with pytest.raises(QuantlmError, match="is binary, not text"):
        list(textdocs.iter_lines(binary))
    gz = tmp_path / "c.txt"
    gz.write_bytes(b"\x1f\x8b\x08\x00")
    with pytest.raises(QuantlmError, match="is gzip-compressed, not text"):
        textdocs.read_text_file(gz)
    with pytest.raises(QuantlmError, match="does not exist"):
        textdocs.read_text_file(tmp_path / "nope.txt")
    assert [n for n, _ in textdocs.iter_lines(good)] == [1]


def test_devices():
    assert validate.check_device("cpu") == "cpu"
    for bad, match in (("tpu", "unknown device|not supported"), ("cuda:7", "CUDA"), ("cpu:x", "unknown device")):
        if bad == "cuda:7" and torch.cuda.device_count() > 7:
            continue
        with pytest.raises(QuantlmError, match=match):
            validate.check_device(bad)


def test_headers_read_by_the_caller_are_not_read_again(tiny_model_dir, monkeypatch):
    from quantlm import accounting

    f = tiny_model_dir / "model.safetensors"
    entries, _ = accounting.read_safetensors_header(f)
    monkeypatch.setattr(accounting, "read_safetensors_header", lambda *a: pytest.fail("read twice"))
    info = validate.check_checkpoint(tiny_model_dir, headers={f: entries})
    assert info.files["model.norm.weight"] == f
