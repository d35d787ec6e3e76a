"""Training options: mixed precision, gradient checkpointing, torch.compile, experiment loggers.

Each numeric test runs on the CPU and, where one is present, on a CUDA GPU as well."""

import json
import sys
import types

import pytest
import torch

from minimind_v.training.trainer import Trainer
from helpers import args_for, weights

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]


def run(workspace, out, **kw) -> Trainer:
    trainer = Trainer(args_for(workspace, "sft", out, freeze=0, feature_cache=None, **kw))
    trainer.run()
    return trainer


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_tracks_fp32(workspace, tmp_path, device, dtype):
    if device == "cuda" and dtype == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    run(workspace, tmp_path / "fp32", device=device, dtype="fp32", max_steps=6)
    mixed = run(workspace, tmp_path / dtype, device=device, dtype=dtype, max_steps=6)
    assert mixed.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert mixed.scaler.is_enabled() == (dtype == "fp16")  # a GradScaler only where fp16 needs one
    assert all(p.dtype == torch.float32 for p in mixed.model.parameters())  # fp32 master weights
    ref, low = losses(tmp_path / "fp32"), losses(tmp_path / dtype)
    assert low[0] == pytest.approx(ref[0], rel=0.02)  # same start, within half-precision rounding
    assert low[-1] < low[0] and all(map(lambda x: x == x, low))  # it learns, and nothing became NaN
    assert low[-1] == pytest.approx(ref[-1], rel=0.15)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_checkpointing_changes_nothing_but_memory(workspace, tmp_path, device):
    run(workspace, tmp_path / "plain", device=device, dtype="fp32", max_steps=3)
    run(workspace, tmp_path / "ckpt", device=device, dtype="fp32", max_steps=3, grad_checkpointing=True)
    assert losses(tmp_path / "ckpt") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)
    plain, ckpt = weights(tmp_path / "plain"), weights(tmp_path / "ckpt")
    for key in plain:
        torch.testing.assert_close(ckpt[key], plain[key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_model_trains_like_eager(workspace, tmp_path, device):
    run(workspace, tmp_path / "eager", device=device, dtype="fp32", max_steps=3)
    torch._dynamo.utils.counters.clear()
    compiled = run(workspace, tmp_path / "compiled", device=device, dtype="fp32", max_steps=3, compile=True)
    layers = compiled.model.decoder_layers()  # each layer compiled in place; the step really ran through them
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 4  # not one graph per layer (3 layers here)
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)
    eager, again = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    for key in eager:  # fused kernels round differently; Adam turns that into < 3% of one lr-sized step
        torch.testing.assert_close(again[key], eager[key], atol=1e-4, rtol=1e-4)


def fake_wandb(calls: list) -> types.ModuleType:
    module = types.ModuleType("wandb")
    run_object = types.SimpleNamespace(log=lambda metrics, step: calls.append((step, metrics)))
    module.init = lambda **kw: calls.append(("init", kw)) or run_object
    return module


def test_wandb_receives_every_logged_metric(workspace, tmp_path, monkeypatch):
    """The run is named after its stage and folder; the metrics are tagged train/...; loss.png is drawn."""
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(calls))
    trainer = run(workspace, tmp_path / "w", max_steps=3, loggers=["wandb"])
    assert calls[0][0] == "init" and calls[0][1]["project"] == "minimind-v"
    assert calls[0][1]["name"] == f"sft: {tmp_path / 'w'}"
    steps = [(step, m) for step, m in calls[1:] if "train/loss" in m]
    assert [s for s, _ in steps] == [1, 2, 3]
    assert [m["train/loss"] for _, m in steps] == losses(tmp_path / "w")
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(steps[0][1])
    assert trainer.log.stage == "sft" and (tmp_path / "w" / "loss.png").stat().st_size > 5_000


def test_the_loss_plot_is_titled_with_the_stage_and_draws_the_evaluation(tmp_path):
    import matplotlib.image

    from minimind_v.training.runlog import RunLog, plot_loss, tagged

    log = RunLog(str(tmp_path), main=True, loggers=[], total=4, stage="pretrain-vlm")
    for step in (1, 2, 3, 4):
        log.write({"step": step, "loss": 2.0 / step, "lr": 1e-3, "tokens_per_s": 100})
    log.write({"step": 4, "eval_accuracy": 0.5})
    log.close()
    plain = matplotlib.image.imread(plot_loss(str(tmp_path), "pretrain-vlm"))
    assert tagged({"step": 4, "eval_accuracy": 0.5, "loss": 1.0, "ok": True}) == {"eval/accuracy": 0.5,
                                                                                  "train/loss": 1.0}
    orange = ((plain[..., 0] > 0.9) & (plain[..., 1] > 0.4) & (plain[..., 1] < 0.6) & (plain[..., 2] < 0.2)).sum()
    assert orange > 20  # the evaluation's curve (matplotlib's tab:orange)


def test_missing_or_unknown_logger_is_a_clear_error(workspace, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "swanlab", None)  # as if not installed
    with pytest.raises(ValueError, match="--log swanlab needs the swanlab package"):
        run(workspace, tmp_path / "s", max_steps=1, loggers=["swanlab"])
    with pytest.raises(ValueError, match="unknown logger 'mlflow'"):
        run(workspace, tmp_path / "m", max_steps=1, loggers=["mlflow"])
