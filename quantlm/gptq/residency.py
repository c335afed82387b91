"""Where the hidden states between decoder blocks live, behind one object the block loop talks to.

A :class:`Residency` stores the calibration windows' hidden states at one block boundary on the compute device,
in (pinned) host memory or on disk (``offload.HiddenStates``), hands the loop each block's inputs and a store for
its outputs, reuses the buffer of the boundary it no longer needs, hands freed memory back to the OS when the
plan says memory is tight (``allocator.release_free_memory``), and, on disk, persists each finished block so a
killed run resumes at the next one (``offload.RunState``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from quantlm.dtypes import TORCH_FLOATS
from quantlm.gptq.allocator import release_free_memory
from quantlm.gptq.offload import HiddenStates, RunState, batches_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """What the memory plan decided: where hidden states live, in which dtype, how many windows per batch, how
    many bytes of replayed submodule outputs to keep, and whether to hand freed memory back after each step."""

    where: str  # device | host | disk
    batch_size: int
    storage_dtype: str  # a key of dtypes.TORCH_FLOATS
    forward_dtype: str
    replay_cache_bytes: int
    trim: bool = False
    large_tensors_in_heap: bool = False
    keep_weights: bool = True  # False: a block's quantized weights are released once its codes are kept


class Residency:
    """Hidden states of ``nsamples`` windows of ``seqlen`` tokens and ``width`` features, block after block."""

    def __init__(self, placement: Placement, nsamples: int, seqlen: int, width: int, device: torch.device, *,
                 state: RunState | None = None):
        if placement.where == "disk" and state is None:
            raise ValueError("hidden states on disk need a RunState (the folder they live in)")
        self.placement, self.seqlen, self.width, self.device = placement, seqlen, width, device
        self.batches = batches_of(nsamples, placement.batch_size)
        self.state = state
        self._opened: list[HiddenStates] = []

    # -- resume
    @property
    def resume_block(self) -> int:
        """The first block still to quantize: 0, or where a killed disk-offloaded run stopped."""
        return self.state.next_block if self.state is not None and self.state.started else 0

    @property
    def tails(self) -> dict[str, str]:
        return dict(self.state.tails) if self.state is not None and self.state.started else {}

    def load_block(self, i: int):
        return self.state.load_block(i)

    # -- stores
    def _store(self, name: str | None, create: bool = True) -> HiddenStates:
        closed = next((h for h in self._opened if h.reusable), None)
        p = self.placement
        hs = HiddenStates(self.batches, self.seqlen, self.width, TORCH_FLOATS[p.storage_dtype], where=p.where,
                          device=self.device, dtype=TORCH_FLOATS[p.forward_dtype],
                          path=self.state.dir / name if self.state is not None and name else None,
                          create=create, reuse=closed)
        self._opened.append(hs)
        return hs

    def first_inputs(self) -> HiddenStates:
        """The store the first block's inputs are captured into (or, on resume, the saved inputs)."""
        if self.state is not None and self.state.started:
            return self._store(self.state.inputs, create=False)
        return self._store(self.state.inputs if self.state is not None else None)

    def inputs_complete(self) -> None:
        if self.state is not None:
            self.state.mark_started()

    def outputs(self) -> HiddenStates:
        """A store for the current block's outputs (the buffer of a closed boundary when there is one)."""
        return self._store(self.state.other if self.state is not None else None)

    def block_done(self, i: int, results: dict, reports: list[dict], tails: dict[str, str]) -> None:
        if self.state is not None:
            self.state.block_done(i, results, reports, tails)

    def trim(self) -> None:
        """Freed temporaries back to the OS, when the plan is near the memory limit (each trim makes the next
        allocations fault their pages in again, so it is not free)."""
        if self.placement.trim:
            release_free_memory()

    def close(self, *, succeeded: bool) -> None:
        for hs in self._opened:
            hs.close()
        self._opened.clear()
        if self.state is None:
            return
        if succeeded:
            self.state.remove()
        else:
            self.state.release()
            log.warning("the disk-offloaded run stopped; its state is kept in %s: run again to resume", self.state.dir)

    @property
    def folder(self) -> Path | None:
        return self.state.dir if self.state is not None else None
