"""What an evaluation runs: perplexity corpora, zero-shot tasks, window, limits, batch sizes (``kind: eval``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from quantlm.errors import QuantlmError
from quantlm.eval.tasks import expand_tasks
from quantlm.recipes import doc


@dataclass(frozen=True)
class EvalRecipe:
    """An evaluation of one model: perplexity on local corpora and zero-shot tasks on local data."""

    ppl: tuple[str, ...] = doc("perplexity corpora: wikitext2, ptb, c4, lambada, or paths of .txt/.jsonl files "
                               "(the command line runs none when --tasks is given without --ppl)", ("wikitext2",))
    tasks: tuple[str, ...] = doc("zero-shot tasks or aliases (commonsense, spectra); empty for none", ())
    window: int | None = doc("perplexity window in tokens; null = the model context capped at 2048", None)
    limit: int | None = doc("zero-shot: score only the first N items of each task (quick runs)", None)
    ppl_limit_windows: int | None = doc("perplexity: score only the first N windows of each corpus", None)
    batch_size: int = doc("zero-shot requests per forward pass", 8)
    ppl_batch_size: int = doc("perplexity windows per forward pass", 1)
    dtype: Literal["float32", "bfloat16", "float16"] = doc("dtype the model is loaded in", "float32")

    def __post_init__(self):
        if not self.ppl and not self.tasks:
            raise QuantlmError("the evaluation has neither perplexity corpora nor tasks; pass --ppl or --tasks")
        expand_tasks(self.tasks)
        for name, value in (("window", self.window), ("limit", self.limit),
                            ("ppl_limit_windows", self.ppl_limit_windows)):
            if value is not None and value < 1:
                raise QuantlmError(f"{name}={value} must be a positive integer (or null for no limit)")
        if self.window is not None and self.window < 2:
            raise QuantlmError(f"window={self.window}: a perplexity window needs at least 2 tokens")
        if self.batch_size < 1 or self.ppl_batch_size < 1:
            raise QuantlmError("batch sizes must be at least 1")
