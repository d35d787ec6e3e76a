"""What trains and how: freeze strategies, AdamW groups, warmup + cosine, and the split of the data into steps.

Freeze strategies as the original: 0 = whole LLM + projector, 1 = projector + first/last decoder layers, 2 = projector
only; the vision tower is always frozen. With LoRA the language model's own weights stay frozen and the adapters of
the layers the strategy names train instead. With a Hugging Face backbone, frozen backbone weights are held in the
compute dtype (bf16 on GPUs) while trained weights keep fp32 master copies.

A step is one global batch (micro-batch x processes x accumulation) cut from one seeded permutation per epoch;
each process takes its micro-batches from it, so the same samples make the same step whatever the split.
"""

from __future__ import annotations

import math

import torch


def apply_freeze(model: torch.nn.Module, strategy: int) -> None:
    """0: LLM + projector, 1: projector + first and last decoder layers, 2: projector only. Tower: always frozen.
    With LoRA, the named layers' adapters train instead of their weights."""
    chosen = model.trainable_modules(strategy)  # the VLM says what a strategy trains
    model.requires_grad_(False)
    model.vision_proj.requires_grad_(True)
    if model.config.lora_rank:
        for module in chosen:
            for name, param in module.named_parameters():
                param.requires_grad_(".lora_" in name)
        return
    for module in chosen:
        module.requires_grad_(True)
    model.mark_trained(chosen)


def hold_frozen_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the frozen base weights that no checkpoint holds (a Hugging Face backbone's) to the half-precision
    compute dtype."""
    if dtype != torch.float32:
        for param in model.frozen_base_parameters():
            param.data = param.data.to(dtype)


def count_parameters(model: torch.nn.Module) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total}


def make_optimizer(model: torch.nn.Module, args) -> torch.optim.AdamW:
    """AdamW (fused on CUDA); the projector at lr * projector_lr_mult; no weight decay on norms and biases."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((name.startswith("vision_proj."), param.dim() >= 2), []).append(param)
    return torch.optim.AdamW([{"params": params, "lr": args.lr * (args.projector_lr_mult if proj else 1.0),
                               "weight_decay": args.weight_decay if decay else 0.0}
                              for (proj, decay), params in groups.items()], betas=(0.9, 0.95),
                             fused=next(model.parameters()).device.type == "cuda")  # one kernel on a GPU


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine down to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def step_batches(num_samples: int, seed: int, epoch: int, global_batch: int,
                 groups: list[int] | None = None) -> list[list[int]]:
    """The epoch's optimizer steps as lists of sample indices (one seeded permutation; a short tail is dropped).
    `groups` (a group number per sample): the groups are permuted instead, each group's samples kept together."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    if groups is None:
        order = torch.randperm(num_samples, generator=generator).tolist()
    else:
        rank = torch.randperm(max(groups, default=-1) + 1, generator=generator).tolist()
        order = sorted(range(num_samples), key=lambda i: (rank[groups[i]], i))
    return [order[i:i + global_batch] for i in range(0, num_samples - global_batch + 1, global_batch)]


def image_chunks(groups: list[int], size: int) -> list[int]:
    """Each sample's chunk: its group's samples, `size` at a time (in file order), numbered by first appearance."""
    seen: dict[int, int] = {}
    numbers: dict[tuple[int, int], int] = {}
    chunks = []
    for group in groups:
        seen[group] = seen.get(group, 0) + 1
        chunks.append(numbers.setdefault((group, (seen[group] - 1) // size), len(numbers)))
    return chunks


def micro_batches(step: list[int], rank: int, world: int, accum: int) -> list[list[int]]:
    """This process's accumulation micro-batches of one step: the same split whatever `world` x `accum` is."""
    size = len(step) // (world * accum)
    return [step[(rank * accum + a) * size:(rank * accum + a + 1) * size] for a in range(accum)]
