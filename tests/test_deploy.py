"""`quantlm bench` and the suite's deploy columns, in the main environment (no llama.cpp needed): settings, the
message when llama_cpp is missing, which GGUF type a checkpoint is exported with, and the suite table and plots
built from deploy records. llama.cpp itself runs in tests/test_llamacpp.py."""

from __future__ import annotations

import json

import pytest

from quantlm.cli import main
from quantlm.deploy import BenchSettings, check_llama_cpp, gguf_type_for, llama_cpp_available
from quantlm.errors import QuantlmError


def test_settings_are_checked():
    with pytest.raises(QuantlmError, match="decode_tokens=0"):
        BenchSettings(decode_tokens=0)


@pytest.mark.skipif(llama_cpp_available(), reason="llama_cpp is installed here")
def test_missing_llama_cpp_names_the_way_to_get_it(capsys, tmp_path):
    with pytest.raises(QuantlmError, match=r"bash \.ci/llamacpp\.sh.*pip install llama-cpp-python"):
        check_llama_cpp()
    assert main(["bench", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert "bash .ci/llamacpp.sh" in err and len(err.strip().splitlines()) == 1


def test_an_interpreter_that_does_not_exist_is_a_clear_error():
    with pytest.raises(QuantlmError, match="not importable by /nonexistent/python"):
        check_llama_cpp("/nonexistent/python")


def _config(tmp_path, hidden, ffn, mp=None):
    d = tmp_path / f"m{hidden}-{mp}"
    d.mkdir()
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
           "intermediate_size": ffn, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 512}
    if mp:
        cfg["pretraining_model_parallel"] = mp
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_trilm_type_falls_back_where_tq_cannot_hold_it(tmp_path):
    assert gguf_type_for(_config(tmp_path, 256, 512, mp=1)) == ("TQ1_0", "")
    t, note = gguf_type_for(_config(tmp_path, 128, 384, mp=1))  # trilm-micro's widths
    assert t == "Q4_0" and "TQ1_0 cannot hold" in note and "multiple of 256" in note
    assert gguf_type_for(_config(tmp_path, 128, 384), "Q8_0") == ("Q8_0", "")
    assert gguf_type_for(_config(tmp_path, 256, 512, mp=None)) == ("", "")  # a FloatLM: the export's default


def test_suite_table_and_plots_carry_the_deploy_columns(tmp_path):
    import numpy as np

    from quantlm import suite
    from quantlm.eval.records import SCHEMA, new_record_id, write_record
    from quantlm.suite.runner import DEPLOY_SCHEMA

    (tmp_path / "fl").mkdir()
    import yaml

    (tmp_path / "m.yaml").write_text(yaml.safe_dump({
        "kind": "suite", "name": "t", "output": str(tmp_path / "out"), "deploy": True,
        "models": [{"name": "floatlm-a", "family": "floatlm", "path": str(tmp_path / "fl")}], "bits": [4],
        "seeds": [0, 1]}))
    manifest, base = suite.load_manifest(tmp_path / "m.yaml")
    evals = {j.id: j.hash for j in suite.plan(manifest, base) if j.kind == "eval"}  # tables keep the plan's jobs
    results = tmp_path / "out" / "results"
    speeds = {"floatlm-a": (100.0, 300.0, "F16"), "quantlm-a-4bit": (180.0, 150.0, "Q4_0")}
    for n, (model, family, bits) in enumerate((("floatlm-a", "floatlm", 16), ("quantlm-a-4bit", "quantlm", 4),
                                               ("quantlm-a-4bit", "quantlm", 4))):
        write_record({"schema": SCHEMA, "id": new_record_id(), "created": f"2026-01-01T00:00:0{n}", "model": model,
                      "family": family, "bits": bits, "params": 1000, "seed": n - 1 if n else None,
                      "sizes": {"paper": 1000.0 * bits, "exact": 1000.0 * bits},
                      "metrics": {"wikitext2": {"ppl": 10.0 + n, "nll": float(np.log(10.0 + n))}},
                      "suite_job": {"id": (jid := "eval/floatlm-a" if n == 0 else f"eval/{model}-s{n - 1}"),
                                    "hash": evals[jid]}}, results)
    for model, (tok_s, rss, t) in speeds.items():
        (results / "deploy").mkdir(parents=True, exist_ok=True)
        (results / "deploy" / f"{model}.json").write_text(json.dumps({
            "schema": DEPLOY_SCHEMA, "model": model, "decode_tok_s": tok_s, "prompt_tok_s": 5 * tok_s,
            "rss_mb": rss, "gguf_bytes": int(rss * 1e6), "file_type": t}))
    out = suite.report(manifest, base)
    table = out["table"].set_index("model")
    assert table.loc["quantlm-a-4bit", "decode_tok_s"] == 180.0 and table.loc["floatlm-a", "gguf_type"] == "F16"
    assert {"prompt_tok_s", "rss_mb", "gguf_bytes"} <= set(table.columns)
    names = {p.name for p in out["plots"]}
    assert {"decode_vs_wikitext2_ppl.png", "memory_vs_wikitext2_ppl.svg"} <= names
    assert "decode_tok_s" in (results / "suite_table.md").read_text()
