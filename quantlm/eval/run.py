"""One evaluation of one model: perplexity + zero-shot per an :class:`EvalRecipe`, as one result record.

Everything that can be checked before the model runs is checked first (model directory, window against the
model context, data files, task names), and the record is written only after every metric is computed, so
bad input never leaves a partial record behind.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

from quantlm.errors import QuantlmError
from quantlm.eval.datasets import load_text_source
from quantlm.eval.perplexity import perplexity, resolve_window
from quantlm.eval.recipe import EvalRecipe
from quantlm.eval.records import SCHEMA, new_record_id, write_record
from quantlm.eval.tasks import TASKS, expand_tasks, task_files
from quantlm.eval.zeroshot import commonsense_average, zeroshot

log = logging.getLogger(__name__)


def library_versions() -> dict:
    import tokenizers
    import torch
    import transformers

    import quantlm

    return {"quantlm": quantlm.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "python": platform.python_version()}


def device_description(device: str) -> str:
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"{device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _quantize_record(model_dir: Path) -> dict:
    """``quantlm.json`` as ``quantlm quantize`` wrote it beside an export, or {}."""
    qfile = model_dir / "quantlm.json"
    if qfile.is_file():
        try:
            meta = json.loads(qfile.read_text(encoding="utf-8"))
            return meta if isinstance(meta, dict) else {}
        except json.JSONDecodeError:
            return {}
    return {}


def identify(config: dict, meta: dict) -> dict:
    """Family and nominal bits of a checkpoint from what it records about itself: its config.json and the
    ``quantlm.json`` a quantization writes (``meta``, {} when there is none)."""
    from quantlm.checkpoint import is_trilm

    recipe_bits = (meta.get("recipe") or {}).get("bits")
    qbits = meta.get("bits") or recipe_bits or (config.get("quantization_config") or {}).get("bits")
    # a quantization record beats config.json, which an unpacked export inherits from its FloatLM
    family = meta.get("family") or ("quantlm" if recipe_bits else None) or config.get("quantlm_family")
    if family is None:
        family = "trilm" if is_trilm(config) else "quantlm" if qbits else "floatlm"
    family = str(family).lower()
    bits = {"floatlm": 16, "trilm": 1.58}.get(family, qbits)
    return {"family": family, "bits": bits, "preset": meta.get("preset") or config.get("quantlm_preset")}


def accounted_sizes(model_dir: Path, meta: dict) -> dict:
    """``sizes`` (total bits per accounting convention) and ``size_layout`` for the record.

    An export with a quantization record counts as deployed, packed (its ``accounting.packed``), even when the
    evaluated files are the dequantized fp16 ones; any other checkpoint counts as stored.
    """
    from quantlm import accounting

    packed = (meta.get("accounting") or {}).get("packed")
    if isinstance(packed, dict) and all(c in packed for c in accounting.CONVENTIONS):
        return {"sizes": {c: float(packed[c]) for c in accounting.CONVENTIONS}, "size_layout": packed.get("layout")}
    try:
        b = accounting.budget(model_dir)
        return {"sizes": {c: float(b.total_bits(c)) for c in accounting.CONVENTIONS}, "size_layout": b.layout}
    except Exception as e:  # noqa: BLE001 - sizes are optional; a failing accountant must not stop the eval
        log.warning("size accounting skipped for %s: %s: %s", model_dir, type(e).__name__, e)
    return {}


def _preflight(model_dir: Path, recipe: EvalRecipe) -> tuple[dict, list, list[str]]:
    """Check the model directory, window and data before any model weights are loaded."""
    from quantlm.checkpoint import block_map_for, read_config

    if not model_dir.is_dir():
        raise QuantlmError(f"model directory {model_dir} does not exist; pass a Hugging Face checkpoint directory")
    config = read_config(model_dir)
    archs = config.get("architectures") or []
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise QuantlmError(f"{model_dir}: architecture {archs} is not a causal LM; pass a *ForCausalLM checkpoint")
    block_map_for(config, str(model_dir))
    if recipe.window is not None:
        ctx = config.get("max_position_embeddings")
        if ctx is not None and recipe.window > ctx:
            raise QuantlmError(f"window={recipe.window} is longer than the model context ({ctx} tokens); "
                               f"pass --window {min(ctx, 2048)} or less")
    sources = [load_text_source(name) for name in recipe.ppl]
    tasks = expand_tasks(recipe.tasks)
    for t in tasks:
        if t in TASKS:
            task_files(TASKS[t])
    return config, sources, tasks


def evaluate_loaded(model, tokenizer, recipe: EvalRecipe, *, model_name: str, sources=None, tasks=None,
                    results_dir: str | os.PathLike | None = None, extra: dict | None = None,
                    device: str = "cpu", progress: bool = True) -> dict:
    """Evaluate an already-loaded causal LM (e.g. from a packed-format loader) and build its record."""
    start = time.perf_counter()
    sources = sources if sources is not None else [load_text_source(n) for n in recipe.ppl]
    tasks = tasks if tasks is not None else expand_tasks(recipe.tasks)
    window = resolve_window(model, recipe.window)
    metrics: dict = {}
    for src in sources:
        metrics[src.name] = perplexity(model, tokenizer, src, window=window, batch_size=recipe.ppl_batch_size,
                                       limit_windows=recipe.ppl_limit_windows, progress=progress)
    if tasks:
        metrics.update(zeroshot(model, tokenizer, tasks, limit=recipe.limit, batch_size=recipe.batch_size,
                                progress=progress))
        metrics["commonsense_avg"] = commonsense_average(metrics)
    from quantlm.recipes import to_dict

    record = {
        "schema": SCHEMA, "id": new_record_id(), "created": datetime.now(timezone.utc).isoformat(),
        "model": model_name, "model_dir": None, "family": None, "preset": None, "bits": None,
        "params": int(sum(p.numel() for p in model.parameters())), "seed": None, "sizes": {},
        "metrics": metrics, "recipe": to_dict(recipe), "versions": library_versions(),
        "device": device_description(device), "wall_time_s": None,
    }
    record.update(extra or {})
    record["wall_time_s"] = round(time.perf_counter() - start, 3)
    if results_dir is not None:
        record["path"] = str(write_record(record, results_dir))
    return record


def evaluate(model_dir: str | os.PathLike, recipe: EvalRecipe, *, results_dir: str | os.PathLike | None = None,
             extra: dict | None = None, device: str = "cpu", progress: bool = True, loader=None) -> dict:
    """Evaluate a checkpoint directory per ``recipe``; the record is returned and, with ``results_dir``,
    written there. ``extra`` (family, preset, bits, seed, sizes, ...) overrides what is inferred.
    ``loader(model_dir, dtype=, device=)`` loads formats transformers cannot (packed QuantLM/TriLM)."""
    import torch

    from quantlm.checkpoint import load_causal_lm, load_tokenizer

    model_dir = Path(model_dir)
    config, sources, tasks = _preflight(model_dir, recipe)
    start = time.perf_counter()
    tokenizer = load_tokenizer(model_dir)
    model = (loader or load_causal_lm)(model_dir, dtype=getattr(torch, recipe.dtype), device=device)
    meta = _quantize_record(model_dir)
    info = {"model_dir": str(model_dir.resolve()), **identify(config, meta), **accounted_sizes(model_dir, meta)}
    record = evaluate_loaded(model, tokenizer, recipe, model_name=model_dir.name, sources=sources, tasks=tasks,
                             extra={**info, **(extra or {})}, device=device, progress=progress)
    record["wall_time_s"] = round(time.perf_counter() - start, 3)  # model loading included
    if results_dir is not None:
        record["path"] = str(write_record(record, results_dir))
    return record
