import json

import pytest

from quantlm.cli import main


def test_no_arguments_prints_the_54_model_table(capsys):
    assert main(["size"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.strip().startswith(("floatlm-", "quantlm-", "trilm-"))]
    assert len(lines) == 54
    header = out.splitlines()[0]
    assert "paper Gbit" in header and "exact Gbit" in header


def test_json_records(capsys):
    assert main(["size", "quantlm-99m-4bit", "trilm-99m", "--convention", "all", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 6
    for r in rows:
        assert {"model", "family", "convention", "params", "bits", "bytes"} <= set(r)
    paper = next(r for r in rows if r["model"] == "quantlm-99m-4bit" and r["convention"] == "paper")
    assert paper["bits"] == 48_234_496 * 4.25 + 2 * 50304 * 512 * 16


def test_per_tensor_csv(capsys, tmp_path):
    out = tmp_path / "t.csv"
    assert main(["size", "floatlm-micro", "--per-tensor", "--format", "csv", "--out", str(out)]) == 0
    assert capsys.readouterr().out == ""
    lines = out.read_text().splitlines()
    assert lines[0].startswith("model,tensor,role,part")
    assert len(lines) - 1 == 3 + 9 * 4  # embedding, head, final norm + 9 tensors per block x 4 blocks


def test_checkpoint_and_bits_override(capsys, tiny_model_dir):
    assert main(["size", str(tiny_model_dir), "--bits", "4", "--group-size", "-1", "--format", "json",
                 "--convention", "exact"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["family"] == "quantlm" and row["quant_bits"] == 4


@pytest.mark.parametrize("argv,message", [
    (["size", "floatlm-9m"], "unknown preset 'floatlm-9m'; did you mean"),
    (["size", "floatlm-99m", "--bits", "1"], "outside 2..8"),
    (["size", "floatlm-micro", "--bits", "4", "--group-size", "96"], "does not divide the input width"),
    (["size", "/nonexistent/model"], "no such checkpoint directory or config.json"),
])
def test_errors_are_one_line_exit_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_missing_header_error(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_hidden_layers": 1, "vocab_size": 256}))
    (tmp_path / "model.safetensors").write_bytes(b"\x01")
    assert main(["size", str(tmp_path)]) == 2
    assert "too short to be safetensors" in capsys.readouterr().err


def test_checkpoint_measured_as_stored(capsys, tiny_model_dir):
    assert main(["size", str(tiny_model_dir), "--convention", "exact", "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    files = list(tiny_model_dir.glob("*.safetensors"))
    import struct

    payload = sum(f.stat().st_size - 8 - struct.unpack("<Q", f.read_bytes()[:8])[0] for f in files)
    assert row["family"] == "floatlm" and row["source"] == "checkpoint"
    assert row["bits"] == 8 * payload
