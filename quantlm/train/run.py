"""The training loop: one code path for FloatLMs and TriLMs, on one CPU, one GPU or many under torchrun.

Run folder layout (``out_dir``):
  recipe.yaml          the recipe this run follows (a resume must use the same one)
  metrics.jsonl        one JSON record per logged step (step, tokens, loss, lr, wd, tokens/s, MFU, val_loss)
  checkpoints/         resumable states (see ``checkpoints.py``)
  hf/step-NNNNNNN/     optional intermediate HF checkpoints
  final/               the final HF checkpoint (for a TriLM: the unpacked export), with its tokenizer

A run holds the lock ``.NAME.lock`` beside its folder (``quantlm.locks``): a second run on the same folder
stops with an error naming the first. A run that fails or is interrupted before its first checkpoint leaves
nothing behind that blocks a clean rerun. With ``final_dir``, the folder is scratch: the final checkpoint goes
to ``final_dir`` and the folder is removed once it is written (unless ``keep_scratch``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional as F

from quantlm import locks, recipes
from quantlm.architectures import block_map_of
from quantlm.atomic import append_jsonl, follow_umask, refuse_install_location, write_text
from quantlm.dtypes import TORCH_FLOATS
from quantlm.errors import QuantlmError
from quantlm.metadata import ModelMeta, read_meta, write_meta
from quantlm.models.trilm import convert_to_trilm, export_unpacked
from quantlm.outputs import check_output, output_dir, terminate_raises
from quantlm.train import checkpoints as ckpt
from quantlm.train.data import PackedSequences, heldout_windows, load_or_train_tokenizer, load_token_corpus
from quantlm.train.distributed import DistContext, global_value, init_distributed, wrap_model
from quantlm.train.metrics import device_peak_flops, flops_per_token
from quantlm.train.recipe import TrainRecipe
from quantlm.train.schedule import schedule_for
from quantlm.versions import library_versions

log = logging.getLogger(__name__)



# ------------------------------------------------------------------------------------------- models

def build_model(recipe: TrainRecipe, vocab_in_use: int | None = None):
    """A freshly initialised fp32 FloatLM or TriLM for the recipe (seeded by ``recipe.seed``)."""
    from transformers import LlamaForCausalLM


    spec = recipe.spec()
    if vocab_in_use is not None and vocab_in_use > spec.padded_vocab_size:
        raise QuantlmError(f"the tokenizer has {vocab_in_use} tokens but {spec.name} embeds only "
                           f"{spec.padded_vocab_size}; set model_overrides: {{vocab_size: {vocab_in_use}}} "
                           "or use a smaller tokenizer_vocab")
    config = spec.to_hf_config()
    config.quantlm_family = spec.family
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(config)
    if spec.family == "trilm":
        convert_to_trilm(model, spec.model_parallel)
    return model


def save_hf_checkpoint(recipe: TrainRecipe, state: dict[str, torch.Tensor], path: Path, tokenizer,
                       info: dict, overwrite: bool = False) -> Path:
    """Write an HF checkpoint from a full state dict; a TriLM is exported unpacked (block weights gamma * W_t)."""
    dtype = TORCH_FLOATS[recipe.save_dtype]
    model = build_model(recipe)
    model.load_state_dict(state, strict=True)
    with output_dir(path, overwrite=overwrite) as tmp:
        if recipe.family_name == "trilm":
            export_unpacked(model, tmp, tokenizer, dtype=dtype)
        else:
            model.config.quantlm_family = "floatlm"
            model.to(dtype).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        write_meta(tmp, ModelMeta(producer="train", family=recipe.family_name, format="unpacked",
                                  model=recipe.spec().name, preset=recipe.model, settings=recipes.to_dict(recipe),
                                  info={"recipe_hash": recipes.recipe_hash(recipe), **info},
                                  versions=library_versions()))
        follow_umask(tmp)  # save_pretrained writes model.safetensors through a 0600 temporary file
    return path


# ---------------------------------------------------------------------------------------- run folder

def _prepare_run_dir(out: Path, recipe: TrainRecipe, resume: bool, ctx: DistContext) -> None:
    """Refuse to mix runs: an existing folder must hold this very recipe, and only with ``resume``."""
    saved = out / "recipe.yaml"
    if saved.is_file() and not _started(out):
        # a stub: a run that stopped before its first checkpoint; nothing to resume, so start afresh
        ctx.barrier()
        if ctx.is_main:
            log.info("%s holds a run that never reached a checkpoint; starting it afresh", out)
            _remove_stub(out, created=False)
        ctx.barrier()
    if saved.is_file():
        if not resume:
            raise QuantlmError(f"{out} already holds a training run; pass --resume to continue it or choose "
                               "another --out")
        old = recipes.load(saved, expect=TrainRecipe)
        if recipes.recipe_hash(old) != recipes.recipe_hash(recipe):
            diff = [k for k, v in recipes.to_dict(recipe).items() if recipes.to_dict(old).get(k) != v]
            raise QuantlmError(f"{out} holds a run with a different recipe (differs in {', '.join(diff)}); resume "
                               "with the same recipe or choose another --out")
    elif out.exists() and any(out.iterdir()):
        raise QuantlmError(f"{out} is not empty and holds no training run; choose a new or empty --out")
    ctx.barrier()
    if ctx.is_main and not saved.is_file():
        out.mkdir(parents=True, exist_ok=True)
        recipes.dump(recipe, saved)
    ctx.barrier()


def _started(out: Path) -> bool:
    """A run folder holds a run worth resuming: a resumable checkpoint or its final checkpoint."""
    return ckpt.latest_checkpoint(out) is not None or (out / "final" / "config.json").is_file()


_STUB_FILES = ("recipe.yaml", "metrics.jsonl")


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet: what a run would create."""
    path = Path(os.path.abspath(path))
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def _remove_stub(out: Path, created: Path | bool | None) -> None:
    """Remove what a run that never reached a checkpoint wrote (and the folders this run created, ``created``
    being the outermost, if they are empty now), so that a clean rerun is not refused."""
    if _started(out):
        return
    for name in _STUB_FILES:
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
    for name in ("hf", "checkpoints"):
        shutil.rmtree(out / name, ignore_errors=True)
    if created:
        _prune_empty(out, created if isinstance(created, Path) else out)


def _prune_empty(out: Path, top: Path | None) -> None:
    """Remove ``out`` and its parents up to ``top`` (the outermost folder this run created) while empty."""
    if top is None:
        return
    top, d = Path(os.path.abspath(top)), Path(os.path.abspath(out))
    while d == top or top in d.parents:
        try:
            d.rmdir()  # only if empty
        except FileNotFoundError:
            pass
        except OSError:
            break
        if d == top:
            break
        d = d.parent


def _final_matches(final: Path, recipe: TrainRecipe) -> bool:
    """``final`` holds the final checkpoint of exactly this recipe (checked through its quantlm.json)."""
    if not (final / "config.json").is_file():
        return False
    try:
        meta = read_meta(final)
    except QuantlmError:
        return False
    if meta is None:
        return False
    if "recipe_hash" in meta.info:
        return meta.info["recipe_hash"] == recipes.recipe_hash(recipe)
    return meta.settings == json.loads(json.dumps(recipes.to_dict(recipe)))


@contextlib.contextmanager
def _run_lock(out: Path, ctx: DistContext):
    """The run folder's lock, taken by the main process; every process stops if it cannot be taken."""
    error = None
    if ctx.is_main:
        try:
            locks.acquire(out, "train run")
        except QuantlmError as e:
            error = e
    if ctx.active:
        failed = ctx.mean(torch.tensor(float(error is not None), device=ctx.device)).item() > 0
        if failed and error is None:
            raise QuantlmError(f"{out} is in use by another quantlm train run (see the main process's error)")
    if error is not None:
        raise error
    try:
        yield
    finally:
        if ctx.is_main:
            locks.release(out)


def _trim_metrics(path: Path, last_step: int) -> None:
    """Drop records logged after the checkpoint we resume from (they will be logged again)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip()
            and json.loads(line).get("step", 0) <= last_step]
    write_text(path, "".join(line + "\n" for line in keep))


# -------------------------------------------------------------------------------------------- loop

def _loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


@torch.no_grad()
def _validation_loss(model, windows: torch.Tensor, micro_batch: int, device, autocast) -> float:
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(windows), micro_batch):
        batch = windows[i:i + micro_batch].to(device)
        with autocast():
            total += _loss(model, batch).item() * len(batch)
    model.train(was_training)
    return total / len(windows)


def train(recipe: TrainRecipe, out_dir: str | os.PathLike, *, resume: bool = False,
          overrides: dict | None = None, on_step: Callable[[dict], None] | None = None,
          progress: bool = True, final_dir: str | os.PathLike | None = None, keep_scratch: bool = False) -> Path:
    """Train the recipe's model into ``out_dir``; returns the final HF checkpoint folder (``out_dir/final``, or
    ``final_dir``).

    ``resume`` continues the run in ``out_dir`` from its newest checkpoint (or starts it if there is none) and
    reproduces the uninterrupted run exactly. ``overrides`` change recipe keys (``{"steps": 20}``).
    ``on_step`` receives each step's metric record (for tests and notebooks); ``progress`` shows the step bar.
    ``final_dir``: write the final checkpoint there (atomically; an existing quantlm output there is replaced)
    and treat ``out_dir`` as scratch, removed once the final checkpoint is written unless ``keep_scratch``. A
    ``final_dir`` that already holds this recipe's final checkpoint is returned at once.
    """
    if overrides:
        recipe = recipes.override(recipe, dict(overrides))
    out = Path(out_dir)
    final = Path(final_dir) if final_dir is not None else out / "final"
    refuse_install_location(out, "--out")
    ctx = init_distributed()
    threads = torch.get_num_threads()
    try:
        if final_dir is not None and _final_matches(final, recipe):
            log.info("%s is already complete", final)
            if not keep_scratch:
                with _run_lock(out, ctx):
                    if ctx.is_main:
                        _remove_scratch(out)
            return final
        if final_dir is not None and ctx.is_main:
            check_output(final, overwrite=True, protect=[out], flag="final checkpoint")  # fail before training
        created = _first_missing(out)  # before the lock, which lives beside ``out``
        try:
            return _locked_train(recipe, out, resume, ctx, on_step, progress, final_dir, final, keep_scratch,
                                 created)
        except BaseException:
            if ctx.is_main:
                _prune_empty(out, created)  # the folders a failed run created (the lock's, too) go
            raise
    finally:
        torch.set_num_threads(threads)  # the caller's setting, not the recipe's, outlives the run
        ctx.close()


def _locked_train(recipe: TrainRecipe, out: Path, resume: bool, ctx: DistContext,
                  on_step: Callable[[dict], None] | None, progress: bool, final_dir, final: Path,
                  keep_scratch: bool, created: Path | None) -> Path:
    with _run_lock(out, ctx):
        _prepare_run_dir(out, recipe, resume, ctx)
        if final_dir is None and final.is_dir() and (final / "config.json").is_file():
            log.info("%s is already complete", final)
            return final
        if ctx.is_main:
            for warning in recipe.schedule_warnings():
                log.warning("train recipe: %s", warning)
        if recipe.threads:
            torch.set_num_threads(recipe.threads)
        try:
            with terminate_raises():
                result = _train(recipe, out, resume, ctx, on_step, progress, final)
        except BaseException:
            if ctx.is_main:
                _remove_stub(out, created)
            raise
        if final_dir is not None and not keep_scratch and ctx.is_main:
            _remove_scratch(out)
        ctx.barrier()
        return result


def _remove_scratch(out: Path) -> None:
    """Remove a scratch run folder (only one that holds a quantlm training run: its recipe.yaml)."""
    if (out / "recipe.yaml").is_file():
        shutil.rmtree(out, ignore_errors=True)
        log.info("removed the training scratch folder %s (the final checkpoint is written)", out)


def _train(recipe: TrainRecipe, out: Path, resume: bool, ctx: DistContext,
           on_step: Callable[[dict], None] | None, progress: bool = True, final: Path | None = None) -> Path:
    from tqdm.auto import tqdm

    spec = recipe.spec()
    # Main process first: it trains/tokenizes into the shared cache, the others then read it.
    if ctx.is_main:
        tokenizer = load_or_train_tokenizer(recipe)
        corpus = load_token_corpus(recipe, tokenizer)
    ctx.barrier()
    if not ctx.is_main:
        tokenizer = load_or_train_tokenizer(recipe)
        corpus = load_token_corpus(recipe, tokenizer)
    data = PackedSequences(corpus.train_tokens, recipe.seq_len, recipe.seed)
    seqs_per_step = recipe.sequences_per_step
    if data.num_sequences < seqs_per_step:
        raise QuantlmError(f"the corpus gives {data.num_sequences} training sequences of {recipe.seq_len} tokens, "
                           f"fewer than one batch ({seqs_per_step}); add text or lower batch_tokens/seq_len")
    windows = heldout_windows(corpus.heldout_tokens, recipe.seq_len, recipe.eval_tokens)
    if len(windows) == 0:
        raise QuantlmError(f"the held-out part ({len(corpus.heldout_tokens)} tokens) is shorter than one sequence "
                           f"of {recipe.seq_len}; add text or raise heldout_fraction")
    if seqs_per_step % (ctx.world_size * recipe.micro_batch):
        raise QuantlmError(f"batch of {seqs_per_step} sequences does not split into {ctx.world_size} process(es) x "
                           f"micro_batch {recipe.micro_batch}; make batch_tokens/seq_len a multiple of their product")
    per_rank = seqs_per_step // ctx.world_size
    accum = per_rank // recipe.micro_batch

    model = build_model(recipe, len(tokenizer)).to(ctx.device)
    model.train()
    wrapped = wrap_model(model, ctx, recipe.distributed, block_map_of(model).layers_path)
    decay = [p for p in wrapped.parameters() if p.dim() >= 2]
    no_decay = [p for p in wrapped.parameters() if p.dim() < 2]  # norms: never decayed
    optimizer = torch.optim.AdamW([{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False}],
                                  lr=0.0, betas=recipe.betas, weight_decay=0.0)
    sched = schedule_for(recipe)
    total = sched.total_steps

    step = 0
    if resume:
        path = ckpt.latest_checkpoint(out)
        if path is not None:
            state = ckpt.load_training_state(path, wrapped, optimizer)
            step = int(state["step"])
            log.info("resumed from %s (step %d)", path, step)
    if ctx.is_main:
        _trim_metrics(out / "metrics.jsonl", step)

    gpu = ctx.device.type == "cuda"
    use_bf16 = recipe.precision == "bf16" or (recipe.precision == "auto" and gpu)

    def autocast():
        return torch.autocast(ctx.device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    peak = device_peak_flops(ctx.device)
    flops_tok = flops_per_token(spec, recipe.seq_len)
    params = [p for p in wrapped.parameters()]
    log.info("training %s (%s, %.2fM parameters) for %d steps of %d tokens on %d %s process(es), %d micro-steps",
             spec.name, spec.family, spec.num_params() / 1e6, total, recipe.batch_tokens, ctx.world_size,
             ctx.device.type, accum)
    bar = tqdm(total=total, initial=step, disable=not (ctx.is_main and progress), desc=f"train {spec.name}",
               unit="step")
    ddp = hasattr(wrapped, "no_sync")
    while step < total:
        t0 = time.perf_counter()
        lr, wd = sched.lr(step), sched.wd(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = wd if group["apply_wd"] else 0.0
        loss_sum = torch.zeros((), device=ctx.device)
        first = step * seqs_per_step + ctx.rank * per_rank
        for i in range(accum):
            ids = data.batch(first + i * recipe.micro_batch, recipe.micro_batch).to(ctx.device)
            sync = contextlib.nullcontext() if not ddp or i == accum - 1 else wrapped.no_sync()
            with sync:
                with autocast():
                    loss = _loss(wrapped, ids)
                (loss / accum).backward()
            loss_sum += loss.detach()
        clip = recipe.grad_clip if recipe.grad_clip > 0 else float("inf")
        grad_norm = global_value(torch.nn.utils.clip_grad_norm_(params, clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_value = ctx.mean(loss_sum / accum).item()
        if gpu:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        record = {"step": step, "tokens": step * recipe.batch_tokens, "loss": loss_value, "lr": lr,
                  "weight_decay": wd, "grad_norm": float(grad_norm), "tokens_per_s": recipe.batch_tokens / dt}
        if peak:
            record["mfu"] = record["tokens_per_s"] * flops_tok / (peak * ctx.world_size)
        if (recipe.eval_interval and step % recipe.eval_interval == 0) or step == total:
            eval_model = model if ddp else wrapped  # DDP: the inner model, no collectives needed
            record["val_loss"] = _validation_loss(eval_model, windows, recipe.micro_batch, ctx.device, autocast)
        if ctx.is_main and (step % recipe.log_interval == 0 or "val_loss" in record or step == total):
            append_jsonl(out / "metrics.jsonl", record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}")
        if (recipe.checkpoint_interval and step % recipe.checkpoint_interval == 0) or step == total:
            ckpt.save_training_state(out, step, wrapped, optimizer,
                                     {"tokens": step * recipe.batch_tokens, "world_size": ctx.world_size},
                                     ctx.is_main, recipe.keep_checkpoints)
        if recipe.hf_interval and step % recipe.hf_interval == 0 and step < total:
            state = ckpt.full_model_state(wrapped)
            if ctx.is_main:
                save_hf_checkpoint(recipe, state, out / "hf" / f"step-{step:07d}", tokenizer,
                                   {"step": step, "tokens": step * recipe.batch_tokens}, overwrite=True)
        if on_step is not None:
            on_step(record)
    bar.close()

    state = ckpt.full_model_state(wrapped)
    final = final if final is not None else out / "final"
    if ctx.is_main:
        last = _last_record(out / "metrics.jsonl")
        save_hf_checkpoint(recipe, state, final, tokenizer,
                           {"step": step, "tokens": step * recipe.batch_tokens,
                            "val_loss": last.get("val_loss"), "train_loss": last.get("loss")}, overwrite=True)
        log.info("final checkpoint: %s", final)
    ctx.barrier()
    return final


def _last_record(path: Path) -> dict:
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return json.loads(lines[-1]) if lines else {}
