"""`quantlm quantize`: flags and recipes, and every bad input as one line, exit code 2, nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantlm.cli import main

FAST = ["--nsamples", "4", "--seqlen", "32", "--group-size", "4", "--no-progress"]


def run(capsys, *argv):
    rc = main(["quantize", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clean_failure(rc, err, out_dir, match):
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("quantlm quantize: error:"), err
    assert match in lines[0], lines[0]
    assert not out_dir.exists()
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith("." + out_dir.name)]


def test_quantize_with_flags_and_formats(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    rc, stdout, _ = run(capsys, tiny_model_dir, "--bits", 3, "--group-size", 4, "--asym", "--no-act-order",
                        "--damp", 0.05, "--seed", 2, "--format", "unpacked,compressed-tensors", "--out", out, *FAST)
    assert rc == 0, stdout
    assert sorted(p.name for p in out.iterdir()) == [".quantlm-output", "compressed-tensors", "report.json", "unpacked"]
    report = json.load(open(out / "report.json"))
    r = report["recipe"]["gptq"]
    assert (r["bits"], r["group_size"], r["sym"], r["act_order"], r["damp"]) == (3, 4, False, False, 0.05)
    assert report["seed"] == 2 and report["calibration"]["tokens"] == 4 * 32 and report["method"] == "gptq"
    assert "compressed-tensors" in stdout and "unpacked" in stdout


def test_recipe_file_and_overrides(tiny_model_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("kind: quant\ngptq: {bits: 8, group_size: -1}\ncalibration: {nsamples: 2, seqlen: 16}\n"
                      "export: {formats: [gptq]}\n")
    out = tmp_path / "q"
    rc, _, _ = run(capsys, tiny_model_dir, "--recipe", recipe, "--seqlen", 24, "--out", out, "--no-progress", "--rtn")
    assert rc == 0
    report = json.load(open(out / "report.json"))
    assert report["recipe"]["gptq"]["bits"] == 8 and report["recipe"]["calibration"]["seqlen"] == 24
    assert report["method"] == "rtn"
    assert list(report["paths"]) == ["gptq"]
    # an existing OUT_DIR is kept unless --overwrite; with it, it is replaced
    before = (out / "report.json").read_bytes()
    rc, _, err = run(capsys, tiny_model_dir, "--recipe", recipe, "--out", out, "--no-progress")
    assert rc == 2 and "--overwrite" in err and (out / "report.json").read_bytes() == before
    rc, _, _ = run(capsys, tiny_model_dir, "--recipe", recipe, "--out", out, "--overwrite", "--no-progress")
    assert rc == 0 and json.load(open(out / "report.json"))["method"] == "gptq"


@pytest.fixture()
def broken_models(tiny_model_dir, tmp_path):
    """Copies of the tiny model: one that is not LLaMA-like, one with a NaN weight."""
    gpt2 = tmp_path / "gpt2"
    shutil.copytree(tiny_model_dir, gpt2)
    cfg = json.load(open(gpt2 / "config.json"))
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (gpt2 / "config.json").write_text(json.dumps(cfg))
    nan = tmp_path / "nan"
    shutil.copytree(tiny_model_dir, nan)
    t = load_file(nan / "model.safetensors")
    t["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("inf")
    save_file(t, str(nan / "model.safetensors"), metadata={"format": "pt"})
    return {"gpt2": gpt2, "nan": nan}


@pytest.mark.parametrize("case, extra, match", [
    ("llama", ["--bits", "9"], "bits=9 is outside 2..8"),
    ("llama", ["--bits", "1"], "outside 2..8"),
    ("llama", ["--group-size", "16"], "does not divide the input width"),
    ("llama", ["--group-size", "0"], "group_size=0"),
    ("llama", ["--bits", "6", "--format", "gptq"], "gptq format holds 2, 3, 4 or 8 bits"),
    ("llama", ["--format", "pickle"], "unknown QuantLM format 'pickle'"),
    ("llama", ["--format", "gguf"], "no GGUF block type holds this symmetric 4-bit code (group size 4"),
    ("llama", ["--gguf-type", "Q4_0"], "gguf is not among the formats"),
    ("llama", ["--format", ","], "no export format given"),
    ("llama", ["--seqlen", "2000000"], "exceeds the model's context"),
    ("llama", ["--calib", "/nonexistent/calib.jsonl"], "does not exist"),
    ("llama", ["--recipe", "/nonexistent/r.yaml"], "does not exist"),
    ("gpt2", [], "is not supported; quantlm handles llama"),
    ("nan", [], "NaN or Inf"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tiny_model_dir, broken_models, tmp_path, capsys,
                                                      case, extra, match):
    model = tiny_model_dir if case == "llama" else broken_models[case]
    out = tmp_path / "out"
    rc, _, err = run(capsys, model, "--out", out, *FAST, *extra)
    assert_clean_failure(rc, err, out, match)


def test_short_calibration_text_and_missing_model(tiny_model_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    out = tmp_path / "out"
    rc, _, err = run(capsys, tiny_model_dir, "--calib", short, "--out", out, *FAST)
    assert_clean_failure(rc, err, out, "shorter than one window")
    rc, _, err = run(capsys, tmp_path / "no-model", "--out", out, *FAST)
    assert_clean_failure(rc, err, out, "no config.json")


def test_cuda_without_gpu(tiny_model_dir, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = tmp_path / "out"
    rc, _, err = run(capsys, tiny_model_dir, "--device", "cuda", "--out", out, *FAST)
    assert_clean_failure(rc, err, out, "no CUDA GPU")
