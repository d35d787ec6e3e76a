"""Checkpoints, resume state and the run log of a training run.

    <out>/model/          save_pretrained: safetensors without the vision tower, config, tokenizer
    <out>/resume.pt       optimizer, scheduler, scaler, RNG states, data position (step, epoch, step in epoch)
    <out>/metrics.jsonl   one JSON object per logged step (loss, lr, grad norm, tokens/s, evaluation results)
    <out>/loss.png        the loss curve, drawn at the end

Both the model folder and resume.pt are written to a temporary name and renamed, so a crash never leaves a torn
checkpoint. The data position counts optimizer steps of the global batch, which does not depend on the number of
processes: a run can resume with another `--nproc_per_node`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time

import torch
from safetensors.torch import load_file
from tqdm import tqdm



def save_checkpoint(trainer, final: bool) -> None:
    """Model folder + resume state, atomically, from the main process (the others wait)."""
    if trainer.rank == 0:
        out = trainer.args.out_dir
        os.makedirs(out, exist_ok=True)
        tmp = os.path.join(out, "model.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        trainer.model.save_pretrained(tmp)
        trainer.tokenizer.save_pretrained(tmp)
        final_dir = os.path.join(out, "model")
        if os.path.isdir(final_dir):
            os.replace(final_dir, final_dir + ".old")
        os.replace(tmp, final_dir)
        shutil.rmtree(final_dir + ".old", ignore_errors=True)
        state = {"step": trainer.step, "epoch": trainer.epoch, "position": trainer.position,
                 "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
                 "scaler": trainer.scaler.state_dict(), "rng": _rng_states(), "final": final}
        torch.save(state, os.path.join(out, "resume.pt.tmp"))
        os.replace(os.path.join(out, "resume.pt.tmp"), os.path.join(out, "resume.pt"))
    if trainer.features is not None and trainer.rank == 0:
        trainer.features.save()
    if trainer.world > 1:
        torch.distributed.barrier()


def load_resume_state(trainer) -> None:
    """Continue from <out>/model and <out>/resume.pt; a run without them starts from the beginning."""
    out = trainer.args.out_dir
    path = os.path.join(out, "resume.pt")
    if not os.path.isfile(path):
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    weights = load_file(os.path.join(out, "model", "model.safetensors"))
    trainer.model.load_checkpoint_state(weights, source=os.path.join(out, "model"))
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.step, trainer.epoch, trainer.position = state["step"], state["epoch"], state["position"]
    if trainer.position >= trainer.steps_per_epoch:  # resumed at an epoch boundary
        trainer.epoch, trainer.position = trainer.epoch + 1, 0
    _set_rng_states(state["rng"])


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": torch.tensor(list(random.getstate()[1]))}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate((3, tuple(int(x) for x in states["python"]), None))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RunLog:
    """Progress bar (loss, lr, tokens/s, ETA), metrics.jsonl, optional wandb / swanlab / tensorboard, loss.png."""

    def __init__(self, out_dir: str, main: bool, loggers: list[str], total: int):
        self.out_dir, self.main, self.start = out_dir, main, time.time()
        self.bar = tqdm(total=total, disable=not main, dynamic_ncols=True, desc="train")
        self.loggers = [_make_logger(name, out_dir) for name in loggers] if main else []
        if main:
            os.makedirs(out_dir, exist_ok=True)

    def write(self, record: dict) -> None:
        if not self.main:
            return
        record = {**record, "elapsed_s": round(time.time() - self.start, 2)}
        with open(os.path.join(self.out_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if "loss" in record:
            self.bar.n = record["step"]
            self.bar.set_postfix(loss=record["loss"], lr=f"{record['lr']:.2e}", tok_s=record["tokens_per_s"])
        for log in self.loggers:
            log({k: v for k, v in record.items() if isinstance(v, (int, float))}, record.get("step", 0))

    def finish(self, summary: dict) -> None:
        if not self.main:
            return
        self.bar.close()
        self.write({"summary": summary})
        plot_loss(self.out_dir)


def plot_loss(out_dir: str) -> str | None:
    """metrics.jsonl -> loss.png; returns its path (None when nothing was logged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        points = [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r and "step" in r]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*points))
    ax.set(xlabel="optimizer step", ylabel="loss", title="training loss")
    ax.grid(alpha=0.3)
    path = os.path.join(out_dir, "loss.png")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _make_logger(name: str, out_dir: str):
    """A callable(metrics, step) for wandb, swanlab or tensorboard; a clear error when it is not installed."""
    try:
        if name == "wandb":
            import wandb

            run = wandb.init(project="minimind-v", dir=out_dir)
            return lambda metrics, step: run.log(metrics, step=step)
        if name == "swanlab":
            import swanlab

            swanlab.init(project="minimind-v", logdir=out_dir)
            return lambda metrics, step: swanlab.log(metrics, step=step)
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            return lambda metrics, step: [writer.add_scalar(k, v, step) for k, v in metrics.items()]
    except ImportError as err:
        raise ValueError(f"--log {name} needs the {name} package installed ({err})") from err
    raise ValueError(f"unknown logger {name!r}; choose wandb, swanlab or tensorboard")
