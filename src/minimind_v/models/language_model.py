"""MiniMind: the decoder-only language model (RMSNorm, RoPE, GQA, SwiGLU or MoE), Hugging Face-native.

    input_ids [B, L] -> embed_tokens -> dropout -> N x DecoderLayer -> norm -> lm_head -> logits [B, L, vocab]
    DecoderLayer: h = x + self_attn(input_layernorm(x)); out = h + mlp(post_attention_layernorm(h))

Key names follow Hugging Face (and the original MiniMind checkpoints): `model.embed_tokens`, `model.layers.{i}.
self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`, `input_layernorm`, `post_attention_layernorm`, `model.norm`,
`lm_head` (tied to the embedding by default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..config import IGNORE_INDEX, MiniMindVConfig
from .attention import Attention, build_attention_mask
from .mlp import MLP, MoEFeedForward, MoEGate
from .norm import RMSNorm
from .rope import RotaryEmbedding


@dataclass
class MiniMindOutput(CausalLMOutputWithPast):
    """logits [B, L', vocab]; loss: cross-entropy only (add `aux_loss` yourself, as the seed's loop does);
    aux_loss: MoE load-balancing loss (0 for dense models or in eval); hidden_states: final normed hidden [B, L, H]."""

    aux_loss: torch.FloatTensor | None = None


class DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MiniMindVConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoEFeedForward(config) if config.use_moe else MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: Cache | None) -> torch.Tensor:
        """x [B, L, H] -> [B, L, H]."""
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class MiniMindPreTrainedModel(PreTrainedModel):
    config_class = MiniMindVConfig
    config: MiniMindVConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MoEGate):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)


class MiniMindModel(MiniMindPreTrainedModel):
    """The transformer trunk: embeddings in, final normed hidden states out."""

    def __init__(self, config: MiniMindVConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                ) -> tuple[torch.Tensor, Cache | None, torch.Tensor]:
        """-> hidden [B, L, H], cache (or None), MoE aux loss (scalar)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # [B, L, H]
        bsz, seq_len = inputs_embeds.shape[:2]
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        past_key_values = self._cache(past_key_values, use_cache)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq_len, device=inputs_embeds.device)[None]  # [1, L]
        mask = build_attention_mask(attention_mask, seq_len, past_len, inputs_embeds.device)
        cos, sin = self.rotary_emb(position_ids, inputs_embeds.dtype)  # [B|1, 1, L, D]
        h = self.dropout(inputs_embeds)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, past_key_values)
        aux_loss = sum((layer.mlp.aux_loss for layer in self.layers if isinstance(layer.mlp, MoEFeedForward)),
                       h.new_zeros((), dtype=torch.float32))
        return self.norm(h), past_key_values, aux_loss

    def _cache(self, past_key_values: object, use_cache: bool) -> Cache | None:
        if past_key_values is None:
            return DynamicCache(config=self.config) if use_cache else None
        if not isinstance(past_key_values, Cache):
            raise TypeError("past_key_values must be a transformers Cache (as returned by a previous forward with "
                            f"use_cache=True), got {type(past_key_values).__name__}")
        return past_key_values


class MiniMindForCausalLM(MiniMindPreTrainedModel, GenerationMixin):
    """MiniMind with its language-model head; `forward(labels=...)` returns the shifted cross-entropy."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniMindVConfig):
        super().__init__(config)
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0, **kwargs) -> MiniMindOutput:
        hidden, cache, aux_loss = self.model(input_ids, attention_mask, position_ids, past_key_values,
                                             inputs_embeds, use_cache)
        return self._head(hidden, cache, aux_loss, labels, logits_to_keep)

    def _head(self, hidden: torch.Tensor, cache: Cache | None, aux_loss: torch.Tensor,
              labels: torch.LongTensor | None, logits_to_keep: int | torch.Tensor) -> MiniMindOutput:
        """hidden [B, L, H] -> logits of the kept positions [B, L', vocab] (+ loss when labels [B, L] are given)."""
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ValueError("labels need the logits of every position: call with logits_to_keep=0")
            loss = causal_lm_loss(logits, labels)
        return MiniMindOutput(loss=loss, logits=logits, past_key_values=cache, hidden_states=hidden,
                              aux_loss=aux_loss)


def causal_lm_loss(logits: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
    """Next-token cross-entropy: logits [B, L, V] at position t predict labels [B, L] at t + 1; -100 is ignored."""
    shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)
