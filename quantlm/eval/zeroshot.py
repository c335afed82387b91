"""Zero-shot scoring by the log-likelihood protocol of lm-evaluation-harness, run in-process on local data.

Why our own ~150 lines and not lm-eval itself: the local data copies are not in the hub schemas lm-eval's
task YAMLs expect (ARC/BoolQ/LogiQA come re-formatted, HellaSwag as text), so every task would need custom
Python adapters anyway; lm-eval pulls ~30 extra packages, and it cannot score an already-loaded torch module
from quantlm's packed loaders without a wrapper. The protocol is small and is reproduced here exactly:

- a request (context, continuation) is tokenized as lm-eval's HFLM does: trailing spaces of the context move
  to the continuation, ``whole = enc(context + continuation)``, ``ctx = enc(context)``, the continuation
  tokens are ``whole[len(ctx):]``, no special tokens; an empty context is replaced by the EOS token;
- the input is the last ``max_length + 1`` tokens minus the final one; the score is the summed log-prob of
  the continuation tokens, and ``is_greedy`` says whether each was the argmax;
- acc = [argmax_i ll_i == gold]; acc_norm = [argmax_i ll_i / len(choice_i in characters) == gold];
  stderr = sample standard deviation / sqrt(n); lambada: acc = is_greedy, ppl = exp(-mean ll).
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

from quantlm.errors import QuantlmError
from quantlm.eval.perplexity import device_of, logits_of
from quantlm.eval.tasks import COMMONSENSE, TASKS, UNAVAILABLE, Doc, expand_tasks, load_docs

log = logging.getLogger(__name__)

PROTOCOL = "lm-eval log-likelihood (0-shot, target delimiter ' ', acc_norm by choice length in characters)"


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_request(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split the way lm-eval's HFLM splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        return [tokenizer.eos_token_id], _encode(tokenizer, continuation)
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return whole[: len(ctx)], whole[len(ctx):]


class LogLik(NamedTuple):
    """Score of one request: summed log-prob of the continuation and whether every token was the argmax."""

    ll: float
    greedy: bool
    truncated: bool  # continuation longer than the model context: only its last max_length tokens scored


def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], *, max_length: int,
                   batch_size: int = 8, progress: bool = True) -> list[LogLik]:
    """A :class:`LogLik` for each (context, continuation) request.

    A continuation longer than ``max_length`` (only seen with tiny-context models) cannot fit in one window;
    its last ``max_length`` tokens are scored and the request is flagged ``truncated`` (lm-eval fails there).

    Batches right-pad with token 0: causal attention never lets a real token see a later pad, so padded
    and unpadded scores agree. Requests run longest first (less padding) and come back in input order.
    """
    import torch
    from tqdm.auto import tqdm

    encoded = []
    for ctx, cont in requests:
        c, k = encode_request(tokenizer, ctx, cont)
        if not k:
            raise QuantlmError(f"continuation {cont!r} encodes to no tokens; the task data is malformed")
        full = (c + k)[-(max_length + 1):]
        encoded.append((full[:-1], k[-max_length:], len(k) > max_length))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    device = device_of(model)
    out: list[LogLik | None] = [None] * len(encoded)
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc="loglikelihood", unit="batch",
                          disable=not progress, leave=False):
            idx = order[start: start + batch_size]
            width = len(encoded[idx[0]][0])
            batch = torch.zeros(len(idx), width, dtype=torch.long)
            for row, i in enumerate(idx):
                inp = encoded[i][0]
                batch[row, : len(inp)] = torch.tensor(inp)
            logits = logits_of(model, batch.to(device))  # (B, T, V)
            for row, i in enumerate(idx):
                inp, cont, truncated = encoded[i]
                n = len(cont)
                # only the n positions predicting the continuation: a full (B, T, V) fp32 copy is GBs
                lp = torch.log_softmax(logits[row, len(inp) - n: len(inp)].float(), dim=-1).cpu()
                target = torch.tensor(cont)
                ll = float(lp.gather(1, target[:, None]).sum().double())
                out[i] = LogLik(ll, bool((lp.argmax(-1) == target).all()), truncated)
    return out  # type: ignore[return-value]


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def score_docs(docs: list[Doc], lls: list[LogLik], kind: str) -> dict:
    """acc / acc_norm (multiple choice) or acc / ppl (lambada) from per-request log-likelihoods."""
    if kind == "lambada":
        acc, acc_se = _mean_stderr([float(r.greedy) for r in lls])
        mean_ll = sum(r.ll for r in lls) / len(lls)
        return {"acc": acc, "acc_stderr": acc_se, "ppl": math.exp(-mean_ll)}
    accs, norms, pos = [], [], 0
    for d in docs:
        scores = [r.ll for r in lls[pos: pos + len(d.choices)]]
        pos += len(d.choices)
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # first maximum, as numpy.argmax
        normed = [s / len(c) for s, c in zip(scores, d.choices, strict=True)]
        best_norm = max(range(len(normed)), key=lambda i: (normed[i], -i))
        accs.append(float(best == d.gold))
        norms.append(float(best_norm == d.gold))
    acc, acc_se = _mean_stderr(accs)
    norm, norm_se = _mean_stderr(norms)
    return {"acc": acc, "acc_stderr": acc_se, "acc_norm": norm, "acc_norm_stderr": norm_se}


def evaluate_task(model, tokenizer, name: str, *, limit: int | None = None, batch_size: int = 8,
                  max_length: int = 2048, progress: bool = True) -> dict:
    """Score one task; an unavailable task returns ``{"status": "unavailable", "reason": ...}``, no numbers."""
    if name in UNAVAILABLE:
        return {"status": "unavailable", "reason": UNAVAILABLE[name].reason}
    if name not in TASKS:
        expand_tasks([name])  # raises the unknown-task error with the list of known names
    task = TASKS[name]
    docs, files = load_docs(task, limit)
    requests = [(c, k) for d in docs for c, k in zip(d.contexts, d.continuations, strict=True)]
    log.info("%s: %d items, %d requests", name, len(docs), len(requests))
    lls = loglikelihoods(model, tokenizer, requests, max_length=max_length, batch_size=batch_size,
                         progress=progress)
    scored = score_docs(docs, lls, task.kind)
    # report what lm-eval reports for the task (e.g. BoolQ and WinoGrande: acc only)
    metrics = {k: v for k, v in scored.items() if k.removesuffix("_stderr") in task.metrics}
    truncated = sum(r.truncated for r in lls)
    if truncated:
        log.warning("%s: %d continuations longer than the context (%d tokens) scored on their last tokens only",
                    name, truncated, max_length)
    return {"status": "ok", **metrics, "n": len(docs), "limit": limit, "split": task.split,
            "requests": len(requests), "truncated_requests": truncated, "max_length": max_length,
            "headline": task.metrics[0], "files": files, "protocol": PROTOCOL}


def commonsense_average(results: dict) -> dict:
    """Spectra's commonsense average; ``value`` is None (with the missing tasks named) unless all six ran."""
    missing = [t for t in COMMONSENSE if results.get(t, {}).get("status") != "ok"]
    if missing:
        return {"value": None, "missing": missing, "definition": COMMONSENSE}
    value = sum(results[t][m] for t, m in COMMONSENSE.items()) / len(COMMONSENSE)
    return {"value": value, "missing": [], "definition": COMMONSENSE}


def zeroshot(model, tokenizer, tasks, *, limit: int | None = None, batch_size: int = 8,
             max_length: int | None = None, progress: bool = True) -> dict:
    """Run ``tasks`` (names or aliases); returns ``{task: metrics}``."""
    if limit is not None and limit < 1:
        raise QuantlmError(f"limit={limit} must be at least 1")
    names = expand_tasks(tasks)
    if max_length is None:  # as lm-eval's HFLM: the model's context, else 2048
        ctx = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        max_length = int(ctx) if ctx else 2048
    return {n: evaluate_task(model, tokenizer, n, limit=limit, batch_size=batch_size, max_length=max_length,
                             progress=progress) for n in names}
