"""torch.distributed helpers that turn into no-ops in a single process.

Launch with `torchrun --nproc_per_node=N -m pagoda ...`: torchrun sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init()` reads them (env:// rendezvous). NCCL on
CUDA, gloo on CPU. A process group created beforehand (e.g. by a test) is used as is.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def init() -> None:
    """Join the process group torchrun describes; nothing to do in one process or when already joined."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def rank() -> int:
    """This process's rank (0 in one process)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 in one process)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, the one that writes files and prints."""
    return rank() == 0


def device() -> torch.device:
    """The device this rank trains on: cuda:LOCAL_RANK with CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks in place (and return it)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only."""
    if is_main():
        print(*args, **kwargs, flush=True)


def shutdown() -> None:
    """Leave the process group (if any) together: a rank that tears gloo down while another still has
    work in flight can make that one abort (seen once in the two-process tests)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def session():
    """init() for the duration of a stage; shut the process group down after it only if this call made it
    (a caller that initialised it, e.g. a test or an outer command, keeps it)."""
    owns_group = not dist.is_initialized()
    init()
    try:
        yield
    finally:
        if owns_group:
            shutdown()
