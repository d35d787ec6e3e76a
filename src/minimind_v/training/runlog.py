"""The run log: a progress bar (loss, lr, tokens/s, ETA), metrics.jsonl (one JSON object per logged step and
evaluation), optional wandb / swanlab / tensorboard mirrors, and loss.png drawn at the end. A resumed run first
drops the records after its checkpoint's step, so every step is logged once."""

from __future__ import annotations

import json
import os
import time

from tqdm import tqdm

METRICS = "metrics.jsonl"


class RunLog:
    """Progress bar (loss, lr, tokens/s, ETA), metrics.jsonl, optional wandb / swanlab / tensorboard, loss.png."""

    def __init__(self, out_dir: str, main: bool, loggers: list[str], total: int, resumed_at: int | None = None):
        """resumed_at: the step a resumed run continues after (later records are dropped: it logs them again)."""
        self.out_dir, self.main, self.start = out_dir, main, time.time()
        self.bar = tqdm(total=total, initial=resumed_at or 0, disable=not main, dynamic_ncols=True, desc="train")
        self.loggers = [_make_logger(name, out_dir) for name in loggers] if main else []
        if main:
            os.makedirs(out_dir, exist_ok=True)
            if resumed_at is not None:
                keep_records_until(os.path.join(out_dir, METRICS), resumed_at)

    def write(self, record: dict) -> None:
        if not self.main:
            return
        record = {**record, "elapsed_s": round(time.time() - self.start, 2)}
        with open(os.path.join(self.out_dir, METRICS), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if "loss" in record:
            self.bar.n = record["step"]
            self.bar.set_postfix(loss=record["loss"], lr=f"{record['lr']:.2e}", tok_s=record["tokens_per_s"])
        for log in self.loggers:
            log({k: v for k, v in record.items() if isinstance(v, (int, float))}, record.get("step", 0))

    def close(self) -> None:
        """Close the progress bar (so a message after it starts on a line of its own)."""
        self.bar.close()

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

    points = [(r["step"], r["loss"]) for _, r in read_records(os.path.join(out_dir, METRICS))
              if "loss" in r and "step" in r]
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


def keep_records_until(path: str, step: int) -> None:
    """Rewrite metrics.jsonl (atomically) without the records of steps after `step` and without summaries."""
    if not os.path.isfile(path):
        return
    kept = [line + "\n" for line, record in read_records(path) if "summary" not in record and
            record.get("step", 0) <= step]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def read_records(path: str) -> list[tuple[str, dict]]:
    """(line, record) of every whole JSON object in metrics.jsonl; a line cut short by a kill is left out."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append((line.rstrip("\n"), record))
    return records
