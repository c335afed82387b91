"""``quantize_model``: checkpoint directory in, quantized checkpoints (every requested format) out."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from pathlib import Path

from quantlm.errors import QuantlmError
from quantlm.recipes import QuantRecipe, to_dict

log = logging.getLogger(__name__)

REPORT_NAME = "report.json"


def _writers():
    from quantlm.formats.compressed_tensors import write_compressed_tensors
    from quantlm.formats.gptq import write_gptq
    from quantlm.formats.unpacked import write_unpacked

    return {"unpacked": write_unpacked, "gptq": write_gptq, "compressed-tensors": write_compressed_tensors}


def versions() -> dict:
    import torch
    import transformers

    from quantlm import __version__

    return {"quantlm": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def validate_request(model_dir: Path, recipe: QuantRecipe, out_dir: Path, overwrite: bool,
                     device: str = "cpu") -> dict:
    """Every check that needs no compute, so bad input fails in a second with nothing written."""
    from quantlm.checkpoint import block_map_for, read_config
    from quantlm.formats.common import check_format_bits

    config = read_config(model_dir)
    block_map_for(config, str(model_dir))
    if not recipe.formats:
        raise QuantlmError("no export format given; use --format unpacked,gptq,compressed-tensors")
    for fmt in recipe.formats:
        check_format_bits(fmt, recipe.bits)
    if len(set(recipe.formats)) != len(recipe.formats):
        raise QuantlmError(f"format listed twice in {','.join(recipe.formats)}; name each format once")
    if out_dir.exists() and not overwrite:
        raise QuantlmError(f"output directory {out_dir} already exists; choose another --out or pass --overwrite")
    if out_dir.resolve() == model_dir.resolve():
        raise QuantlmError(f"output directory {out_dir} is the model directory; choose another --out")
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise QuantlmError("--device cuda requested but no CUDA GPU is visible; use --device cpu")
    _check_group_size(model_dir, block_map_for(config, str(model_dir)), recipe.group_size)
    return config


def _check_group_size(model_dir: Path, block_map, group_size: int) -> None:
    """Group size against every block linear's input width, from the safetensors headers (no tensor read)."""
    if group_size == -1:
        return
    from safetensors import safe_open

    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                if key.endswith(".weight") and block_map.block_linear_of(key):
                    width = st.get_slice(key).get_shape()[-1]
                    if width % group_size:
                        raise QuantlmError(
                            f"group size {group_size} does not divide the input width {width} of "
                            f"{key[: -len('.weight')]}; choose a divisor of every layer's input width or "
                            "--group-size -1 (per channel)")


@contextlib.contextmanager
def _quiet_transformers():
    """No transformers loading bars: the per-block bar is quantlm's progress, and errors stay one line."""
    import transformers.utils.logging as tlog

    was = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tlog.enable_progress_bar()


def quantize_model(model_dir: str | os.PathLike, recipe: QuantRecipe, out_dir: str | os.PathLike, *,
                   seed: int = 0, device: str = "cpu", overwrite: bool = False, rtn: bool = False,
                   progress: bool = True) -> dict:
    """Quantize the LLaMA-like checkpoint in ``model_dir`` with ``recipe``; write ``recipe.formats`` to ``out_dir``.

    Each format goes to ``out_dir/<format>/`` (a complete checkpoint directory with the tokenizer and a
    ``quantlm.json``); ``out_dir/report.json`` holds the report returned here (per-module losses and times,
    total time, paths). ``seed`` picks the calibration windows; ``rtn`` gives the round-to-nearest baseline
    through the same export path. The whole ``out_dir`` appears atomically, or not at all.
    """
    import torch

    from quantlm.atomic import output_dir, write_json
    from quantlm.calibration import calibration_tokens, default_calibration_path
    from quantlm.checkpoint import block_map_for, load_causal_lm, load_tokenizer
    from quantlm.formats.common import stored_linear
    from quantlm.gptq.pipeline import check_quantizable, quantize_blocks

    t0 = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = validate_request(model_dir, recipe, out_dir, overwrite, device)
    block_map = block_map_for(config, str(model_dir))
    with _quiet_transformers():
        tokenizer = load_tokenizer(model_dir)
        calib_source = recipe.calibration or str(default_calibration_path())
        tokens = calibration_tokens(tokenizer, recipe.calibration or None, recipe.nsamples, recipe.seqlen, seed)
        model = load_causal_lm(model_dir, dtype=torch.float32)
    check_quantizable(model, block_map, recipe)
    t_load = time.perf_counter() - t0

    run = quantize_blocks(model, block_map, tokens, recipe, device=device, rtn=rtn, progress=progress)
    linears = {name: stored_linear(name, res) for name, res in run.results.items()}
    meta = {
        "method": "rtn" if rtn else "gptq",
        "recipe": to_dict(recipe),
        "seed": seed,
        "calibration": {"source": calib_source, "nsamples": recipe.nsamples, "seqlen": recipe.seqlen,
                        "tokens": int(tokens.numel())},
        "source_model": str(model_dir.resolve()),
        "device": device,
        "modules": [m.to_dict() for m in run.modules],
        "versions": versions(),
    }
    writers = _writers()
    t1 = time.perf_counter()
    paths = {}
    with output_dir(out_dir, overwrite=overwrite) as tmp:
        for fmt in recipe.formats:
            writers[fmt](tmp / fmt, model, linears, meta, model_dir)
            paths[fmt] = str(out_dir / fmt)
        t_write = time.perf_counter() - t1
        report = {
            **{k: meta[k] for k in ("method", "recipe", "seed", "calibration", "source_model", "device",
                                    "versions")},
            "modules": meta["modules"],
            "total_loss": float(sum(m.loss for m in run.modules)),
            "total_error": float(sum(m.error for m in run.modules)),
            "seconds": {"load": t_load, "quantize": run.seconds, "write": t_write,
                        "total": time.perf_counter() - t0},
            "paths": paths,
            "out_dir": str(out_dir),
        }
        write_json(tmp / REPORT_NAME, report)
    log.info("quantized %d modules in %.1fs (%s), wrote %s", len(linears), run.seconds, report["method"],
             ", ".join(paths.values()))
    return report
