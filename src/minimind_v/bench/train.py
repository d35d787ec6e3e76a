"""`minimind-v bench train`: training throughput of the reference setting (reference.py) through the real trainer.

Timed per optimizer step after `warmup` steps (compilation, cuDNN autotuning, loader start-up): samples/s, real
(unpadded) tokens/s, model FLOPs utilisation and peak GPU memory. The FLOPs counted per step:

    tower     2 * tower_params * T  +  4 * layers * width * T^2            per image (forward only, it is frozen)
    LLM       6 * llm_params * n    +  6 * layers * width * n^2            per sample of n real tokens (fwd + bwd)

with llm_params the decoder layers, the projector and the output head (the embedding lookup is no matmul); a frozen
LLM would do less backward work, so MFU is reported for the whole-LLM setting it is meant for.

Under `torchrun` (`--parallel ddp` or `fsdp`) the figures are the sums over the processes (MFU per GPU), printed once;
the losses are the global batch's, the same in every process.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from ..device import all_reduce_sum, leave_distributed, synchronize
from ..training.trainer import TrainArgs, Trainer
from .reference import PRESET, find_reference_tokenizer, make_reference_data, save_reference_tower

PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the GPU (datasheet), None when unknown or on a CPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16.items() if key in name), None)


def step_flops(model, batches: list[dict]) -> float:
    """Model FLOPs of one optimizer step (see the module docstring)."""
    config, tower = model.config, model.vision_tower
    llm = sum(p.numel() for layer in model.decoder_layers() for p in layer.parameters())
    llm += sum(p.numel() for p in model.vision_proj.parameters()) + model.get_output_embeddings().weight.numel()
    attention_width = config.num_attention_heads * config.head_dim
    flops = 0.0
    for batch in batches:
        lengths = torch.tensor(batch["lengths"], dtype=torch.float64)  # [samples] real tokens each
        flops += 6 * llm * float(lengths.sum()) + 6 * config.num_hidden_layers * attention_width * float(
            (lengths ** 2).sum())
        if tower is not None and len(batch["images"]):
            tokens, width = tower.num_tokens, tower.hidden_size
            layers = getattr(getattr(tower.encoder, "config", None), "num_hidden_layers", 0)
            per_image = 2 * sum(p.numel() for p in tower.parameters()) * tokens + 4 * layers * width * tokens ** 2
            flops += per_image * len(batch["images"])
    return flops


def bench_train(work_dir: str, data: str | None = None, rows: int = 2400, steps: int = 40, warmup: int = 5,
                generator: str | None = None, tokenizer: str | None = None, **train: object) -> dict:
    """Train the reference setting for warmup + steps optimizer steps; the figures of the timed steps."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"bench train needs --steps >= 1 and --warmup >= 0, got {steps} and {warmup}")
    tower = save_reference_tower(os.path.join(work_dir, "tower"))
    data = data or make_reference_data(os.path.join(work_dir, f"bench_{rows}.parquet"), rows, 0, generator)
    options = {"batch_size": 16, "max_seq_len": 768, "freeze": 0, "log_every": 10 ** 9, "epochs": 1000, **train}
    tokenizer = tokenizer or find_reference_tokenizer()
    trainer = Trainer(TrainArgs(stage="sft", data=data, out_dir=os.path.join(work_dir, "run"), preset=PRESET,
                                vision=tower, tokenizer=tokenizer, overwrite=True, **options))
    device = trainer.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps_run, losses = [], []
    loader = trainer.batches([step for _, _, step in trainer.plan()[:warmup + steps]])  # one loader, all epochs
    begun = time.perf_counter()
    for number in range(warmup + steps):
        if number == warmup:  # the clock starts once the warm-up steps have finished on the device
            synchronize(device)
            clock, warmed = StepClock(device), time.perf_counter() - begun  # compiling is in the warm-up
        started = time.perf_counter()
        batches = next(loader)
        waited = time.perf_counter() - started
        metrics = trainer.train_step(batches)  # no per-step sync: the next batch loads while the GPU works
        losses.append(metrics["loss"])
        if number >= warmup:
            clock.tick()
            steps_run.append((sum(len(b["lengths"]) for b in batches), sum(int(b["token_mask"].sum()) for b in batches),
                              sum(b["input_ids"].numel() for b in batches), step_flops(trainer.model, batches), waited))
    synchronize(device)
    losses = [round(float(loss), 4) for loss in losses]
    if trainer.world > 1:  # each process timed its own share: [steps, 4] summed over the processes
        sums = all_reduce_sum(torch.tensor([t[:4] for t in steps_run], dtype=torch.float64, device=device)).tolist()
        steps_run = [(*total, t[4]) for total, t in zip(sums, steps_run)]
    out = {"tokenizer": tokenizer or "shipped default", **report(steps_run, clock.seconds(), losses, trainer, device),
           "warmup_steps": warmup, "warmup_seconds": round(warmed, 1)}
    leave_distributed(trainer.world)
    return out


class StepClock:
    """Step times without stalling the GPU: CUDA events recorded after each step and read at the end (wall-clock
    time on a CPU). seconds(): every step's duration, the first measured from the clock's start."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = [self._mark()]

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def tick(self) -> None:
        self.marks.append(self._mark())

    def seconds(self) -> list[float]:
        pairs = zip(self.marks, self.marks[1:])
        return [a.elapsed_time(b) / 1000 if self.cuda else b - a for a, b in pairs]


def report(steps: list[tuple], durations: list[float], losses: list[float], trainer: Trainer,
           device: torch.device) -> dict:
    """steps: (samples, real tokens, padded tokens, FLOPs, seconds waiting for the loader) per timed step."""
    seconds = sum(durations)
    flops_per_s = sum(t[3] for t in steps) / seconds
    peak = peak_flops(device)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
           "processes": trainer.world, "parallel": trainer.args.parallel, "rank": trainer.rank,
           "dtype": str(trainer.dtype).replace("torch.", ""), "steps_timed": len(steps),
           "batch_size": trainer.global_batch, "compile": trainer.args.compile,
           "trainable_params": trainer.params["trainable_params"],
           "samples_per_s": round(sum(t[0] for t in steps) / seconds, 1),
           "real_tokens_per_s": round(sum(t[1] for t in steps) / seconds),
           "padded_tokens_per_s": round(sum(t[2] for t in steps) / seconds),
           "packing": trainer.packing,
           "step_ms_median": round(statistics.median(durations) * 1000, 1),
           "step_ms_max": round(max(durations) * 1000, 1),
           "data_wait_ms_mean": round(statistics.fmean(t[4] for t in steps) * 1000, 1),
           "model_tflops_per_s": round(flops_per_s / 1e12, 2),
           "mfu": round(flops_per_s / trainer.world / peak, 4) if peak else None,
           "losses": losses}
    if device.type == "cuda":
        out["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20)
    return out


def table_rows(report: dict) -> tuple[str, list[tuple[str, str]]]:
    """(title, [(figure, value)]) of a report, for the table `bench train` prints."""
    flags = [name for name in ("packing", "compile") if report[name]]
    where = report["device"] if report["processes"] == 1 else \
        f"{report['processes']} x {report['device']} ({report['parallel']})"
    title = (f"bench train: {where}, {report['dtype']}, batch {report['batch_size']}"
             f"{', ' + ', '.join(flags) if flags else ''}, {report['trainable_params']:,} trainable parameters, "
             f"{report['steps_timed']} steps timed")
    mfu = f"{report['mfu']:.1%}" if report["mfu"] is not None else "n/a (no known peak)"
    memory = f"{report['peak_gpu_memory_mib'] / 1024:.1f} GiB" if "peak_gpu_memory_mib" in report else "n/a (CPU)"
    memory += " (per GPU, the first process)" if report["processes"] > 1 and "peak_gpu_memory_mib" in report else ""
    losses = report["losses"]
    return title, [("samples/s", f"{report['samples_per_s']:,}"),
                   ("warm-up steps (compiling included)", f"{report['warmup_steps']} in {report['warmup_seconds']} s"),
                   ("real tokens/s", f"{report['real_tokens_per_s']:,}"),
                   ("padded tokens/s", f"{report['padded_tokens_per_s']:,}"),
                   ("model TFLOP/s, MFU", f"{report['model_tflops_per_s']}, {mfu}"),
                   ("peak GPU memory", memory),
                   ("step ms, median (max)", f"{report['step_ms_median']} ({report['step_ms_max']})"),
                   ("loader wait ms per step", f"{report['data_wait_ms_mean']}"),
                   ("loss, first -> last step", f"{losses[0]:.4f} -> {losses[-1]:.4f}")]
