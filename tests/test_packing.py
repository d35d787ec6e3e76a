"""Sequence packing: a packed row gives every sample the logits it gets alone, the same summed loss, and training
with packing reaches the weights of training without it."""

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import args_for, weights
from minimind_v.data.batching import collate
from minimind_v.data.batching import first_fit, pack
from minimind_v.models import attention
from minimind_v.models.attention import PackedMask, packed_attention
from minimind_v.training.loss import summed_loss
from minimind_v.training.trainer import Trainer


def test_first_fit_fills_rows_without_overflow():
    lengths = [50, 10, 40, 30, 20, 60, 5]
    rows = first_fit(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows) and len(rows) == 4


@pytest.mark.parametrize("one_row", [False, True])
def test_packed_rows_equal_padded_samples(workspace, tmp_path, one_row):
    trainer = Trainer(args_for(workspace, "sft", tmp_path, max_seq_len=64))
    model, pad = trainer.model.eval(), trainer.tokenizer.pad_token_id
    samples = [trainer.dataset[i] for i in range(7)]
    padded, packed = collate(samples, pad), pack(samples, 128, pad, one_row=one_row)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # fewer rows
    if one_row:  # every sample in one row, padded to a multiple of 64 only
        total = int(padded["attention_mask"].sum())
        assert packed["input_ids"].shape == (1, -(-total // 64) * 64)
    assert int(packed["token_mask"].sum()) == int(padded["attention_mask"].sum())
    outputs = {}
    with torch.no_grad():
        for name, batch in (("padded", padded), ("packed", packed)):
            features = trainer.features(batch["images"], batch["image_keys"], model.device)
            mask = (PackedMask(batch["segment_ids"], batch["cu_seqlens"]) if name == "packed"
                    else batch["attention_mask"])
            out = model(input_ids=batch["input_ids"], attention_mask=mask,
                        position_ids=batch.get("position_ids") if name == "packed" else None,
                        image_features=features)
            outputs[name] = (out.logits, summed_loss(out.logits, batch["labels"]))
    torch.testing.assert_close(outputs["packed"][1], outputs["padded"][1], atol=1e-4, rtol=1e-5)
    real = outputs["padded"][0][padded["attention_mask"].bool()]  # [tokens, V], sample by sample
    lengths = padded["attention_mask"].sum(1).tolist()
    starts = {}  # sample index -> (row, column) of its first token in the packed batch
    for r, row in enumerate(first_fit(lengths, packed["input_ids"].shape[1])):  # where pack put each sample
        column = 0
        for i in row:
            starts[i], column = (r, column), column + lengths[i]
    offset = 0
    for i, n in enumerate(lengths):
        r, c = starts[i]
        torch.testing.assert_close(outputs["packed"][0][r, c:c + n], real[offset:offset + n], atol=1e-4, rtol=1e-4)
        offset += n


def test_training_with_packing_reaches_the_same_weights(workspace, tmp_path):
    for packing in (False, True):
        Trainer(args_for(workspace, "sft", tmp_path / str(packing), packing=packing, max_seq_len=128, max_steps=3,
                         freeze=0)).run()
    plain, packed = weights(tmp_path / "False"), weights(tmp_path / "True")
    for key in plain:
        torch.testing.assert_close(packed[key], plain[key], atol=5e-5, rtol=1e-4)  # summation order differs by CPU


def test_cu_seqlens_cut_the_flat_rows_into_the_segments(workspace, tmp_path):
    trainer = Trainer(args_for(workspace, "sft", tmp_path, max_seq_len=64))
    batch = pack([trainer.dataset[i] for i in range(7)], 128, trainer.tokenizer.pad_token_id)
    flat, bounds = batch["segment_ids"].flatten(), batch["cu_seqlens"].tolist()
    rows = batch["segment_ids"].shape[0]
    assert batch["cu_seqlens"].dtype == torch.int32 and bounds[0] == 0 and bounds[-1] == rows * 128
    for start, end in zip(bounds, bounds[1:]):  # each segment: one sample (or one padding tail), within one row
        assert end > start and start // 128 == (end - 1) // 128 and len(set(flat[start:end].tolist())) == 1
    changes = {0} | {i for i in range(1, rows * 128) if flat[i] != flat[i - 1] or i % 128 == 0}
    assert set(bounds[:-1]) == changes
    assert len(bounds) - 1 == len(batch["lengths"]) + sum(int((row < 0).any()) for row in batch["segment_ids"])


def packed_qkv(device, dtype):
    """Two rows of 96 positions holding segments (30, 50, pad 16) and (96): q [2, 8, 96, 32], k/v [2, 4, 96, 32]."""
    segment = torch.full((2, 96), -1)
    segment[0, :30], segment[0, 30:80], segment[1] = 0, 1, 0
    cu = torch.tensor([0, 30, 80, 96, 192], dtype=torch.int32, device=device)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, 96, 32, generator=gen).to(device, dtype).requires_grad_()
               for heads in (8, 4, 4))
    return PackedMask(segment.to(device), cu), q, k, v


@pytest.mark.skipif(not torch.cuda.is_available(), reason="variable-length FlashAttention runs on CUDA")
def test_varlen_attention_equals_the_block_diagonal_mask():
    mask, q, k, v = packed_qkv("cuda", torch.bfloat16)
    out = packed_attention(q, k, v, mask.cu_seqlens)  # [2, 96, 256]
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(), enable_gqa=True)  # [2, 8, 96, 32]
    reference = reference.transpose(1, 2).reshape(2, 96, 256)
    torch.testing.assert_close(out, reference, atol=2e-2, rtol=2e-2)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    expected = torch.autograd.grad(reference.float().square().sum(), (q, k, v))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_packed_training_tracks_padded_training_in_bf16(workspace, tmp_path, device, monkeypatch):
    """bf16 autocast: on CUDA the packed samples run as one row through variable-length FlashAttention, on the CPU
    as rows through the block-diagonal mask; either way the losses follow the padded run's."""
    calls = []
    monkeypatch.setattr(attention, "packed_attention", lambda *a: calls.append(1) or packed_attention(*a))
    curves = []
    for packing in (False, True):
        out = tmp_path / str(packing)
        trainer = Trainer(args_for(workspace, "sft", out, packing=packing, max_seq_len=128, max_steps=4, freeze=0,
                                   device=device, dtype="bf16", feature_cache=None))
        assert trainer.one_row == (packing and device == "cuda")
        trainer.run()
        curves.append([r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r])
    assert curves[1] == pytest.approx(curves[0], rel=0.02) and curves[1][-1] < curves[1][0]
    assert len(calls) == (4 * 3 if device == "cuda" else 0)  # steps x layers, every packed step through varlen


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_packed_training_equals_eager(workspace, tmp_path, device):
    """torch.compile (dynamic row counts) over packed rows: the eager run's losses (on CUDA: FlashAttention varlen
    inside the compiled graph)."""
    curves = []
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        Trainer(args_for(workspace, "sft", out, packing=True, compile=compiled, max_seq_len=128, max_steps=3,
                         freeze=0, device=device, dtype="bf16" if device == "cuda" else "fp32",
                         feature_cache=None)).run()
        curves.append([r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r])
    assert curves[1] == pytest.approx(curves[0], rel=1e-2 if device == "cuda" else 1e-4)
