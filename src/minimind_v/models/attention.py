"""Grouped-query self-attention through `scaled_dot_product_attention`, and the masks it takes.

The attention never builds its own mask: the model passes either `None` (plain causal: SDPA's `is_causal`, the
FlashAttention path on GPU), a boolean mask [B, 1, L, S] (True = may attend), or a `PackedMask` for packed rows
(several samples per row, each attending causally within itself, with per-sample `position_ids`).
`build_attention_mask` makes the boolean mask from a 2D padding mask and the KV-cache offset. A `PackedMask` runs
as variable-length FlashAttention on CUDA (`torch.nn.attention.varlen`: every sample is its own sequence, nothing is
computed across samples or on masked blocks) in fp16/bf16 and as its block-diagonal boolean mask elsewhere; rows
whose samples share a prefix (one image's questions, the prompt and image computed once) always take the mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from ..config import MiniMindVConfig
from .norm import RMSNorm
from .quantize import Int8Linear, int8_linear
from .rope import apply_rotary


@dataclass
class PackedMask:
    """Packed rows. segment_ids [R, L]: the segment of the row each position holds (-1: padding); cu_seqlens int32
    [segments + 1]: where every segment (each sample, and each row's padding tail) starts in the R * L flattened
    positions, then R * L; max_len: no segment is longer (None: L). prefix_ids [R, L] (or None): the segment that a
    position also sees, its sample's shared start (a prompt and image computed once for several samples; -1: none)."""

    segment_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_len: int | None = None
    prefix_ids: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        """bool [R, 1, L, L]: same segment (or both padding), or the query's shared prefix; not in the future."""
        seg, length = self.segment_ids, self.segment_ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=seg.device).tril()  # [L, L]
        allowed = seg[:, :, None] == seg[:, None, :]  # [R, L, L]
        if self.prefix_ids is not None:
            prefix = self.prefix_ids[:, :, None]  # [R, L, 1]
            allowed |= (prefix == seg[:, None, :]) & (prefix >= 0)
        return (allowed & causal)[:, None]


def projections(x: torch.Tensor, *linears: nn.Module) -> tuple[torch.Tensor, ...]:
    """x [..., in] through several projections of the same input (q/k/v, gate/up) -> their outputs. Inside a
    compiled step on a GPU with no gradients (inference, `fuse_projections`) one product with their concatenated
    weights - or, for int8 layers, their int8 rows and scales stacked - one kernel instead of one each, where a small
    model's decode step is bound by kernel launches; the engine's compiled steps freeze the weights, so a
    concatenation of float weights is folded into a constant (generation/static_decode.py). Elsewhere (and for
    adapted or biased layers) one product each: the same numbers up to the kernels' summation order."""
    outs = [linear.out_features for linear in linears]
    if fuse_projections(x):
        if all(type(linear) is nn.Linear and linear.bias is None for linear in linears):
            return F.linear(x, torch.cat([linear.weight for linear in linears])).split(outs, dim=-1)
        if all(type(linear) is Int8Linear for linear in linears):
            weight = torch.cat([linear.weight_int8 for linear in linears])  # [sum of outs, in]
            return int8_linear(x, weight, torch.cat([linear.scale for linear in linears])).split(outs, dim=-1)
    return tuple(linear(x) for linear in linears)


def fuse_projections(x: torch.Tensor) -> bool:
    """Whether `projections` of x take one product: compiling, on a GPU, without gradients."""
    return torch.compiler.is_compiling() and not torch.is_grad_enabled() and x.is_cuda


def varlen_ready(flash_attn: bool, dropout: float, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a `PackedMask` runs as variable-length FlashAttention (else as its dense mask): SDPA attention
    (config.flash_attn), no attention dropout, CUDA, half precision."""
    return flash_attn and dropout == 0.0 and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


class Attention(nn.Module):
    def __init__(self, config: MiniMindVConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.dropout = config.head_dim, config.dropout
        self.use_sdpa = config.flash_attn
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: Cache | None) -> torch.Tensor:
        """x [B, L, hidden], cos/sin [B, 1, L, D], mask None or bool [B, 1, L, S] -> [B, L, hidden]."""
        bsz, seq_len, _ = x.shape
        q, k, v = projections(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.reshape(bsz, seq_len, self.num_heads, self.head_dim)  # [B, L, H, D]
        k = k.reshape(bsz, seq_len, self.num_kv_heads, self.head_dim)  # [B, L, Hkv, D]
        v = v.reshape(bsz, seq_len, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H(kv), L, D]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, Hkv, S, D], S = past + L
        is_causal = mask is None and seq_len > 1
        dropout_p = self.dropout if self.training else 0.0
        if isinstance(mask, PackedMask):
            # v is in the compute dtype (under autocast q and k left RoPE in fp32, as SDPA's autocast would cast them)
            if mask.prefix_ids is None and varlen_ready(self.use_sdpa, dropout_p, v.device, v.dtype):
                q, k = q.to(v.dtype), k.to(v.dtype)
                return self.resid_dropout(self.o_proj(packed_attention(q, k, v, mask.cu_seqlens, mask.max_len)))
            mask = mask.dense()
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                                 enable_gqa=self.num_kv_heads != self.num_heads)
        else:
            out = eager_attention(q, k, v, mask, is_causal, dropout_p)
        out = out.transpose(1, 2).reshape(bsz, seq_len, self.num_heads * self.head_dim)  # [B, L, H * D]
        return self.resid_dropout(self.o_proj(out))


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_len: int | None = None) -> torch.Tensor:
    """Variable-length FlashAttention (CUDA) over packed rows: q [R, H, L, D], k/v [R, Hkv, L, D] ->
    [R, L, H * D]; the flattened R * L positions are cut into segments at cu_seqlens (none longer than max_len,
    default L), each causal on its own."""
    from torch.nn.attention.varlen import varlen_attn

    rows, heads, length, dim = q.shape
    flat = lambda t: t.transpose(1, 2).reshape(rows * length, t.shape[1], dim)  # noqa: E731  [R * L, H(kv), D]
    rep = heads // k.shape[1]  # GQA: query head h reads kv head h // rep
    keys, values = flat(k).repeat_interleave(rep, dim=1), flat(v).repeat_interleave(rep, dim=1)  # [R * L, H, D]
    longest = max_len or length
    out = varlen_attn(flat(q), keys, values, cu_seqlens, cu_seqlens, longest, longest, window_size=(-1, 0))
    return out.view(rows, length, heads * dim)  # [R, L, H * D]


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                    dropout_p: float) -> torch.Tensor:
    """Reference attention with explicit softmax (flash_attn=False): q [B, H, L, D], k/v [B, Hkv, S, D]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [B, H, S, D]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # [B, H, L, S]
    if is_causal:
        mask = causal_mask(q.shape[2], k.shape[2] - q.shape[2], q.device)[None, None]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.dropout(F.softmax(scores.float(), dim=-1).type_as(q), p=dropout_p)
    return probs @ v  # [B, H, L, D]


def positions(seq_len: int, past_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute query positions [L, 1] and key positions [1, past + L]."""
    q_pos = torch.arange(past_len, past_len + seq_len, device=device)[:, None]
    return q_pos, torch.arange(past_len + seq_len, device=device)[None, :]


def causal_mask(seq_len: int, past_len: int, device: torch.device) -> torch.Tensor:
    """bool [L, past + L]: query i (at absolute position past + i) may see keys 0 .. past + i."""
    q_pos, k_pos = positions(seq_len, past_len, device)
    return k_pos <= q_pos


def build_attention_mask(attention_mask: torch.Tensor | None, seq_len: int, past_len: int,
                         device: torch.device) -> torch.Tensor | None:
    """Turn the caller's mask into what `Attention` takes.

    attention_mask: None, a padding mask [B, past + L] (1 = token, 0 = padding), a ready bool/0-1 mask
    [B, 1, L, past + L], or a `PackedMask` (kept for CUDA, its boolean mask elsewhere). Returns None when plain causal
    attention is exact.
    """
    if isinstance(attention_mask, PackedMask):
        if past_len:
            raise ValueError("packed rows (PackedMask) cannot follow a KV cache")
        varlen = attention_mask.segment_ids.is_cuda and attention_mask.prefix_ids is None
        return attention_mask if varlen else attention_mask.dense()
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.bool()
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[1] != past_len + seq_len:
            raise ValueError(f"attention_mask must be [batch, past + new tokens] = [*, {past_len + seq_len}], "
                             f"got {list(attention_mask.shape)}")
        if bool(attention_mask.all()):
            attention_mask = None
    if attention_mask is None:  # no padding: SDPA's is_causal is exact unless new tokens follow a cache
        return causal_mask(seq_len, past_len, device)[None, None] if past_len > 0 and seq_len > 1 else None
    q_pos, k_pos = positions(seq_len, past_len, device)
    keys = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, S]
    # a padding query sees only itself, so no row is all -inf (no NaN); its output is never used
    return ((k_pos <= q_pos) & keys) | (k_pos == q_pos)  # [B, 1, L, S]
