"""Device and dtype setup, in one place.

Dtype policy: parameters stay in fp32 (the master copy the optimiser updates); compute runs under autocast in bf16 on
GPUs that support it, fp16 (with a GradScaler in training) on older GPUs, and fp32 on the CPU. The frozen vision tower
may be cast to the compute dtype, since it is never trained.
"""

from __future__ import annotations

import os

import torch


def pick_device(preference: str = "auto") -> torch.device:
    """'auto' -> cuda if available, else mps, else cpu; anything else is taken as a torch device string."""
    if preference != "auto":
        device = torch.device(preference)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {preference!r} was asked for but CUDA is not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def compute_dtype(device: torch.device, preference: str = "auto") -> torch.dtype:
    """The autocast dtype for `device`: bf16 where supported on CUDA, else fp16 on CUDA, fp32 elsewhere."""
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if preference != "auto":
        if preference not in names:
            raise ValueError(f"unknown dtype {preference!r}; choose one of auto, {', '.join(names)}")
        return names[preference]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (timings); nothing to wait for elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_report(device: torch.device) -> str:
    """Allocated / reserved memory on a GPU, resident memory of this process otherwise."""
    if device.type == "cuda":
        allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
        return f"GPU memory: {allocated / 2**20:.1f} MiB allocated / {reserved / 2**20:.1f} MiB reserved"
    import psutil

    return f"process memory (RSS): {psutil.Process().memory_info().rss / 2**20:.1f} MiB"


def init_distributed(use_cuda: bool | None = None) -> tuple[int, int, int]:
    """(rank, world size, local rank). Under `torchrun` (WORLD_SIZE > 1) this joins the process group: NCCL on
    GPUs, Gloo on the CPU (`use_cuda`: default, whenever CUDA is available). A single process needs no group."""
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), local_rank


def leave_distributed(world: int) -> None:
    """Leave the process group `init_distributed` joined, at the end of a run (torchrun's processes exit cleanly)."""
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (identity in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
    return value


def serving_threads(device: torch.device, requested: int | None = None, cores: int | None = None) -> int | None:
    """Torch's intra-op threads for a server on `device`: `requested`, else on a CPU one core fewer than the process
    may use (at least 1), so the event loop, tokenising and streaming keep a core instead of taking turns with the
    decode step's threads (README, `--threads`); None: leave torch's setting (a GPU)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be at least 1 (got {requested})")
        return requested
    if device.type != "cpu":
        return None
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1)
