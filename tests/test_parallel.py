"""Training over several processes with sharded weights (`--parallel fsdp`, Gloo on the CPU): the same weights as one
process, checkpoints with sharded optimizer state that one process resumes (and the other way round), a model folder
every command loads, two "nodes" meeting through a c10d rendezvous, a failing process stopping the run."""

import json
import os
import time

import pytest
import torch

from helpers import args_for, torchrun, weights
from minimind_v.build import load_model
from minimind_v.training.trainer import Trainer
from test_backbone import hf_args, save_backbone
from test_train import run_until_crash

COMMON = dict(epochs=1, freeze=0, max_steps=4, feature_cache=None)


def losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def one_process(workspace, tmp_path_factory):
    """The plain run every sharded run must reproduce: 1 process, micro-batch 4 x accumulation 2."""
    out = tmp_path_factory.mktemp("one")
    Trainer(args_for(workspace, "sft", out, batch_size=4, grad_accum=2, **COMMON)).run()
    return out


def test_fsdp_on_two_processes_equals_one_process(workspace, one_process, tmp_path):
    out = tmp_path / "fsdp"
    result, = torchrun(args_for(workspace, "sft", out, batch_size=4, grad_accum=1, parallel="fsdp", **COMMON),
                       tmp_path)
    assert_same_weights(weights(one_process), weights(out))
    assert losses(out) == pytest.approx(losses(one_process), rel=1e-4)
    checkpoint = out / "checkpoints" / "step-000004"
    shards = sorted(os.listdir(checkpoint / "optimizer"))
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each process wrote its own shard
    assert "destroy_process_group" not in result.stderr  # the processes left the group
    model, _ = load_model(str(out / "model"))  # an ordinary model folder (what chat and eval load)
    assert_same_weights(weights(out), {k: v for k, v in model.checkpoint_state_dict().items()})


def test_sharded_checkpoints_resume_on_another_number_of_processes(workspace, one_process, tmp_path, monkeypatch):
    """FSDP on 2 processes fails at step 4 (rank 1) after the step-2 checkpoint; 1 process resumes from the sharded
    optimizer state. Then the other way: a 1-process run's checkpoint resumed by FSDP on 2 processes."""
    kw = dict(COMMON, save_every=2)
    out = tmp_path / "to-one"
    started = time.time()
    failed, = torchrun(args_for(workspace, "sft", out, batch_size=4, grad_accum=1, parallel="fsdp", **kw), tmp_path,
                       crash=(4, 1), check=False)
    assert failed.returncode != 0 and "injected failure at step 4 in rank 1" in failed.stderr
    assert time.time() - started < 120  # the other process did not wait for the failed one
    resumed = Trainer(args_for(workspace, "sft", out, batch_size=4, grad_accum=2, parallel="fsdp", resume=True, **kw))
    assert resumed.step == 2
    resumed.run()
    assert_same_weights(weights(one_process), weights(out))
    out = tmp_path / "to-two"
    run_until_crash(Trainer(args_for(workspace, "sft", out, batch_size=4, grad_accum=2, **kw)), 3, monkeypatch)
    torchrun(args_for(workspace, "sft", out, batch_size=4, grad_accum=1, parallel="fsdp", resume=True, **kw),
             tmp_path)
    assert_same_weights(weights(one_process), weights(out))


def test_two_nodes_meet_through_a_rendezvous(workspace, one_process, tmp_path):
    """`torchrun --nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT` on each node, here two single-process
    "nodes" on this machine."""
    out = tmp_path / "nodes"
    results = torchrun(args_for(workspace, "sft", out, batch_size=4, grad_accum=1, parallel="fsdp", **COMMON),
                       tmp_path, nodes=2)
    assert len(results) == 2
    assert_same_weights(weights(one_process), weights(out))
    started = time.time()  # a process failing on one node stops the other node's too, with its error
    failed = torchrun(args_for(workspace, "sft", tmp_path / "fails", batch_size=4, grad_accum=1, parallel="fsdp",
                               **COMMON), tmp_path, nodes=2, crash=(3, 1), check=False)
    assert [r.returncode != 0 for r in failed] == [True, True] and time.time() - started < 120
    assert any("injected failure at step 3 in rank 1" in r.stderr for r in failed)


@pytest.mark.parametrize("adapters", [False, True])
def test_fsdp_on_a_hugging_face_backbone_with_activation_checkpointing(workspace, tmp_path, adapters):
    """A Qwen3 backbone, its first and last layers (or their LoRA adapters) and the projector trained (frozen
    weights sharded too), layers recomputed in the backward pass: FSDP = DDP on 2 processes. (Both differ from 1
    process by up to 4e-5 here: the backbone's padded attention sums in another order.)"""
    llm = save_backbone(tmp_path / "qwen3", "qwen3")
    kw = dict(COMMON, freeze=1, grad_checkpointing=True, batch_size=4, grad_accum=1, lora_rank=4 if adapters else None)
    for parallel in ("ddp", "fsdp"):
        torchrun(hf_args(workspace, tmp_path / parallel, llm, parallel=parallel, **kw), tmp_path)
    ddp, fsdp = weights(tmp_path / "ddp"), weights(tmp_path / "fsdp")
    assert any(key.startswith("language_model.") for key in ddp)  # the trained layers are in the checkpoint
    assert adapters == any(".lora_" in key for key in ddp)
    assert_same_weights(ddp, fsdp)
    Trainer(hf_args(workspace, tmp_path / "one", llm, **{**kw, "grad_accum": 2})).run()
    one = weights(tmp_path / "one")
    assert max(float((one[k] - fsdp[k]).abs().max()) for k in one) < 2e-4


def test_what_fsdp_refuses():
    from minimind_v.training.parallel import Parallel

    with pytest.raises(ValueError, match="--parallel fsdp trains in bf16 or fp32"):
        Parallel("fsdp", 2, torch.device("cpu"), torch.float16)
    with pytest.raises(ValueError, match="--parallel must be one of ddp, fsdp"):
        Parallel("zero3", 2, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="--eval-every with --parallel fsdp over several processes"):
        Parallel("fsdp", 2, torch.device("cpu"), torch.float32, evaluates=True)
    assert not Parallel("fsdp", 1, torch.device("cpu"), torch.float32, evaluates=True).sharded  # one process: whole


def test_clip_lists_the_trained_weights_once_and_clips_them_all():
    from minimind_v.training.parallel import Parallel

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    parallel = Parallel("ddp", 1, torch.device("cpu"), torch.float32)
    model(torch.randn(3, 4)).pow(2).sum().backward()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(parallel.clip(model, 1e-3), expected)
    assert parallel.trained == [model[0].bias, model[1].weight, model[1].bias]
    assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parallel.trained])) <= 1e-3 * 1.01
