"""The MiniMind language model: attention against a naive reference, cache, padding, MoE, RoPE, loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from minimind_v import MiniMindForCausalLM, MiniMindVConfig
from minimind_v.models.attention import Attention, build_attention_mask
from minimind_v.models.mlp import MoEFeedForward
from minimind_v.models.rope import RotaryEmbedding, inverse_frequencies


def lm(seed=0, **overrides):
    torch.manual_seed(seed)
    base = dict(vocab_size=300, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                intermediate_size=96)
    return MiniMindForCausalLM(MiniMindVConfig(**{**base, **overrides})).eval()


def naive_attention(attn: Attention, x, positions, key_padding=None):
    """Textbook causal GQA attention written independently of the module's code path."""
    b, l, _ = x.shape
    h, hk, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(b, l, h, d)
    k = attn.k_proj(x).view(b, l, hk, d)
    v = attn.v_proj(x).view(b, l, hk, d)
    inv = 1.0 / (attn_theta(attn) ** (torch.arange(0, d, 2).float() / d))
    ang = positions[..., None].float() * inv  # [B, L, D/2]
    cos, sin = ang.cos(), ang.sin()

    def rope(t):  # rotate pairs (i, i + d/2)
        t1, t2 = t[..., : d // 2], t[..., d // 2:]
        c, s = cos[:, :, None], sin[:, :, None]
        return torch.cat([t1 * c - t2 * s, t2 * c + t1 * s], dim=-1)

    q, k = rope(q), rope(k)
    out = torch.zeros(b, l, h, d)
    for head in range(h):
        kv = head // (h // hk)
        scores = torch.einsum("bid,bjd->bij", q[:, :, head], k[:, :, kv]) / math.sqrt(d)
        allowed = torch.ones(l, l).tril().bool()[None].expand(b, l, l).clone()
        if key_padding is not None:
            allowed &= key_padding[:, None, :].bool()
            allowed |= torch.eye(l, dtype=torch.bool)[None]
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, :, head] = torch.einsum("bij,bjd->bid", scores.softmax(-1), v[:, :, kv])
    return attn.o_proj(out.reshape(b, l, h * d))


def attn_theta(attn):
    return 1e6


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (4, 1), (8, 2)])
@pytest.mark.parametrize("flash", [True, False])
def test_gqa_attention_matches_naive_reference(heads, kv_heads, flash):
    torch.manual_seed(0)
    config = MiniMindVConfig(hidden_size=64, num_attention_heads=heads, num_key_value_heads=kv_heads,
                             flash_attn=flash)
    attn, rotary = Attention(config, 0).eval(), RotaryEmbedding(config)
    x = torch.randn(2, 7, 64)
    positions = torch.arange(7)[None].expand(2, 7)
    cos, sin = rotary(positions, x.dtype)
    torch.testing.assert_close(attn(x, cos, sin, None, None), naive_attention(attn, x, positions), atol=1e-5,
                               rtol=1e-4)
    padding = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    mask = build_attention_mask(padding, 7, 0, x.device)
    torch.testing.assert_close(attn(x, cos, sin, mask, None), naive_attention(attn, x, positions, padding),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True}, {"use_moe": True, "n_shared_experts": 1},
                                       {"flash_attn": False}])
def test_kv_cache_decoding_equals_full_recompute(overrides):
    model = lm(**overrides)
    ids = torch.randint(3, 300, (2, 12))
    full = model(ids, use_cache=False).logits
    out = model(ids[:, :5], use_cache=True)
    steps = [out.logits]
    cache = out.past_key_values
    for t in range(5, 12):
        out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    # chunked prefill on top of a cache needs an offset causal mask, not SDPA's top-left is_causal
    first = model(ids[:, :4], use_cache=True)
    rest = model(ids[:, 4:], past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], dim=1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sample_alone(side):
    model = lm(qk_norm=True)
    a, b = torch.randint(3, 300, (1, 9)), torch.randint(3, 300, (1, 5))
    pad = torch.zeros(1, 4, dtype=torch.long)
    b_padded = torch.cat([pad, b], 1) if side == "left" else torch.cat([b, pad], 1)
    mask_b = (b_padded != 0).long() if side == "left" else torch.cat([torch.ones(1, 5), torch.zeros(1, 4)], 1).long()
    batch = model(torch.cat([a, b_padded]), attention_mask=torch.cat([torch.ones(1, 9, dtype=torch.long), mask_b]))
    assert torch.isfinite(batch.logits).all()
    torch.testing.assert_close(batch.logits[0], model(a).logits[0], atol=1e-5, rtol=1e-4)
    real = slice(4, None) if side == "left" else slice(0, 5)
    torch.testing.assert_close(batch.logits[1, real], model(b).logits[0], atol=1e-5, rtol=1e-4)


def test_left_padded_cached_decoding_equals_single():
    model = lm()
    a, b = torch.randint(3, 300, (1, 6)), torch.randint(3, 300, (1, 3))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    out = model(ids, attention_mask=mask, use_cache=True)
    nxt = torch.tensor([[7], [8]])
    mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    step = model(nxt, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True).logits
    alone = model(torch.cat([b, torch.tensor([[8]])], 1)).logits[:, -1]
    torch.testing.assert_close(step[1], alone, atol=1e-5, rtol=1e-4)


def test_attention_mask_with_wrong_length_is_a_clear_error():
    model = lm()
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(torch.ones(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 4, dtype=torch.long))


def test_past_key_values_must_be_a_cache():
    model = lm()
    with pytest.raises(TypeError, match="Cache"):
        model(torch.ones(1, 2, dtype=torch.long), past_key_values=[(torch.zeros(1), torch.zeros(1))])


def test_logits_to_keep_and_loss_ignore_index():
    model = lm()
    ids = torch.randint(3, 300, (2, 10))
    full = model(ids).logits
    torch.testing.assert_close(model(ids, logits_to_keep=1).logits, full[:, -1:])
    labels = ids.clone()
    labels[:, :4] = -100
    loss = model(ids, labels=labels).loss
    expected = F.cross_entropy(full[:, 3:-1].reshape(-1, 300), ids[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="logits_to_keep=0"):
        model(ids, labels=ids, logits_to_keep=1)


def test_tied_embeddings_and_dropout():
    model = lm(dropout=0.5)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(3, 300, (1, 8))
    torch.testing.assert_close(model(ids).logits, model(ids).logits)  # eval: deterministic
    model.train()
    assert not torch.allclose(model(ids).logits, model(ids).logits)
    untied = lm(tie_word_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(3, 300, (2, 8))
    grads = []
    for checkpointing in (False, True):
        model = lm().train()
        if checkpointing:  # the method's name from transformers 5.23 on, and before
            enable = "activation_checkpointing_enable" if hasattr(model, "activation_checkpointing_enable") else \
                "gradient_checkpointing_enable"
            getattr(model, enable)()
        model(ids, labels=ids).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


# --- MoE ---

def naive_moe(moe: MoEFeedForward, x):
    out = torch.zeros_like(x)
    flat = x.reshape(-1, x.shape[-1])
    scores = F.linear(flat, moe.gate.weight).softmax(-1)
    for t in range(flat.shape[0]):
        w, idx = scores[t].topk(moe.gate.top_k)
        if moe.gate.renormalise:
            w = w / w.sum()
        y = sum(wi * moe.experts[int(i)](flat[t]) for wi, i in zip(w, idx))
        y = y + sum(e(flat[t]) for e in moe.shared_experts)
        out.view(-1, x.shape[-1])[t] = y
    return out


@pytest.mark.parametrize("k, shared, renorm", [(1, 0, False), (2, 1, True), (2, 2, False), (3, 0, True)])
def test_moe_output_equals_per_token_reference(k, shared, renorm):
    torch.manual_seed(0)
    config = MiniMindVConfig(hidden_size=32, num_attention_heads=4, intermediate_size=48, use_moe=True,
                             num_experts_per_token=k, n_routed_experts=4, n_shared_experts=shared,
                             norm_topk_prob=renorm)
    moe = MoEFeedForward(config).eval()
    torch.nn.init.normal_(moe.gate.weight, std=1.0)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(moe(x), naive_moe(moe, x), atol=1e-5, rtol=1e-4)
    moe.train()  # training computes the same function (and keeps idle experts in the graph)
    torch.testing.assert_close(moe(x), naive_moe(moe, x), atol=1e-5, rtol=1e-4)


def test_moe_routing_weights_and_top1_renormalisation():
    torch.manual_seed(0)
    base = dict(hidden_size=32, num_attention_heads=4, use_moe=True, n_routed_experts=4)
    x = torch.randn(1, 6, 32)
    idx, w, _ = MoEFeedForward(MiniMindVConfig(**base, num_experts_per_token=2)).gate(x)
    assert idx.shape == (6, 2) and torch.allclose(w.sum(-1), torch.ones(6))
    _, w1, _ = MoEFeedForward(MiniMindVConfig(**base, num_experts_per_token=1)).gate(x)
    assert (w1 < 1).all()  # k = 1: the softmax probability, as MiniMind2-V
    _, w1r, _ = MoEFeedForward(MiniMindVConfig(**base, num_experts_per_token=1, moe_renorm_top1=True)).gate(x)
    assert torch.allclose(w1r, torch.ones_like(w1r))  # minimind-3v renormalises even k = 1


@pytest.mark.parametrize("seq_aux", [True, False])
def test_moe_aux_loss_matches_formula(seq_aux):
    torch.manual_seed(0)
    config = MiniMindVConfig(hidden_size=32, num_attention_heads=4, use_moe=True, n_routed_experts=4,
                             num_experts_per_token=2, aux_loss_alpha=0.1, seq_aux=seq_aux)
    gate = MoEFeedForward(config).gate.train()
    x = torch.randn(3, 7, 32)
    idx, _, aux = gate(x)
    scores = F.linear(x.reshape(-1, 32), gate.weight).softmax(-1)
    if seq_aux:
        counts = F.one_hot(idx.view(3, -1), 4).sum(1).float()  # [B, E] choices per expert per sequence
        load = counts / (7 * 2 / 4)
        expected = (load * scores.view(3, 7, 4).mean(1)).sum(1).mean() * 0.1
    else:
        fraction = F.one_hot(idx.view(-1), 4).float().mean(0)
        expected = (scores.mean(0) * fraction * 4).sum() * 0.1
    torch.testing.assert_close(aux, expected)
    assert aux > 0
    gate.eval()
    assert gate(x)[2] == 0


def test_moe_model_aux_loss_is_returned_and_trains_every_expert():
    model = lm(use_moe=True, n_routed_experts=4, num_experts_per_token=1, aux_loss_alpha=0.01).train()
    ids = torch.randint(3, 300, (2, 6))
    out = model(ids, labels=ids)
    assert out.aux_loss > 0
    (out.loss + out.aux_loss).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert lm(use_moe=True).eval()(ids).aux_loss == 0
    assert lm()(ids).aux_loss == 0


# --- RoPE ---

def test_rope_scores_depend_only_on_relative_position():
    config = MiniMindVConfig(hidden_size=64, num_attention_heads=4)
    rotary = RotaryEmbedding(config)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    from minimind_v.models.rope import apply_rotary

    def score(pq, pk):
        cq, sq = rotary(torch.tensor([[pq]]), torch.float32)
        ck, sk = rotary(torch.tensor([[pk]]), torch.float32)
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    torch.testing.assert_close(score(5, 2), score(105, 102), atol=1e-4, rtol=1e-4)


def test_yarn_scaling_changes_only_low_frequencies():
    plain, _ = inverse_frequencies(MiniMindVConfig(hidden_size=512, num_attention_heads=8))
    yarn, factor = inverse_frequencies(MiniMindVConfig(hidden_size=512, num_attention_heads=8,
                                                       inference_rope_scaling=True))
    assert factor == 1.0
    assert torch.equal(yarn[:4], plain[:4])  # fast-turning pairs untouched
    torch.testing.assert_close(yarn[-1], plain[-1] / 16)  # slowest pair stretched by the factor
    model = lm(inference_rope_scaling=True, max_position_embeddings=32768)
    assert torch.isfinite(model(torch.randint(3, 300, (1, 8))).logits).all()


def test_packed_row_with_block_diagonal_mask_equals_separate_samples():
    """The attention takes a ready 4D mask and per-sample positions, which is all sequence packing needs."""
    model = lm(qk_norm=True)
    a, b = torch.randint(3, 300, (1, 5)), torch.randint(3, 300, (1, 4))
    packed = torch.cat([a, b], dim=1)  # [1, 9]: two samples in one row
    segment = torch.tensor([0] * 5 + [1] * 4)
    causal = torch.ones(9, 9).tril().bool()
    mask = (causal & (segment[:, None] == segment[None, :]))[None, None]  # block-diagonal causal [1, 1, 9, 9]
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    out = model(packed, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(out[:, :5], model(a).logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[:, 5:], model(b).logits, atol=1e-5, rtol=1e-4)
