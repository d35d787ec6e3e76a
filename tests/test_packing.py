"""Sequence packing: a packed row gives every sample the logits it gets alone, the same summed loss, and training
with packing reaches the weights of training without it."""

import functools

import torch

from conftest import args_for, weights
from minimind_v.data.datasets import collate
from minimind_v.data.packing import first_fit, pack, packed_attention_mask
from minimind_v.training.loss import summed_loss
from minimind_v.training.trainer import Trainer


def test_first_fit_fills_rows_without_overflow():
    lengths = [50, 10, 40, 30, 20, 60, 5]
    rows = first_fit(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows) and len(rows) == 4


def test_packed_rows_equal_padded_samples(workspace, tmp_path):
    trainer = Trainer(args_for(workspace, "sft", tmp_path, max_seq_len=64))
    model, pad = trainer.model.eval(), trainer.tokenizer.pad_token_id
    samples = [trainer.dataset[i] for i in range(7)]
    padded, packed = collate(samples, pad), pack(samples, 128, pad)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # fewer rows
    assert int(packed["token_mask"].sum()) == int(padded["attention_mask"].sum())
    outputs = {}
    with torch.no_grad():
        for name, batch in (("padded", padded), ("packed", packed)):
            features = trainer.features(batch["images"], batch["image_keys"], model.device)
            mask = packed_attention_mask(batch["segment_ids"]) if name == "packed" else batch["attention_mask"]
            out = model(input_ids=batch["input_ids"], attention_mask=mask,
                        position_ids=batch.get("position_ids") if name == "packed" else None,
                        image_features=features)
            outputs[name] = (out.logits, summed_loss(out.logits, batch["labels"]))
    torch.testing.assert_close(outputs["packed"][1], outputs["padded"][1], atol=1e-4, rtol=1e-5)
    real = outputs["padded"][0][padded["attention_mask"].bool()]  # [tokens, V], sample by sample
    lengths = padded["attention_mask"].sum(1).tolist()
    starts = {}  # sample index -> (row, column) of its first token in the packed batch
    for r, row in enumerate(first_fit(lengths, 128)):
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
        torch.testing.assert_close(packed[key], plain[key], atol=2e-5, rtol=1e-4)
