"""Parity of quantlm's zero-shot scorer with lm-evaluation-harness on the same local data.

Runs lm-eval's own task configurations (prompts copied from its arc_easy, piqa, winogrande and lambada_openai
YAMLs, with ``dataset_path: json`` pointing at quantlm's local files) through lm-eval's HFLM, and quantlm's
``evaluate_task`` on the same model and items; compares every per-request log-likelihood and the metrics.

Needs lm-eval (``pip install quantlm[eval]``; kept out of the core install). Usage:
    python bench/lmeval_parity.py MODEL_DIR [--limit 50] [--max-length N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

WINOGRANDE_UTILS = '''
def doc_to_text(doc):
    return {"1": 0, "2": 1}[doc["answer"]]


def doc_to_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]
'''


def task_yamls(files: dict[str, Path]) -> dict[str, str]:
    mc_metrics = ("metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
                  "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    return {
        "arc_easy_local": (
            f"task: arc_easy_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {files['arc_easy']}\n"
            "output_type: multiple_choice\ntest_split: test\n"
            "doc_to_text: \"{{query}}\\nAnswer:\"\ndoc_to_target: \"{{gold}}\"\ndoc_to_choice: \"{{choices}}\"\n"
            + mc_metrics),
        "winogrande_local": (
            f"task: winogrande_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {files['winogrande']}\n"
            "output_type: multiple_choice\ntest_split: test\n"
            "doc_to_text: !function wg_utils.doc_to_text\ndoc_to_target: !function wg_utils.doc_to_target\n"
            "doc_to_choice: !function wg_utils.doc_to_choice\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"),
        "piqa_local": (  # lm-eval's piqa.yaml prompts; labels joined in from valid-labels.lst
            f"task: piqa_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {files['piqa']}\n"
            "output_type: multiple_choice\ntest_split: test\n"
            "doc_to_text: \"Question: {{goal}}\\nAnswer:\"\ndoc_to_target: label\n"
            "doc_to_choice: \"{{[sol1, sol2]}}\"\n" + mc_metrics),
        "lambada_openai_local": (
            f"task: lambada_openai_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {files['lambada_openai']}\noutput_type: loglikelihood\ntest_split: test\n"
            "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\ndoc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
            "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
            "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"),
    }


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's quantlm, not an installed one
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=None,
                    help="context for both scorers (default: the model's); lm-eval asserts every continuation "
                         "fits, so tiny-context models need more for PIQA")
    args = ap.parse_args()

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from quantlm.eval.tasks import TASKS, load_docs, task_files
    from quantlm.eval.zeroshot import encode_request, evaluate_task, loglikelihoods
    from quantlm.hf_checkpoint import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm(args.model_dir), load_tokenizer(args.model_dir)
    max_length = args.max_length or model.config.max_position_embeddings
    ours_names = {"arc_easy_local": "arc_easy", "piqa_local": "piqa", "winogrande_local": "winogrande",
                  "lambada_openai_local": "lambada_openai"}
    files = {n: task_files(TASKS[n])[0] for n in ours_names.values()}
    with tempfile.TemporaryDirectory() as inc:
        piqa_rows, piqa_labels = task_files(TASKS["piqa"])
        labelled = Path(inc, "piqa_labelled.jsonl")
        labelled.write_text("".join(
            json.dumps({**json.loads(row), "label": int(y)}) + "\n"
            for row, y in zip(piqa_rows.read_text().splitlines(), piqa_labels.read_text().split(), strict=True)))
        files["piqa"] = labelled
        for name, text in task_yamls(files).items():
            Path(inc, f"{name}.yaml").write_text(text)
        Path(inc, "wg_utils.py").write_text(WINOGRANDE_UTILS)
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size, max_length=max_length)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(ours_names), limit=args.limit, log_samples=True,
                                      task_manager=TaskManager(include_path=inc), bootstrap_iters=0)
    report = {"lm_eval": getattr(lm_eval, "__version__", "?"), "limit": args.limit, "max_length": max_length,
              "tasks": {}}
    worst = 0.0
    for theirs, ours in ours_names.items():
        mine = evaluate_task(model, tok, ours, limit=args.limit, batch_size=args.batch_size,
                             max_length=max_length, progress=False)
        docs, _ = load_docs(TASKS[ours], args.limit)
        reqs = [(c, k) for d in docs for c, k in zip(d.contexts, d.continuations, strict=True)]
        my_ll = loglikelihoods(model, tok, reqs, max_length=max_length, progress=False)
        # each sample's "resps" holds one [(loglik, is_greedy)] per request, in request order
        their_ll = [float(r[0][0]) for sample in out["samples"][theirs] for r in sample["resps"]]
        diff = max(abs(a - b.ll) for a, b in zip(their_ll, my_ll, strict=True))
        same_split = all(encode_request(tok, c, k)[1] for c, k in reqs)
        worst = max(worst, diff)
        res = out["results"][theirs]
        report["tasks"][ours] = {
            "lm_eval": {k.split(",")[0]: v for k, v in res.items() if k.split(",")[0] in ("acc", "acc_norm", "perplexity")},
            "quantlm": {k: mine[k] for k in ("acc", "acc_norm", "ppl") if k in mine},
            "requests": len(reqs), "max_abs_loglik_diff": diff, "nonempty_continuations": same_split,
        }
    print(json.dumps(report, indent=2))
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
