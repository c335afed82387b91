"""Perplexity by the standard protocol: concatenate the corpus, tokenize it once, cut it into non-overlapping
windows of ``window`` tokens (the trailing remainder shorter than a window is dropped, as GPTQ does), and
average the next-token negative log-likelihood over every predicted token (``window - 1`` per window: the
first token of a window has no context). ppl = exp(mean NLL).

Works with any causal LM that maps ``input_ids`` (B, T) to ``.logits`` (B, T, V): a transformers model
loaded from a directory, or a torch module from one of quantlm's packed-format loaders.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from quantlm.errors import QuantlmError
from quantlm.eval.datasets import TextSource, load_text_source

log = logging.getLogger(__name__)

MAX_DEFAULT_WINDOW = 2048
PROTOCOL = ("concatenate, tokenize once (tokenizer defaults), non-overlapping windows (stride = window), "
            "remainder dropped, mean NLL over window-1 predicted tokens per window")


def model_context(model) -> int | None:
    """The context length a model was built for (``max_position_embeddings``), if its config says."""
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) if config is not None else None


def resolve_window(model, window: int | None) -> int:
    """The requested window, checked against the model context; by default the context capped at 2048."""
    ctx = model_context(model)
    if window is None:
        if ctx is None:
            raise QuantlmError("the model config has no max_position_embeddings; pass --window explicitly")
        return min(int(ctx), MAX_DEFAULT_WINDOW)
    if window < 2:
        raise QuantlmError(f"window={window}: a perplexity window needs at least 2 tokens")
    if ctx is not None and window > ctx:
        raise QuantlmError(f"window={window} is longer than the model context ({ctx} tokens); "
                           f"pass --window {min(ctx, MAX_DEFAULT_WINDOW)} or less")
    return window


def _as_source(data: str | os.PathLike | TextSource) -> TextSource:
    """A TextSource from a dataset name, a file path, or a raw string of text."""
    if isinstance(data, TextSource):
        return data
    if isinstance(data, Path):
        return load_text_source(data)
    text = str(data)
    looks_like_path = "\n" not in text and len(text) < 4096 and (
        os.sep in text or Path(text).suffix in (".txt", ".raw", ".jsonl", ".json"))
    if looks_like_path or os.path.exists(text) or text.isidentifier():
        return load_text_source(text)
    return TextSource.from_text(text)


def logits_of(model, input_ids):
    """(B, T, V) logits of a transformers model (``.logits``) or of a module that returns the tensor itself."""
    out = model(input_ids=input_ids)
    return out.logits if hasattr(out, "logits") else out


def device_of(model):
    import torch

    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def perplexity(model, tokenizer, data: str | os.PathLike | TextSource, *, window: int | None = None,
               batch_size: int = 1, limit_windows: int | None = None, progress: bool = True) -> dict:
    """Perplexity of ``model`` on ``data`` (a dataset name, a file path, raw text or a :class:`TextSource`).

    Returns a dict with ``ppl``, ``nll`` (mean, nats/token), ``tokens`` (predicted tokens scored),
    ``window``, ``stride``, ``windows``, ``corpus_tokens``, ``dropped_tokens`` and the dataset's
    name/path/sha256. ``limit_windows`` scores only the first N windows (quick checks).
    """
    import torch
    from tqdm.auto import tqdm

    source = _as_source(data)
    window = resolve_window(model, window)
    if batch_size < 1:
        raise QuantlmError(f"batch_size={batch_size} must be at least 1")
    if limit_windows is not None and limit_windows < 1:
        raise QuantlmError(f"limit_windows={limit_windows} must be at least 1")
    ids = tokenizer(source.text, return_tensors="pt")["input_ids"][0]
    n_windows = ids.numel() // window
    if n_windows == 0:
        raise QuantlmError(f"dataset {source.name!r} has {ids.numel()} tokens, fewer than one window of "
                           f"{window}; pass a smaller --window or a longer text")
    used = n_windows if limit_windows is None else min(n_windows, limit_windows)
    windows = ids[: used * window].view(used, window)
    device = device_of(model)
    log.info("perplexity on %s: %d tokens, %d windows of %d", source.name, ids.numel(), used, window)

    nll_sum = 0.0  # float64 accumulator: the sum over up to millions of tokens
    with torch.inference_mode():
        for start in tqdm(range(0, used, batch_size), desc=f"ppl {source.name}", unit="batch",
                          disable=not progress, leave=False):
            batch = windows[start: start + batch_size].to(device)
            logits = logits_of(model, batch)  # (B, T, V)
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            nll_sum += float(nll.double())
    tokens = used * (window - 1)
    mean_nll = nll_sum / tokens
    return {
        "ppl": math.exp(mean_nll), "nll": mean_nll, "tokens": tokens, "window": window, "stride": window,
        "windows": used, "corpus_tokens": int(ids.numel()), "dropped_tokens": int(ids.numel() - n_windows * window),
        "limited": used < n_windows, "dataset": source.describe(), "protocol": PROTOCOL,
    }
