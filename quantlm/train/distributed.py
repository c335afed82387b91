"""torch.distributed plumbing: one process, or many under ``torchrun`` (DDP or FSDP). No home-made distribution."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from quantlm.errors import QuantlmError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this module created the process group and destroys it at the end

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over all processes (a no-op alone)."""
        if self.active:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.world_size
        return value

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def global_value(value: torch.Tensor) -> torch.Tensor:
    """A reduction's value over the whole model: under FSDP, ``clip_grad_norm_`` returns a DTensor (torch 2.11-2.13:
    replicated, the global norm; a partial placement, where a torch version leaves one, is reduced here, so the
    logged gradient norm is never one rank's share); other tensors as they are."""
    full = getattr(value, "full_tensor", None)
    return full() if callable(full) else value


def init_distributed() -> DistContext:
    """Join the process group torchrun describes (env WORLD_SIZE/RANK/LOCAL_RANK), or run alone."""
    cuda = torch.cuda.is_available()
    if dist.is_available() and dist.is_initialized():
        rank, world, owns = dist.get_rank(), dist.get_world_size(), False
        local = int(os.environ.get("LOCAL_RANK", rank))
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_available():
            raise QuantlmError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        rank, world, owns = dist.get_rank(), dist.get_world_size(), True
    else:
        rank, world, local, owns = 0, 1, 0, False
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return DistContext(rank, world, local, device, owns)


def wrap_model(model: nn.Module, ctx: DistContext, strategy: str, layers_path: str) -> nn.Module:
    """DDP or FSDP (per decoder block, then the root) around ``model``; the model itself when alone."""
    if not ctx.active:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.get_submodule(layers_path):
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
