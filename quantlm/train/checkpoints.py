"""Resumable training state (model, optimizer, step, RNG) and HF checkpoints, all written atomically.

Resumable checkpoints live in ``<run>/checkpoints/step-NNNNNNN/state.pt``; ``<run>/checkpoints/latest`` names the
newest complete one and is rewritten only after the checkpoint folder is in place, so a run killed at any moment
resumes from a complete state. State dicts are full (unsharded, keyed by parameter name), so a checkpoint
taken under DDP or FSDP resumes on one process and the other way round.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import torch
from torch import nn

from quantlm.atomic import write_json, write_text
from quantlm.errors import QuantlmError
from quantlm.outputs import output_dir

log = logging.getLogger(__name__)



def _dcp():
    """torch's distributed state-dict helpers and the full-state options: imported when a checkpoint is saved or
    loaded (they take 0.7 s to import, which every `quantlm` command would otherwise pay)."""
    from torch.distributed.checkpoint import state_dict

    return state_dict, state_dict.StateDictOptions(full_state_dict=True, cpu_offload=True)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the RNGs. A checkpoint saved with one CUDA state per visible GPU restores the GPUs both runs have,
    so a run resumes on fewer (or more) GPUs than it was saved with; the others keep their fresh state."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        saved, visible = list(state["cuda"]), torch.cuda.device_count()
        for i in range(min(len(saved), visible)):
            torch.cuda.set_rng_state(saved[i], device=i)
        if len(saved) != visible:
            log.warning("the checkpoint holds CUDA RNG states of %d GPUs, this run sees %d: restored the first %d",
                        len(saved), visible, min(len(saved), visible))


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model state dict on CPU (a collective under FSDP: every rank calls it)."""
    dcp, full = _dcp()
    return dcp.get_model_state_dict(model, options=full)


def save_training_state(run_dir: Path, step: int, model: nn.Module, optimizer, extra: dict, is_main: bool,
                        keep: int) -> Path | None:
    """Write checkpoint ``step`` (collective under FSDP; only the main process writes)."""
    model_sd = full_model_state(model)
    dcp, full = _dcp()
    optim_sd = dcp.get_optimizer_state_dict(model, optimizer, options=full)
    if not is_main:
        return None
    root = run_dir / "checkpoints"
    name = f"step-{step:07d}"
    with output_dir(root / name, overwrite=True) as tmp:
        torch.save({"step": step, "model": model_sd, "optimizer": optim_sd, "rng": rng_state(), **extra},
                   tmp / "state.pt")
        write_json(tmp / "meta.json", {"step": step, **{k: v for k, v in extra.items() if k != "rng"}})
    write_text(root / "latest", name + "\n")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return root / name


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names; if that folder was deleted (e.g. because it was corrupt), the newest
    remaining one; None for a run without checkpoints."""
    root = run_dir / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / "state.pt").is_file():
            return path
    found = sorted(p for p in root.glob("step-*") if (p / "state.pt").is_file())
    if found:
        log.warning("%s names no complete checkpoint; resuming from %s", pointer, found[-1].name)
        return found[-1]
    return None


def load_training_state(path: Path, model: nn.Module, optimizer) -> dict:
    """Restore model, optimizer and RNG from checkpoint ``path``; returns the saved dict (step, extras)."""
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        dcp, full = _dcp()
        dcp.set_model_state_dict(model, state["model"], options=full)
        dcp.set_optimizer_state_dict(model, optimizer, state["optimizer"], options=full)
    except QuantlmError:
        raise
    except Exception as e:  # a truncated or foreign file: name it and the fix
        raise QuantlmError(f"checkpoint {path} is corrupt or does not match this model ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); delete that folder to "
                           "resume from the checkpoint before it, or start a new --out") from None
    set_rng_state(state["rng"])
    return state
