"""Data-parallel training over processes: FSDP2 (``fully_shard``) on CUDA (NCCL) and on CPU (gloo).

The same code runs under ``torchrun`` on N GPUs and on CPU processes. The student, the critic and
the frozen teacher are sharded over all ranks with one FSDP2 unit per transformer block plus one
for the rest (embeddings, head): parameters, gradients and AdamW states are split between ranks,
and a block's weights are gathered only while that block runs. The entry points that are not
``forward`` (``CausalDiT.forward_chunk``, ``forward_full``, ``text_kv`` and ``Block.text_kv``) are
registered with FSDP so that they gather weights too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

FORWARD_METHODS = ("forward_chunk", "forward_full", "text_kv")  # of CausalDiT
BLOCK_METHODS = ("text_kv",)  # of each Block


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def context_from_env(device: str = "auto") -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment (or run alone).

    NCCL on CUDA, gloo on CPU; each process takes the GPU of its LOCAL_RANK.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistContext(0, 1, torch.device("cuda" if use_cuda else "cpu"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), dev)


def shard(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """Shard a ``CausalDiT`` with FSDP2 over all ranks, block by block (no-op in a single process)."""
    if not ctx.distributed:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
        for name in BLOCK_METHODS:
            register_fsdp_forward_method(block, name)
    fully_shard(model, mesh=mesh)
    for name in FORWARD_METHODS:
        register_fsdp_forward_method(model, name)
    return model


def checkpoint_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """Activation checkpointing per transformer block: a block's activations are recomputed in
    backward instead of kept (same gradients, less memory). Parameter names do not change.
    Apply before ``shard``."""
    from torch.distributed._composable import checkpoint

    for block in model.blocks:
        checkpoint(block)
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter or state, on the CPU. Collective for DTensors."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu()


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_cat(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate a per-rank tensor [b, ...] over ranks (equal b on every rank)."""
    if not ctx.distributed:
        return t
    parts = [torch.empty_like(t) for _ in range(ctx.world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def barrier(ctx: DistContext):
    if ctx.distributed:
        dist.barrier()
