"""evaluate() -> record -> load_records round trip, the CLI, the recipe YAML, and bad input leaving no record."""

from __future__ import annotations

import json
import shutil

import pytest

from quantlm.cli import main
from quantlm.errors import QuantlmError
from quantlm.eval.recipe import EvalRecipe
from quantlm.eval.records import load_records, read_record
from quantlm.eval.run import evaluate
from quantlm.recipes import dump, load


@pytest.fixture(scope="module")
def small_text(tmp_path_factory, corpus_text):
    p = tmp_path_factory.mktemp("text") / "sample.txt"
    p.write_text(corpus_text[20_000:40_000])
    return p


def test_record_round_trip(tiny_model_dir, small_text, tmp_path):
    recipe = EvalRecipe(ppl=(str(small_text),), tasks=("arc_easy", "boolq"), window=64, limit=3)
    extra = {"family": "quantlm", "bits": 4, "seed": 1, "preset": "quantlm-tiny-4bit",
             "sizes": {"paper": 1.0e6, "exact": 1.2e6, "entropy": 1.1e6}}
    rec = evaluate(tiny_model_dir, recipe, results_dir=tmp_path, extra=extra, progress=False)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and str(files[0]) == rec["path"]
    on_disk = read_record(files[0])
    assert on_disk["metrics"]["sample"]["ppl"] == rec["metrics"]["sample"]["ppl"]
    assert on_disk["recipe"]["tasks"] == ["arc_easy", "boolq"] and on_disk["versions"]["torch"]
    assert rec["params"] == 156_480 and rec["wall_time_s"] > 0
    df = load_records(tmp_path)
    assert len(df) == 1
    row = df.iloc[0]
    assert row["label"] == "QuantLM 4-bit" and row["size_bits_paper"] == 1.0e6 and row["seed"] == 1
    assert row["sample.ppl"] == pytest.approx(rec["metrics"]["sample"]["ppl"])
    assert row["sample.window"] == 64
    assert row["arc_easy.acc_norm"] == rec["metrics"]["arc_easy"]["acc_norm"]
    assert "boolq.acc" in df.columns and "boolq.acc_norm" not in df.columns
    assert rec["metrics"]["commonsense_avg"]["value"] is None  # only 2 of the 6 tasks ran


def test_identify_family_from_checkpoint(tiny_model_dir, small_text, tmp_path):
    trilm = tmp_path / "trilm"
    shutil.copytree(tiny_model_dir, trilm)
    cfg = json.loads((trilm / "config.json").read_text())
    cfg["pretraining_model_parallel"] = 1
    (trilm / "config.json").write_text(json.dumps(cfg))
    rec = evaluate(trilm, EvalRecipe(ppl=(str(small_text),), window=32, ppl_limit_windows=1), progress=False)
    assert rec["family"] == "trilm" and rec["bits"] == 1.58 and "path" not in rec


def test_unpacked_quantlm_export_is_recorded_as_quantlm_at_its_packed_size(tiny_model_dir, small_text, tmp_path):
    from quantlm.quantize import QuantRecipe, quantize_model
    from quantlm.recipes import replace_fields

    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    src = tmp_path / "float"
    shutil.copytree(tiny_model_dir, src)
    (src / "config.json").write_text(json.dumps({**cfg, "quantlm_family": "floatlm"}))  # as our trainer writes
    recipe = replace_fields(QuantRecipe(), bits=3, group_size=4, nsamples=4, seqlen=32, formats=("unpacked",),
                            data=str(small_text))
    quantize_model(src, recipe, tmp_path / "q", progress=False)
    rec = evaluate(tmp_path / "q" / "unpacked", EvalRecipe(ppl=(str(small_text),), window=32, ppl_limit_windows=1),
                   progress=False)
    packed = json.loads((tmp_path / "q" / "unpacked" / "quantlm.json").read_text())["accounting"]["packed"]
    assert rec["family"] == "quantlm" and rec["bits"] == 3
    assert rec["sizes"] == {c: float(packed[c]) for c in ("paper", "exact", "entropy")}
    assert "3-bit" in rec["size_layout"]
    floatrec = evaluate(src, EvalRecipe(ppl=(str(small_text),), window=32, ppl_limit_windows=1), progress=False)
    # a FloatLM counts as deployed in fp16 (as the suite counts it), whatever dtype its files hold
    assert floatrec["family"] == "floatlm" and floatrec["sizes"]["exact"] == 16 * floatrec["params"]
    assert floatrec["sizes"]["exact"] > 1.4 * rec["sizes"]["exact"]


def test_bad_input_writes_no_record(tiny_model_dir, small_text, tmp_path):
    out = tmp_path / "results"
    ok = EvalRecipe(ppl=(str(small_text),), window=32)
    not_lm = tmp_path / "bert"
    not_lm.mkdir()
    (not_lm / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        (not_lm, ok, "not a causal LM"),
        (tmp_path / "nowhere", ok, "does not exist"),
        (tiny_model_dir, EvalRecipe(ppl=(str(tmp_path / "missing.txt"),)), "neither a known name"),
        (tiny_model_dir, EvalRecipe(ppl=(str(empty),)), "empty"),
        (tiny_model_dir, EvalRecipe(ppl=(str(small_text),), window=100_000), "longer than the model context"),
    ]
    for model_dir, recipe, msg in cases:
        with pytest.raises(QuantlmError, match=msg):
            evaluate(model_dir, recipe, results_dir=out, progress=False)
    with pytest.raises(QuantlmError, match="unknown task"):
        EvalRecipe(tasks=("arc_easyy",))
    with pytest.raises(QuantlmError, match="neither perplexity corpora nor tasks"):
        EvalRecipe(ppl=(), tasks=())
    assert not out.exists() or not list(out.rglob("*.json"))


def test_recipe_yaml_round_trip(tmp_path):
    r = EvalRecipe(ppl=("wikitext2", "ptb"), tasks=("commonsense",), window=512, limit=10)
    dump(r, tmp_path / "e.yaml")
    assert load(tmp_path / "e.yaml", expect=EvalRecipe) == r


def test_cli_json(tiny_model_dir, small_text, tmp_path, capsys):
    rc = main(["eval", str(tiny_model_dir), "--ppl", f"wikitext2,{small_text}", "--ppl-limit-windows", "2",
               "--tasks", "piqa", "--limit", "2", "--results", str(tmp_path), "--format", "json"])
    assert rc == 0
    rec = json.loads(capsys.readouterr().out)
    w = rec["metrics"]["wikitext2"]
    assert {"ppl", "nll", "tokens", "window"} <= set(w) and w["window"] == 256 and w["tokens"] == 2 * 255
    assert rec["metrics"]["piqa"]["n"] == 2  # sciq, named alone, is refused before compute (test_fault_edges)
    assert len(list(tmp_path.glob("*.json"))) == 1
    rc = main(["eval", str(tiny_model_dir), "--ppl", str(small_text), "--window", "64", "--no-record"])
    assert rc == 0 and "ppl" in capsys.readouterr().out
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_cli_errors_exit_2(tiny_model_dir, tmp_path, capsys):
    assert main(["eval", str(tiny_model_dir), "--tasks", "nope", "--results", str(tmp_path)]) == 2
    assert main(["eval", str(tiny_model_dir), "--window", "4096", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'nope'" in err and "longer than the model context" in err
    assert not list(tmp_path.glob("*.json"))


def test_packed_exports_evaluate_without_optional_libraries(tiny_model_dir, small_text, tmp_path):
    """gptq and compressed-tensors exports load through quantlm's own loader (no optimum, GPTQModel or
    compressed-tensors needed), give the unpacked export's perplexity, and are told apart in their records."""
    import importlib.util

    from quantlm.quantize import QuantRecipe, quantize_model
    from quantlm.recipes import replace_fields

    for lib in ("optimum", "gptqmodel", "compressed_tensors"):
        assert importlib.util.find_spec(lib) is None, f"{lib} is installed: this test must run without it"
    recipe = replace_fields(QuantRecipe(), bits=4, group_size=4, nsamples=4, seqlen=32, data=str(small_text),
                            formats=("unpacked", "gptq", "compressed-tensors"))
    quantize_model(tiny_model_dir, recipe, tmp_path / "q", progress=False)
    quantize_model(tiny_model_dir, replace_fields(recipe, seed=1), tmp_path / "q1", progress=False)
    ev = EvalRecipe(ppl=(str(small_text),), window=32, ppl_limit_windows=2)
    recs = {fmt: evaluate(tmp_path / "q" / fmt, ev, progress=False) for fmt in ("unpacked", "gptq", "compressed-tensors")}
    ppl = {fmt: r["metrics"]["sample"]["ppl"] for fmt, r in recs.items()}
    assert ppl["gptq"] == pytest.approx(ppl["unpacked"], rel=1e-3)
    assert ppl["compressed-tensors"] == pytest.approx(ppl["unpacked"], rel=1e-3)
    assert {r["family"] for r in recs.values()} == {"quantlm"} and {r["bits"] for r in recs.values()} == {4}
    assert {r["format"] for r in recs.values()} == {"unpacked", "gptq", "compressed-tensors"}
    assert len({r["sizes"]["exact"] for r in recs.values()}) == 1  # all counted as deployed (packed)
    other = evaluate(tmp_path / "q1" / "unpacked", ev, progress=False)
    assert other["model"] != recs["unpacked"]["model"] and (other["seed"], recs["unpacked"]["seed"]) == (1, 0)


def test_curve_labels():
    from quantlm.eval.records import flatten

    def label(**kw):
        return flatten({"schema": "quantlm.eval/1", **kw})["label"]

    assert label(family="floatlm", bits=16) == "FloatLM" and label(family="trilm", bits=1.58) == "TriLM"
    assert label(family="quantlm", bits=3) == "QuantLM 3-bit"
    assert label(family="quantlm", bits=4, rtn=True) == "QuantLM 4-bit RTN"
