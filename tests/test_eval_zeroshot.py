"""Zero-shot scoring: lm-eval request splitting, log-likelihoods and acc/acc_norm against an independent
computation, task data loaders, aliases and unavailable tasks."""

from __future__ import annotations

import math

import pytest
import torch

from quantlm.errors import QuantlmError
from quantlm.eval.tasks import TASKS, expand_tasks, load_docs
from quantlm.eval.zeroshot import (
    commonsense_average,
    encode_request,
    evaluate_task,
    loglikelihoods,
    zeroshot,
)
from quantlm.hf_checkpoint import load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)


def _independent_ll(model, tok, context: str, continuation: str) -> float:
    """Reference: score continuation tokens one request at a time with an explicit log_softmax."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    ids = torch.tensor([whole[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def test_encode_request_moves_trailing_space(lm):
    _, tok = lm
    a = encode_request(tok, "Question: why?\nAnswer: ", "yes")
    b = encode_request(tok, "Question: why?\nAnswer:", " yes")
    assert a == b and len(b[1]) >= 1
    ctx, cont = encode_request(tok, "", "hello")
    assert ctx == [tok.eos_token_id]


def test_loglikelihoods_match_independent(lm):
    model, tok = lm
    reqs = [("The cat sat on the", " mat"), ("Once upon a time", " there was a princess"),
            ("Anne", " Elliot"), ("It was a truth universally", " acknowledged, that")]
    got = loglikelihoods(model, tok, reqs, max_length=256, batch_size=3, progress=False)
    for (ctx, cont), r in zip(reqs, got, strict=True):
        assert r.ll == pytest.approx(_independent_ll(model, tok, ctx, cont), abs=1e-4)
        assert isinstance(r.greedy, bool) and not r.truncated


def test_continuation_longer_than_context_is_truncated_and_flagged(lm, corpus_text):
    model, tok = lm
    long_cont = " " + corpus_text[5000:9000]
    [r] = loglikelihoods(model, tok, [("Start", long_cont)], max_length=32, progress=False)
    k = encode_request(tok, "Start", long_cont)[1]
    ids = torch.tensor([k[-33:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    ref = sum(float(logp[j, t]) for j, t in enumerate(k[-32:]))
    assert r.truncated and r.ll == pytest.approx(ref, abs=1e-4)


@pytest.mark.parametrize("task", ["arc_easy", "piqa", "winogrande"])
def test_accuracy_matches_independent(lm, task):
    model, tok = lm
    limit = 5
    result = evaluate_task(model, tok, task, limit=limit, batch_size=4, progress=False)
    docs, _ = load_docs(TASKS[task], limit)
    correct = correct_norm = 0
    for d in docs:
        lls = [_independent_ll(model, tok, c, k) for c, k in zip(d.contexts, d.continuations, strict=True)]
        best = max(range(len(lls)), key=lambda i: (lls[i], -i))
        norm = [ll / len(ch) for ll, ch in zip(lls, d.choices, strict=True)]
        best_norm = max(range(len(norm)), key=lambda i: (norm[i], -i))
        correct += best == d.gold
        correct_norm += best_norm == d.gold
    assert result["status"] == "ok" and result["n"] == limit
    assert result["acc"] == pytest.approx(correct / limit)
    if "acc_norm" in TASKS[task].metrics:
        assert result["acc_norm"] == pytest.approx(correct_norm / limit)
    else:
        assert "acc_norm" not in result
    assert result["files"][0]["sha256"]


def test_lambada_acc_and_ppl(lm):
    model, tok = lm
    r = evaluate_task(model, tok, "lambada_openai", limit=3, progress=False)
    docs, _ = load_docs(TASKS["lambada_openai"], 3)
    lls = [_independent_ll(model, tok, d.contexts[0], d.continuations[0]) for d in docs]
    assert r["ppl"] == pytest.approx(math.exp(-sum(lls) / 3), rel=1e-4)
    assert r["acc"] in (0.0, 1 / 3, 2 / 3, 1.0)


def test_task_data_loads_with_expected_sizes():
    expected = {"arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "hellaswag": 10042, "boolq": 3270,
                "winogrande": 1267, "lambada_openai": 5153, "logiqa": 651}
    for name, n in expected.items():
        docs, files = load_docs(TASKS[name])
        assert len(docs) == n, name
        assert all(0 <= d.gold < len(d.choices) for d in docs), name
        assert all(len(d.contexts) == len(d.continuations) == len(d.choices) for d in docs), name
    wino, _ = load_docs(TASKS["winogrande"], 1)
    assert wino[0].contexts[0] != wino[0].contexts[1] and wino[0].continuations[0] == wino[0].continuations[1]
    boolq, _ = load_docs(TASKS["boolq"], 1)
    assert boolq[0].contexts[0].endswith("?\nAnswer:") and not boolq[0].contexts[0].startswith("Passage:")


def test_unknown_and_unavailable_tasks(lm):
    model, tok = lm
    with pytest.raises(QuantlmError, match="unknown task 'nope'"):
        expand_tasks(["nope"])
    r = zeroshot(model, tok, ["sciq"], limit=1, progress=False)
    assert r["sciq"]["status"] == "unavailable" and "acc" not in r["sciq"]
    assert expand_tasks(["commonsense", "arc_easy"])[:2] == ["arc_challenge", "arc_easy"]


def test_commonsense_average():
    ok = {t: {"status": "ok", "acc": 0.5, "acc_norm": 0.6} for t in
          ("arc_challenge", "arc_easy", "hellaswag", "piqa", "boolq", "winogrande")}
    assert commonsense_average(ok)["value"] == pytest.approx((4 * 0.6 + 2 * 0.5) / 6)
    partial = {k: v for k, v in ok.items() if k != "boolq"}
    avg = commonsense_average(partial)
    assert avg["value"] is None and avg["missing"] == ["boolq"]


def test_hellaswag_context_capitalises_ctx_b():
    from quantlm.eval.tasks import hellaswag_context

    assert hellaswag_context("Clean and jerk: A lady walks. She bends down. the lady") == \
        "Clean and jerk: A lady walks. She bends down. The lady"
    assert hellaswag_context("Home: How to clean. Do This.") == "Home: How to clean. Do This."
    docs, _ = load_docs(TASKS["hellaswag"], 2)
    assert docs[0].contexts[0].startswith("Roof shingle removal: A man is sitting on a roof. He")


def test_mmlu_from_extra_data_root(tmp_path, monkeypatch, lm):
    folder = tmp_path / "mmlu" / "test"
    folder.mkdir(parents=True)
    rows = "What is 1+1?,1,2,3,4,B\n\"Pick, one\",w,x,y,z,D\nThird?,a,b,c,d,A\n"
    (folder / "college_math_test.csv").write_text(rows)
    (folder / "anatomy_test.csv").write_text(rows)
    monkeypatch.setenv("QUANTLM_EVAL_DATA", str(tmp_path))
    docs, files = load_docs(TASKS["mmlu"], limit=2)
    assert len(docs) == 4 and len(files) == 2  # --limit applies per subject, as in lm-eval
    assert docs[0].contexts[0] == ("The following are multiple choice questions (with answers) about anatomy.\n\n"
                                   "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:")
    assert docs[0].continuations == (" A", " B", " C", " D") and docs[0].gold == 1 and docs[1].gold == 3
    model, tok = lm
    r = evaluate_task(model, tok, "mmlu", limit=1, progress=False)
    assert r["n"] == 2 and r["acc"] in (0.0, 0.5, 1.0)


def test_missing_task_data_is_a_clear_error(tmp_path, monkeypatch):
    import quantlm.eval.datasets as ds

    monkeypatch.setenv("QUANTLM_EVAL_DATA", str(tmp_path))
    monkeypatch.setattr(ds, "data_dir", lambda: tmp_path / "nothing")
    with pytest.raises(QuantlmError, match="QUANTLM_EVAL_DATA"):
        load_docs(TASKS["mmlu"])
    with pytest.raises(QuantlmError, match="arc/arc_easy_test_llmfoundry.jsonl not found"):
        load_docs(TASKS["arc_easy"])
