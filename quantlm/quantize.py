"""The quantize job: checkpoint directory in, quantized checkpoints (every requested format) out.

Orchestration only: load the model and tokenizer, draw calibration windows, run the GPTQ block pipeline
(``quantlm.gptq``), write each format through the registry (``quantlm.formats``), report.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from quantlm import validate
from quantlm.accounting import budget_from_spec
from quantlm.atomic import write_json
from quantlm.calibration import CalibrationSettings, calibration_tokens
from quantlm.checkpoint_writer import dense_state_dict, write_checkpoint, written_changes
from quantlm.errors import QuantlmError
from quantlm.formats.registry import Layout, checkpoint_spec, formats_for, get_format
from quantlm.gptq.memory import MemorySettings, default_offload_dir, plan_for_checkpoint, size_text
from quantlm.gptq.pipeline import offload_disk_available, quantize_blocks
from quantlm.gptq.settings import GPTQSettings
from quantlm.hf_checkpoint import load_causal_lm, load_tokenizer, read_config
from quantlm.metadata import ModelMeta
from quantlm.outputs import check_output, output_dir
from quantlm.progress import quiet_library_bars
from quantlm.quantized import check_group_size
from quantlm.recipes import doc, to_dict
from quantlm.specs import ModelSpec, spectra_group_size
from quantlm.versions import library_versions

log = logging.getLogger(__name__)

REPORT_NAME = "report.json"


@dataclass(frozen=True)
class ExportSettings:
    """Which storage formats a quantization is written in (one folder each under OUT)."""

    formats: tuple[str, ...] = doc("export formats: unpacked, gptq, compressed-tensors, gguf", ("unpacked",))
    gguf_type: str = doc("gguf: ggml type of the block linears (empty: the smallest exact one: Q4_0 for <= 4 bits, "
                         "Q5_0, Q8_0, or Q6_K/Q3_K/Q2_K per channel)", "")
    kquant_grouped: bool = doc("gguf: allow Q6_K/Q3_K/Q2_K for grouped codes (re-quantizes the group scales; the "
                               "largest changes are reported)", False)

    def __post_init__(self):
        known = formats_for("quantlm")
        if not self.formats:
            raise QuantlmError(f"no export format given; use --formats with some of {', '.join(known)}")
        if len(set(self.formats)) != len(self.formats):
            raise QuantlmError(f"format listed twice in {','.join(self.formats)}; name each format once")
        for f in self.formats:
            if f not in known:
                raise QuantlmError(f"unknown QuantLM format {f!r}; choose from {', '.join(known)}")
        if (self.gguf_type or self.kquant_grouped) and "gguf" not in self.formats:
            raise QuantlmError("gguf_type / kquant_grouped set, but gguf is not among the formats; add --formats gguf")


@dataclass(frozen=True)
class QuantRecipe:
    """How to quantize a FloatLM with GPTQ: the math, the calibration and the export (Spectra, 4 bits, by default)."""

    gptq: GPTQSettings = doc("grid, solver and block order", GPTQSettings())
    calibration: CalibrationSettings = doc("calibration text and windows", CalibrationSettings())
    export: ExportSettings = doc("storage formats written", ExportSettings())
    memory: MemorySettings = doc("where calibration activations live, their dtype, the forward dtype",
                                 MemorySettings())

    def __post_init__(self):
        for f in self.export.formats:
            get_format(f).check(self.layout(f))

    def layout(self, fmt: str):
        g, e = self.gptq, self.export
        # the export settings a format takes as its own options (gguf: gguf_type, kquant_grouped)
        options = {k: getattr(e, k) for k in get_format(fmt).options if hasattr(e, k)}
        return Layout("quantlm", fmt, bits=g.bits, group_size=g.group_size, sym=g.sym, options=options)

    def with_bits(self, bits: int, group_size: int) -> QuantRecipe:
        return replace(self, gptq=replace(self.gptq, bits=bits, group_size=group_size))


SPECTRA_QUANT_RECIPES = {f"quantlm-{b}bit": QuantRecipe(GPTQSettings(bits=b, group_size=spectra_group_size(b)))
                         for b in (3, 4, 6, 8)}


def validate_request(model_dir: Path, recipe: QuantRecipe, out_dir: Path, overwrite: bool,
                     device: str = "cpu") -> tuple[dict, ModelSpec]:
    """Every check that needs no compute, so bad input fails in a second with nothing written: the output
    location (never the input or an ancestor of it, writable, with room for the predicted output), the device,
    and the model (every expected tensor present, finite, within fp16's range; tokenizer and seqlen fit). This is
    the run's one NaN/Inf gate. Returns the config and its spec (architecture, block map, shapes), read once."""
    config, spec = check_recipe(model_dir, recipe)
    check_output(out_dir, overwrite, protect=[model_dir], need_bytes=predicted_output_bytes(spec, recipe))
    check_offload_dir(model_dir, recipe, out_dir, device)
    validate.check_device(device)
    validate.check_model(model_dir, config=config, export_dtype="float16", seqlen=recipe.calibration.seqlen)
    return config, spec


def check_recipe(model_dir: Path, recipe: QuantRecipe) -> tuple[dict, ModelSpec]:
    """The refusals the recipe and config.json alone decide (a suite makes them for every quantize job before its
    first job): an exportable method, a FloatLM, a group size dividing every block linear, formats that can write it."""
    check_exportable(recipe)
    config = read_config(model_dir)
    spec = checkpoint_spec(config, str(model_dir))
    if spec.family != "floatlm":
        raise QuantlmError(f"{model_dir} holds a {spec.family}, not a FloatLM; quantize the FloatLM it came from")
    for rel, (_, in_f) in spec.linear_shapes().items():
        check_group_size(recipe.gptq.group_size, in_f, rel)
    for fmt in recipe.export.formats:
        get_format(fmt).preflight(model_dir, config, recipe.layout(fmt))
    return config, spec


def check_exportable(recipe: QuantRecipe) -> None:
    """GPTQ with act-order but without static groups gives each grouped linear its own group order (an arbitrary
    g_idx) that no export format stores: refused before the first block, not when the results are written."""
    g = recipe.gptq
    if g.method == "gptq" and g.act_order and not g.static_groups and g.group_size != -1:
        raise QuantlmError("act_order without static_groups gives each linear its own group order (an arbitrary "
                           "g_idx), which no export format stores; keep --static-groups (the default), or pass "
                           "--no-act-order or --group-size -1")


def check_offload_dir(model_dir: Path, recipe: QuantRecipe, out_dir: Path, device: str = "cpu") -> None:
    """The folder of disk-offloaded hidden states, before any compute: not a file, not inside ``--out`` (which
    appears only once complete, so the resume state would vanish with a failed run and the folder would be left
    behind), writable, with room for what the plan puts there. Only when offloading to disk may happen."""
    m = recipe.memory
    if m.offload in ("none", "host") or (m.offload == "auto" and not m.offload_dir):
        return  # no disk, or auto's own default folder, which the plan checks when it picks the disk
    raw = Path(m.offload_dir) if m.offload_dir else default_offload_dir("x").parent
    folder, out = (Path(os.path.abspath(p.expanduser())).resolve() for p in (raw, out_dir))
    if folder == out or out in folder.parents:
        raise QuantlmError(f"--offload-dir {raw} is inside --out {out_dir}, which appears only once the run is "
                           f"complete; choose a folder outside it, e.g. --offload-dir {out.parent / (out.name + '-offload')}")
    if folder.exists() and not folder.is_dir():
        raise QuantlmError(f"--offload-dir {raw} is a file, not a folder; name a folder for the disk-offloaded hidden "
                           f"states, e.g. --offload-dir {raw.parent / (raw.name + '-offload')}")
    parent = folder
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise QuantlmError(f"--offload-dir {raw}: {parent} is a file, not a folder; choose another --offload-dir")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QuantlmError(f"--offload-dir {raw} is not writable ({parent} is read-only for this user); choose "
                           "another --offload-dir on a writable disk")
    plan = memory_plan(model_dir, recipe, device)
    if plan.get("hidden_states") == "disk":
        need = int(plan.get("disk_bytes") or 0)
        free = offload_disk_available(folder)  # a kept state counts as free: it is resumed or replaced
        if need and free is not None and free < need * 1.05:
            raise QuantlmError(f"--offload-dir {raw} has {size_text(free)} free on its disk ({parent}), and the "
                               f"disk-offloaded hidden states need about {size_text(need)}; free space there or choose "
                               "another --offload-dir")


def memory_plan(model_dir: str | os.PathLike, recipe: QuantRecipe, device: str = "cpu") -> dict:
    """The memory plan of quantizing ``model_dir`` with ``recipe``, from its config.json alone (``--dry-run``)."""
    check_exportable(recipe)
    g, c = recipe.gptq, recipe.calibration
    return plan_for_checkpoint(model_dir, c.nsamples, c.seqlen, recipe.memory, g.bits, g.group_size, device,
                               true_sequential=g.true_sequential)


def predicted_output_bytes(spec: ModelSpec, recipe: QuantRecipe) -> int:
    """Bytes the export formats will take on disk, predicted from the model's spec + recipe through the registry."""
    spec = spec.with_family("quantlm", recipe.gptq.bits)
    total = 0
    for fmt in recipe.export.formats:
        total += int(budget_from_spec(spec, recipe.layout(fmt), with_reference=False).total_bits("exact") // 8)
    return total


def quantize_model(model_dir: str | os.PathLike, recipe: QuantRecipe, out_dir: str | os.PathLike, *,
                   device: str = "cpu", overwrite: bool = False, progress: bool = True) -> dict:
    """Quantize the LLaMA-like checkpoint in ``model_dir`` with ``recipe``; write its formats to ``out_dir``.

    Each format goes to ``out_dir/<format>/`` (a complete checkpoint directory with the tokenizer and a
    ``quantlm.json``); ``out_dir/report.json`` holds the report returned here (per-module losses and times,
    total time, paths). The recipe's ``gptq.method`` names the quantizer (``rtn``: the round-to-nearest baseline
    through the same export path) and ``gptq.transforms`` the per-block transforms run before it. The whole
    ``out_dir`` appears atomically, or not at all.
    """
    t0 = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _, spec = validate_request(model_dir, recipe, out_dir, overwrite, device)
    block_map = spec.block_map
    cal = recipe.calibration
    with quiet_library_bars():
        tokenizer = load_tokenizer(model_dir)
        tokens = calibration_tokens(tokenizer, cal.data or None, cal.nsamples, cal.seqlen, cal.seed)
        model = load_causal_lm(model_dir, dtype=torch.float32)
    t_load = time.perf_counter() - t0

    run = quantize_blocks(model, block_map, tokens, recipe.gptq, device=device, progress=progress,
                          memory=recipe.memory, weights_checked=True, owner=out_dir)
    linears = {name: res.stored(name) for name, res in run.results.items()}
    dense = dense_state_dict(model, skip=set(linears))
    g = recipe.gptq
    meta = ModelMeta(
        producer="quantize", family="quantlm", format="unpacked", model=model_dir.name,
        source_model=str(model_dir.resolve()), bits=g.bits, group_size=g.group_size, sym=g.sym, seed=cal.seed,
        method=g.method, settings=to_dict(recipe),
        calibration={"source": str(cal.source_path()), "nsamples": cal.nsamples, "seqlen": cal.seqlen,
                     "seed": cal.seed, "tokens": int(tokens.numel())},
        modules=[m.to_dict() for m in run.modules], versions=library_versions(),
        info={"device": device, **({"transforms": run.transforms} if g.transforms else {})})
    hf_config = model.config.to_dict()
    t1 = time.perf_counter()
    paths = {}
    with output_dir(out_dir, overwrite=overwrite, protect=[model_dir]) as tmp:
        for fmt in recipe.export.formats:
            write_checkpoint(tmp / fmt, hf_config, dense, linears, recipe.layout(fmt), block_map, meta, model_dir)
            paths[fmt] = str(out_dir / fmt)
        t_write = time.perf_counter() - t1
        report = {
            "method": meta.method, "transforms": run.transforms, "recipe": meta.settings, "seed": cal.seed, "calibration": meta.calibration,
            "source_model": meta.source_model, "device": device, "versions": meta.versions,
            "modules": meta.modules,
            "total_loss": float(sum(m.loss for m in run.modules)),
            "total_error": float(sum(m.error for m in run.modules)),
            "seconds": {"load": t_load, "quantize": run.seconds, "write": t_write,
                        "total": time.perf_counter() - t0},
            "predicted_peak_bytes": (run.plan or {}).get("predicted_peak_bytes"),
            "measured_peak_bytes": run.measured_peak_bytes,
            "memory": run.memory_report(),
            "paths": paths,
            "out_dir": str(out_dir),
        }
        changes = {fmt: c for fmt in paths if (c := written_changes(tmp / fmt))}
        if changes:  # what an opt-in (K-quant scales) changed in the weights, per format
            report["changes"] = changes
        write_json(tmp / REPORT_NAME, report)
    log.info("quantized %d modules in %.1fs (%s), wrote %s", len(linears), run.seconds, report["method"],
             ", ".join(paths.values()))
    return report
