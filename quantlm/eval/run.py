"""One evaluation of one model: perplexity + zero-shot per an :class:`EvalRecipe`, as one result record.

Everything that can be checked before the model runs is checked first (model directory, window against the
model context, data files, task names), and the record is written only after every metric is computed, so
bad input never leaves a partial record behind.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

from quantlm import accounting, validate
from quantlm.accounting import checkpoint_layout
from quantlm.errors import QuantlmError
from quantlm.eval.datasets import load_text_source
from quantlm.eval.perplexity import perplexity, resolve_window
from quantlm.eval.recipe import EvalRecipe
from quantlm.eval.records import SCHEMA, new_record_id, write_record
from quantlm.eval.tasks import TASKS, UNAVAILABLE, expand_tasks, task_files
from quantlm.eval.zeroshot import commonsense_average, zeroshot
from quantlm.formats.gguf import GGUF_FILE
from quantlm.formats.loader import load_model
from quantlm.hf_checkpoint import block_map_for, load_tokenizer, read_config
from quantlm.metadata import model_label, read_meta
from quantlm.outputs import check_dir_writable
from quantlm.recipes import to_dict
from quantlm.versions import library_versions

log = logging.getLogger(__name__)


def device_description(device: str) -> str:
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"{device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def identify(model_dir: Path, config: dict) -> dict:
    """What a checkpoint is, from what it records about itself: ``quantlm.json`` when quantlm wrote it, else its
    config.json (one rule for ``size`` and ``eval``: both go through ``accounting.checkpoint_layout``)."""
    layout = checkpoint_layout(model_dir, config)
    meta = read_meta(model_dir)
    info = {"family": layout.family, "format": layout.format,
            "bits": {"floatlm": 16, "trilm": 1.58}.get(layout.family, layout.bits),
            "group_size": layout.group_size if layout.family == "quantlm" else None,
            "preset": config.get("quantlm_preset"), "model": model_label(model_dir, meta)}
    if meta is not None:
        info.update({k: v for k, v in meta.identity().items() if v is not None and k not in ("family", "bits")})
    return info


def deployed_sizes(model_dir: Path, config: dict) -> dict:
    """``sizes`` (total bits per convention) and ``size_layout``: the model as deployed (QuantLM packed in the
    compressed-tensors layout, TriLM at 1.6 bits per weight, FloatLM in fp16), whatever its files store."""
    b = accounting.deployed_budget(model_dir, accounting.checkpoint_layout(model_dir, config))
    return {"sizes": {c: float(b.total_bits(c)) for c in accounting.CONVENTIONS}, "size_layout": b.layout}


def _preflight(model_dir: Path, recipe: EvalRecipe) -> tuple[dict, list, list[str]]:
    """Check the model directory, window and data before any model weights are loaded."""
    gguf = model_dir.suffix == ".gguf" or ((model_dir / GGUF_FILE).is_file() and not (model_dir / "config.json").exists())
    if gguf:
        raise QuantlmError(f"{model_dir} is a GGUF {'file' if model_dir.is_file() else 'export'}; quantlm eval takes a "
                           "Hugging Face checkpoint directory (config.json and safetensors weights): evaluate the "
                           "checkpoint the GGUF was exported from, or write one with `quantlm quantize --format "
                           "unpacked` / `quantlm export MODEL --format unpacked` (llama.cpp speed: `quantlm bench`)")
    if model_dir.is_file():
        raise QuantlmError(f"{model_dir} is a file; quantlm eval takes a Hugging Face checkpoint directory "
                           "(config.json and safetensors weights)")
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
    tasks = expand_tasks(recipe.tasks)
    for t in recipe.tasks:  # named on their own (an alias such as spectra records them as unavailable)
        if t in UNAVAILABLE:
            raise QuantlmError(f"task {t} cannot run: {UNAVAILABLE[t].reason}; drop {t} from --tasks")
    sources = [load_text_source(name) for name in recipe.ppl]
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
             extra: dict | None = None, device: str = "cpu", progress: bool = True) -> dict:
    """Evaluate a checkpoint directory per ``recipe``; the record is returned and, with ``results_dir``,
    written there. ``extra`` (family, preset, bits, seed, ...) overrides what the checkpoint says about itself.
    Any format quantlm reads (unpacked, gptq, compressed-tensors, packed ternary) loads through quantlm's own
    loader, so no optional library is needed."""
    import torch


    model_dir = Path(model_dir)
    validate.check_device(device)
    config, sources, tasks = _preflight(model_dir, recipe)
    validate.check_model(model_dir, config=config, seqlen=recipe.window, seqlen_flag="--window")
    if results_dir is not None:
        check_dir_writable(results_dir, "--results")
    start = time.perf_counter()
    info = {"model_dir": str(model_dir.resolve()), **identify(model_dir, config), **deployed_sizes(model_dir, config)}
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=getattr(torch, recipe.dtype), device=device)
    info = {**info, **(extra or {})}
    record = evaluate_loaded(model, tokenizer, recipe, model_name=info.pop("model"), sources=sources, tasks=tasks,
                             extra=info, device=device, progress=progress)
    record["wall_time_s"] = round(time.perf_counter() - start, 3)  # model loading included
    if results_dir is not None:
        record["path"] = str(write_record(record, results_dir))
    return record
