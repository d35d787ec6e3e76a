"""The run log: a progress bar (loss, lr, tokens/s, ETA), metrics.jsonl (one JSON object per logged step and
evaluation), optional wandb / swanlab / tensorboard mirrors (the run named after its stage and folder, metrics
tagged train/... and eval/...), and loss.png drawn at the end (titled with the stage, the evaluation beside the
loss when there is one). A resumed run first drops the records after its checkpoint's step, so every step is
logged once."""

from __future__ import annotations

import json
import os
import time

from tqdm import tqdm

METRICS = "metrics.jsonl"


class RunLog:
    """Progress bar (loss, lr, tokens/s, ETA), metrics.jsonl, optional wandb / swanlab / tensorboard, loss.png."""

    def __init__(self, out_dir: str, main: bool, loggers: list[str], total: int, resumed_at: int | None = None,
                 stage: str = "train"):
        """resumed_at: the step a resumed run continues after (later records are dropped: it logs them again)."""
        self.out_dir, self.main, self.start, self.stage = out_dir, main, time.time(), stage
        self.bar = tqdm(total=total, initial=resumed_at or 0, disable=not main, dynamic_ncols=True, desc=stage)
        name = run_name(stage, out_dir)
        self.loggers = [_make_logger(kind, out_dir, name) for kind in loggers] if main else []
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
            log(tagged(record), record.get("step", 0))

    def close(self) -> None:
        """Close the progress bar (so a message after it starts on a line of its own)."""
        self.bar.close()

    def finish(self, summary: dict) -> None:
        if not self.main:
            return
        self.bar.close()
        self.write({"summary": summary})
        plot_loss(self.out_dir, self.stage)


def run_name(stage: str, out_dir: str) -> str:
    """'sft: runs/sft' - what a tracker calls the run."""
    return f"{stage}: {out_dir}"


def tagged(record: dict) -> dict:
    """The numbers of a record under tracker tags: eval_accuracy -> eval/accuracy, loss -> train/loss."""
    return {(f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"): v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


def plot_loss(out_dir: str, stage: str = "train") -> str | None:
    """metrics.jsonl -> loss.png (titled with the stage; the evaluation's numbers on a second axis when there are
    any); returns its path (None when nothing was logged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for _, r in read_records(os.path.join(out_dir, METRICS)) if "step" in r]
    points = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*points), label="loss")
    ax.set(xlabel="optimizer step", ylabel="loss", title=f"{stage}: {os.path.basename(os.path.abspath(out_dir))}")
    ax.grid(alpha=0.3)
    evals = sorted({k for r in records for k in r if k.startswith("eval_")})
    if evals:
        right = ax.twinx()
        for key in evals:
            right.plot(*zip(*[(r["step"], r[key]) for r in records if key in r]), "o-", color="tab:orange",
                       label=key.replace("eval_", "eval "))
        right.set_ylabel("evaluation")
        right.legend(loc="upper right")
    path = os.path.join(out_dir, "loss.png")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _make_logger(kind: str, out_dir: str, name: str):
    """A callable(metrics, step) for wandb, swanlab or tensorboard, the run called `name`; a clear error when the
    package is not installed."""
    try:
        if kind == "wandb":
            import wandb

            run = wandb.init(project="minimind-v", name=name, dir=out_dir)
            return lambda metrics, step: run.log(metrics, step=step)
        if kind == "swanlab":
            import swanlab

            swanlab.init(project="minimind-v", experiment_name=name, logdir=out_dir)
            return lambda metrics, step: swanlab.log(metrics, step=step)
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            writer.add_text("run", name)
            return lambda metrics, step: [writer.add_scalar(k, v, step) for k, v in metrics.items()]
    except ImportError as err:
        raise ValueError(f"--log {kind} needs the {kind} package installed ({err})") from err
    raise ValueError(f"unknown logger {kind!r}; choose wandb, swanlab or tensorboard")


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
