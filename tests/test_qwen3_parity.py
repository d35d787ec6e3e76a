"""MiniMind's dense language model with q/k RMSNorm computes exactly what transformers' own Qwen3 computes.

A tiny MiniMind (GQA 4/2 heads, head_dim 16, q/k RMSNorm) and a `Qwen3ForCausalLM` of the same sizes share one state
dict (the key names are identical and neither model has attention biases). Every weight is randomised, the norm
weights included, and the scales are chosen so that the logits are O(1) and `rms_norm_eps` (0.05, larger than usual on
purpose) visibly changes them: a difference in RoPE layout, norm placement or eps handling would show well above the
1e-5 tolerance (`test_the_comparison_detects_a_changed_norm` checks that it does). fp32, CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from minimind_v import MiniMindVConfig
from minimind_v.models.language_model import MiniMindForCausalLM

SIZES = dict(vocab_size=97, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
             intermediate_size=128, rms_norm_eps=0.05, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)
THETA = 1000.0
TOL = dict(atol=1e-5, rtol=1e-5)


def randomise(model: MiniMindForCausalLM, seed: int = 0) -> None:
    """Norm weights in [0.5, 1.5], linear weights ~ N(0, 1/fan_in), embeddings ~ N(0, 1/hidden): O(1) logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(0.5 + torch.rand(param.shape, generator=gen))
            else:
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[1]))


def build_pair(tie: bool) -> tuple[MiniMindForCausalLM, Qwen3ForCausalLM]:
    """The MiniMind model (random weights) and a Qwen3 model loaded from its state dict, both in eval mode."""
    sizes = dict(SIZES, tie_word_embeddings=tie)
    minimind = MiniMindForCausalLM(MiniMindVConfig(**sizes, qk_norm=True, rope_theta=THETA))
    qwen3 = Qwen3ForCausalLM(Qwen3Config(**sizes, head_dim=16, rope_parameters={"rope_type": "default",
                                                                                 "rope_theta": THETA}))
    assert minimind.config.head_dim == qwen3.config.head_dim == 16
    randomise(minimind)
    qwen3.load_state_dict(minimind.state_dict(), strict=True)  # identical key names: no mapping needed
    return minimind.eval(), qwen3.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, and stays fast when other processes busy the cores (with two
    threads, every small op waits for the other thread: the generate tests went from 0.02 s to 5 s under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def pair(request) -> tuple[MiniMindForCausalLM, Qwen3ForCausalLM]:
    return build_pair(tie=request.param)


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """ids [3, 12] and their padding mask: row 0 full, row 1 right-padded (8 tokens), row 2 left-padded (8)."""
    ids = torch.randint(3, SIZES["vocab_size"], (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, :4] = 0
    return ids, mask


def test_state_dicts_have_the_same_keys_shapes_and_no_biases(pair):
    """The two implementations store the same tensors under the same names, so the copy is complete and exact."""
    minimind, qwen3 = pair
    ours, theirs = minimind.state_dict(), qwen3.state_dict()
    assert set(ours) == set(theirs)
    assert not any(key.endswith(".bias") for key in ours)
    assert {"model.layers.1.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight"} <= set(ours)
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key
    tied = minimind.config.tie_word_embeddings
    assert (minimind.lm_head.weight is minimind.model.embed_tokens.weight) == tied
    assert (qwen3.lm_head.weight is qwen3.model.embed_tokens.weight) == tied


@torch.no_grad()
def test_logits_match_on_a_padded_batch(pair):
    """Same logits with and without a padding mask, at every real (unpadded) position, right or left padding."""
    minimind, qwen3 = pair
    ids, mask = padded_batch()
    torch.testing.assert_close(minimind(ids).logits, qwen3(ids).logits, **TOL)
    ours, theirs = minimind(ids, attention_mask=mask).logits, qwen3(ids, attention_mask=mask).logits
    real = mask.bool()  # padded positions' outputs are never used (and the two fill them differently)
    torch.testing.assert_close(ours[real], theirs[real], **TOL)
    assert ours.abs().max() > 1.0  # O(1) logits: the tolerance is tight relative to them


@torch.no_grad()
def incremental_logits(model, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Prefill 5 tokens, then a chunk of 3, then one token at a time -> logits [1, L, V] and the cache length."""
    out = model(ids[:, :5], use_cache=True)
    cache, parts = out.past_key_values, [out.logits]
    for start, stop in [(5, 8)] + [(i, i + 1) for i in range(8, ids.shape[1])]:
        parts.append(model(ids[:, start:stop], past_key_values=cache, use_cache=True).logits)
    return torch.cat(parts, dim=1), cache.get_seq_length()


@torch.no_grad()
def test_kv_cache_decoding_matches_the_full_forward(pair):
    """Chunked and token-by-token decoding through the KV cache gives the full forward's logits, in both models."""
    minimind, qwen3 = pair
    ids = padded_batch()[0][:1]  # [1, 12]
    full = qwen3(ids).logits
    for model in (minimind, qwen3):
        logits, cached = incremental_logits(model, ids)
        assert cached == ids.shape[1]
        torch.testing.assert_close(logits, full, **TOL)


@torch.no_grad()
def test_greedy_generate_gives_the_same_tokens(pair):
    """`generate` (greedy, 10 new tokens, a left-padded batch of 2) picks the same tokens from the same logits."""
    minimind, qwen3 = pair
    prompt = torch.randint(3, SIZES["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    runs = [model.generate(prompt, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                           return_dict_in_generate=True, output_logits=True) for model in (minimind, qwen3)]
    assert runs[0].sequences.shape == (2, 6 + 10)
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert len(runs[0].logits) == len(runs[1].logits) == 10
    for ours, theirs in zip(runs[0].logits, runs[1].logits):
        torch.testing.assert_close(ours, theirs, **TOL)


@torch.no_grad()
def test_the_comparison_detects_a_changed_norm():
    """The setup is sensitive: changing one q_norm weight, or the eps of one k_norm, moves the logits well past TOL."""
    minimind, qwen3 = build_pair(tie=False)
    ids = padded_batch()[0]
    reference = minimind(ids).logits
    qwen3.model.layers[0].self_attn.q_norm.weight[0] += 0.1
    assert (qwen3(ids).logits - reference).abs().max() > 1e-3
    qwen3.load_state_dict(minimind.state_dict())
    torch.testing.assert_close(qwen3(ids).logits, reference, **TOL)
    qwen3.model.layers[1].self_attn.k_norm.variance_epsilon = 1e-6
    assert (qwen3(ids).logits - reference).abs().max() > 1e-3
