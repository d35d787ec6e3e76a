"""The training loss: summed next-token cross-entropy over the supervised positions.

    summed_loss(logits, labels)                     from full logits [B, L, V]
    chunked_summed_loss(hidden, head, labels)       from the final hidden states [B, L, H] and the output head: only
                                                    supervised positions, a chunk at a time, each chunk's logits
                                                    recomputed in backward — the [tokens, vocab] fp32 logits of the
                                                    whole batch never exist

Both are sums (not means): the trainer divides by the global batch's supervised-token count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import IGNORE_INDEX


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [B, L, V] at t predict labels [B, L] at t + 1; -100 is ignored."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_summed_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                        chunk: int = 4096) -> torch.Tensor:
    """The same sum as `summed_loss(head(hidden), labels)`, from hidden [B, L, H]."""
    targets = labels[:, 1:].to(hidden.device)  # [B, L-1]
    keep = targets != IGNORE_INDEX
    states, targets = hidden[:, :-1][keep], targets[keep]  # [N, H], [N]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, states.shape[0], chunk):
        total = total + checkpoint(_chunk_loss, head, states[start:start + chunk], targets[start:start + chunk],
                                   use_reentrant=False)
    return total


def _chunk_loss(head: nn.Module, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(states).float(), targets, reduction="sum")  # [n, V] logits live only here
