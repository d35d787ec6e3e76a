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


# --- shared prefixes: one image's questions with the prompt and image once per row


@pytest.fixture
def questions_ws(workspace, tmp_path):
    """Three images, four different questions each (and one question whose image is alone)."""
    from helpers import COLORS, png
    from minimind_v.data.records import qa_conversations, write_parquet

    asks = [("what color is it?", None), ("is it red?", "yes"), ("describe it.", "a square"), ("is it?", "maybe")]
    rows = [(q, a or name, png(rgb)) for name, rgb in COLORS.items() for q, a in asks]
    rows.append(("what color is it?", "white", png((250, 250, 250))))
    write_parquet(str(tmp_path / "qa.parquet"), qa_conversations(rows))
    return {**workspace, "sft": str(tmp_path / "qa.parquet")}


def run_batch(trainer, batch, packed: bool):
    features = trainer.features(batch["images"], batch["image_keys"], trainer.model.device)
    mask = (PackedMask(batch["segment_ids"], batch["cu_seqlens"], None, batch.get("prefix_ids")) if packed
            else batch["attention_mask"])
    with torch.no_grad():
        out = trainer.model.eval()(input_ids=batch["input_ids"], attention_mask=mask,
                                   position_ids=batch.get("position_ids") if packed else None, image_features=features)
    return out.logits, summed_loss(out.logits, batch["labels"])


def test_shared_prefix_rows_give_every_sample_its_own_logits(questions_ws, tmp_path):
    trainer = Trainer(args_for(questions_ws, "sft", tmp_path, max_seq_len=96, packing=True, share_prefix=4))
    pad, samples = trainer.tokenizer.pad_token_id, [trainer.dataset[i] for i in range(len(trainer.dataset))]
    shared, padded = pack(samples, 96, pad, share_prefix=True), collate(samples, pad)
    assert len(shared["image_keys"]) < len(samples) and len(shared["image_keys"]) >= 4  # images once per unit
    assert int(shared["token_mask"].sum()) < int(padded["attention_mask"].sum())  # the starts computed once
    assert (shared["prefix_ids"] >= 0).any()
    (logits, loss), (plain_logits, plain_loss) = run_batch(trainer, shared, True), run_batch(trainer, padded, False)
    torch.testing.assert_close(loss, plain_loss, atol=1e-4, rtol=1e-5)
    # every supervised token's logits, in the shared rows and alone (the samples' order differs: match by loss)
    rows = []
    for out, batch in ((logits, shared), (plain_logits, padded)):
        chosen = batch["labels"][:, 1:] != -100
        scores, targets = out[:, :-1][chosen], batch["labels"][:, 1:][chosen]  # [answer tokens, V], [tokens]
        order = torch.argsort(F.cross_entropy(scores, targets, reduction="none"))
        rows.append((scores[order], targets[order]))
    assert torch.equal(rows[0][1], rows[1][1])
    torch.testing.assert_close(rows[0][0], rows[1][0], atol=1e-4, rtol=1e-4)


def test_shared_units_respect_rows_and_starts(questions_ws, tmp_path):
    from minimind_v.data.batching import shared_units

    trainer = Trainer(args_for(questions_ws, "sft", tmp_path, max_seq_len=96, packing=True, share_prefix=4))
    samples = [trainer.dataset[i] for i in range(len(trainer.dataset))]
    units = shared_units(samples, 96)
    assert sorted(i for _, members in units for i in members) == list(range(len(samples)))
    for p, members in units:
        assert p + sum(len(samples[i].input_ids) - p for i in members) <= 96
        if p:  # a shared start holds the image and stops before any answer
            assert len({tuple(samples[i].image_keys) for i in members}) == 1 and len(members) > 1
            assert all(samples[i].shareable[0] <= p <= samples[i].shareable[1] for i in members)
            assert len({tuple(samples[i].input_ids[:p]) for i in members}) == 1
    tight = shared_units(samples, 40)  # small rows: a group splits into units that fit
    assert all(p + sum(len(samples[i].input_ids) - p for i in m) <= 40 for p, m in tight if p)
    alone = [i for p, members in units if not p for i in members]
    assert len(samples) - 1 in alone  # the image asked about once


def test_grouped_steps_keep_an_images_samples_together():
    from minimind_v.training.optim import image_chunks, step_batches

    groups = [i // 4 for i in range(40)]
    steps = step_batches(40, 3, 0, 8, groups)
    assert steps == step_batches(40, 3, 0, 8, groups) and steps != step_batches(40, 3, 1, 8, groups)
    assert sorted(i for step in steps for i in step) == list(range(40))
    assert all(len({groups[i] for i in step}) == 2 for step in steps)  # two whole groups of four a step
    assert [groups[i] for step in steps for i in step] != sorted(groups)  # the groups' order is shuffled
    chunks = image_chunks([0, 1, 0, 0, 1, 0, 2], 2)  # group 0's samples two at a time
    assert chunks == [0, 1, 0, 2, 1, 2, 3]


def test_training_with_shared_prefixes(questions_ws, tmp_path):
    with pytest.raises(ValueError, match="leave out --no-packing"):
        Trainer(args_for(questions_ws, "sft", tmp_path / "x", packing=False, share_prefix=4))
    with pytest.raises(ValueError, match="at least 0"):
        Trainer(args_for(questions_ws, "sft", tmp_path / "x", packing=True, share_prefix=-1))
    summary = Trainer(args_for(questions_ws, "sft", tmp_path / "y", packing=True, share_prefix=4, max_seq_len=96,
                               batch_size=4, max_steps=3)).run()
    assert summary["steps"] == 3 and summary["loss"] > 0


def test_packing_is_on_by_default_where_a_packed_batch_is_one_varlen_row(workspace, tmp_path, clip_dir):
    """Unset, --packing follows the device: on for MiniMind on a GPU in half precision (one row of variable-length
    attention) and with --share-prefix; off on a CPU; given, as given; --no-packing with --share-prefix is an error."""
    from minimind_v import MiniMindVLM
    from minimind_v.cli import build_parser
    from minimind_v.training.trainer import check_args, resolve_packing
    from helpers import tiny_config

    model = MiniMindVLM(tiny_config(), vision_model_path=clip_dir)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    args = lambda **kw: args_for(workspace, "sft", tmp_path, **kw)  # noqa: E731
    assert resolve_packing(args(), model, cuda, torch.bfloat16) is True
    assert resolve_packing(args(), model, cuda, torch.float32) is False  # fp32: masked rows, not varlen
    assert resolve_packing(args(), model, cpu, torch.float32) is False
    assert resolve_packing(args(share_prefix=4), model, cpu, torch.float32) is True
    assert resolve_packing(args(packing=False), model, cuda, torch.bfloat16) is False
    assert resolve_packing(args(packing=True), model, cpu, torch.float32) is True
    with pytest.raises(ValueError, match="leave out --no-packing"):
        check_args(args(packing=False, share_prefix=4))
    parse = lambda *flags: build_parser().parse_args(["train", "sft", *flags])  # noqa: E731
    assert parse().packing is None and parse("--packing").packing is True and parse("--no-packing").packing is False
    trainer = Trainer(args(max_steps=1, overwrite=True))  # a CPU run records what it resolved
    assert trainer.packing is False and json.load(open(tmp_path / "run.json"))["packing"] is False
