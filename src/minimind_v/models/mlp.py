"""Feed-forward blocks: the SwiGLU MLP and the mixture-of-experts layer built from it.

MoE routing: softmax over the gate logits, top-k experts per token, the top-k weights optionally renormalised to
sum to 1; output = weighted sum of the chosen experts + every shared expert. The load-balancing loss (only while
training and `aux_loss_alpha > 0`) is sequence-level (`seq_aux`) or token-level, and is kept on `self.aux_loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from ..config import MiniMindVConfig
from .attention import projections


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, config: MiniMindVConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = projections(x, self.gate_proj, self.up_proj)
        return self.dropout(self.down_proj(self.act_fn(gate) * up))


class MoEGate(nn.Module):
    def __init__(self, config: MiniMindVConfig):
        super().__init__()
        self.top_k, self.num_experts = config.num_experts_per_token, config.n_routed_experts
        self.alpha, self.seq_aux = config.aux_loss_alpha, config.seq_aux
        self.renormalise = config.norm_topk_prob and (self.top_k > 1 or config.moe_renorm_top1)
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, H] -> expert ids [B*L, k], weights [B*L, k], aux loss (scalar)."""
        bsz, seq_len, hidden = x.shape
        scores = F.linear(x.reshape(-1, hidden), self.weight).softmax(dim=-1)  # [T, E]
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)  # [T, k]
        if self.renormalise:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        if not (self.training and self.alpha > 0.0):
            return topk_idx, topk_weight, scores.new_zeros(())
        return topk_idx, topk_weight, self.balance_loss(scores, topk_idx, bsz, seq_len)

    def balance_loss(self, scores: torch.Tensor, topk_idx: torch.Tensor, bsz: int, seq_len: int) -> torch.Tensor:
        """scores [T, E], topk_idx [T, k] -> alpha * sum_e (load_e * mean score_e)."""
        if self.seq_aux:  # per sequence: fraction of the k*L choices each expert got, scaled so uniform = 1
            load = torch.zeros(bsz, self.num_experts, device=scores.device)
            load.scatter_add_(1, topk_idx.view(bsz, -1), torch.ones(bsz, seq_len * self.top_k, device=scores.device))
            load = load / (seq_len * self.top_k / self.num_experts)  # [B, E]
            return (load * scores.view(bsz, seq_len, -1).mean(dim=1)).sum(dim=1).mean() * self.alpha
        load = F.one_hot(topk_idx.view(-1), num_classes=self.num_experts).float().mean(0) * self.num_experts  # [E]
        return (scores.mean(0) * load).sum() * self.alpha


class MoEFeedForward(nn.Module):
    def __init__(self, config: MiniMindVConfig):
        super().__init__()
        self.experts = nn.ModuleList(MLP(config) for _ in range(config.n_routed_experts))
        self.gate = MoEGate(config)
        self.shared_experts = nn.ModuleList(MLP(config) for _ in range(config.n_shared_experts))
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, H] -> [B, L, H]; sets self.aux_loss."""
        topk_idx, topk_weight, self.aux_loss = self.gate(x)
        flat = x.reshape(-1, x.shape[-1])  # [T, H]
        k = topk_idx.shape[1]
        token_of_choice = torch.arange(flat.shape[0], device=x.device).repeat_interleave(k)  # [T*k]
        expert_of_choice, weight_of_choice = topk_idx.reshape(-1), topk_weight.reshape(-1)  # [T*k]
        y = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            chosen = (expert_of_choice == e).nonzero().squeeze(-1)  # choices routed to expert e
            if chosen.numel() == 0 and not self.training:  # in training an idle expert still joins the graph
                continue
            tokens = token_of_choice[chosen]
            out = expert(flat[tokens]) * weight_of_choice[chosen, None].to(flat.dtype)
            y = y.index_add(0, tokens, out.to(y.dtype))
        y = y.view_as(x)
        for expert in self.shared_experts:
            y = y + expert(x)
        return y
