"""The chunked loss (hidden states + head, supervised positions only, logits recomputed in backward) equals the plain
loss from full logits: value and gradients, in fp32 and under bf16 autocast."""

import pytest
import torch

from minimind_v.training.loss import chunked_summed_loss, summed_loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_equals_the_plain_loss(dtype):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 20, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 20))
    labels[:, :7] = -100  # a prompt without loss
    labels[1, 12:] = -100  # padding
    results = []
    for chunked in (False, True):
        head.zero_grad()
        hidden.grad = None
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = (chunked_summed_loss(hidden, head, labels, chunk=7) if chunked
                    else summed_loss(head(hidden), labels))
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), head.weight.grad.clone()))
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for plain, chunked in zip(*results):
        torch.testing.assert_close(chunked, plain, **tolerance)


def test_training_with_the_chunked_loss_reaches_the_same_weights(workspace, tmp_path):
    from helpers import args_for, weights
    from minimind_v.training.trainer import Trainer

    for chunked in (False, True):
        Trainer(args_for(workspace, "sft", tmp_path / str(chunked), chunked_loss=chunked, freeze=0,
                         max_steps=3)).run()
    plain, chunked = weights(tmp_path / "False"), weights(tmp_path / "True")
    for key in plain:
        torch.testing.assert_close(chunked[key], plain[key], atol=2e-5, rtol=1e-4)
