"""Training across processes, as torchrun and accelerate launch it: which process this is, the
process group a launcher asks for, and the embeddings of every process gathered with their
gradients, so that contrastive negatives span the global batch (as open_clip's training does)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group of several processes."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def join_launched_group() -> bool:
    """Initialise the process group a launcher (torchrun, accelerate launch) set up through its
    environment — nccl on CUDA (each process on the GPU of its LOCAL_RANK), gloo on the CPU;
    True when this process joined one (it then calls `leave_group` at the end)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def leave_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's `tensor` concatenated in rank order; gradients flow back to each owner."""
    if rank_and_world()[1] == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()))


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's `tensor` concatenated in rank order (no gradients)."""
    world = rank_and_world()[1]
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def mean_across_processes(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of every process's `tensor` (the tensor itself in one process), the same in all."""
    world = rank_and_world()[1]
    if world == 1:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / world
