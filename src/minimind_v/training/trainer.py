"""One training loop for every stage; the stages differ only in their defaults.

    pretrain-llm   plain text, from scratch, every LLM weight trains          (freeze 0)
    pretrain-vlm   image captions, only the projector trains                   (freeze 2)
    sft            conversations, projector + first and last LLM layers train  (freeze 1)

Freeze strategies, optimizer groups and the schedule live in `optim.py`. A step: the global batch (micro-batch x
processes x accumulation) is cut from one seeded permutation, the loss is summed over every supervised token of the
global batch and divided by their count (so 1 process and N processes compute the same gradient), then AdamW with a
higher projector learning rate, warmup + cosine, clipping. The run folder (settings, checkpoints, the final model)
lives in `checkpointing.py`, the log in `runlog.py`, what stops a run early (Ctrl-C, bad data, divergence) in
`guards.py`, how several processes share the model (DDP or FSDP) in `parallel.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import sys
import time

import torch

from ..config import IGNORE_INDEX
from ..data.batching import collate, pack
from ..data.datasets import ConversationDataset, TextDataset
from ..data.records import SUPPORTED_EXTENSIONS
from ..data.skips import SkipStats
from ..device import all_reduce_sum, compute_dtype, init_distributed, leave_distributed, pick_device
from ..models.attention import PackedMask, varlen_ready
from ..models.image_features import ImageFeatures, tower_id
from ..models.vision_tower import image2tensor
from ..build import training_model
from ..models.vlm_base import VisionLanguageModel
from .args import STAGES, TrainArgs
from .checkpointing import (RunPosition, TrainState, check_settings, latest_checkpoint, load_resume_state, load_weights,
                            open_run_folder, save_checkpoint)
from .guards import SkipGuard, StopRequest, TrainingInterrupted, check_finite_loss
from .loss import chunked_summed_loss, summed_loss
from .parallel import Parallel
from .optim import (
    apply_freeze,
    count_parameters,
    hold_frozen_in,
    image_chunks,
    lr_factor,
    make_optimizer,
    micro_batches,
    step_batches,
)
from .runlog import RunLog

class Trainer:
    def __init__(self, args: TrainArgs, model=None, tokenizer=None):
        """`model` and `tokenizer`: what to train; by default what the args name (build.training_model)."""
        check_args(args)
        self.args = args
        use_cuda = pick_device(args.device).type == "cuda"
        self.rank, self.world, local_rank = init_distributed(use_cuda)
        self.device = torch.device("cuda", local_rank) if self.world > 1 and use_cuda else pick_device(args.device)
        if self.rank == 0:  # before anything is built: a run already there is refused (or removed: --overwrite)
            open_run_folder(args.out_dir, args.resume, args.overwrite)
        torch.manual_seed(args.seed)
        if model is None:
            model, tokenizer = training_model(args)
        self.model, self.tokenizer = model, tokenizer
        self._prepare_model()
        self._prepare_data()
        check_settings(args.out_dir, self.settings(), args.resume, main=self.rank == 0)
        resume = latest_checkpoint(args.out_dir) if args.resume else None
        if resume:
            load_weights(resume, self.model)  # before the model is sharded
        self.wrapped = self._wrap()  # the optimizer takes the weights as wrapping leaves them (FSDP: shards)
        self.optimizer = make_optimizer(self.model, args)
        warmup = int(args.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, warmup, args.min_lr_ratio))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        # compiled, the cross-entropy over [tokens, vocabulary] logits is a few fused passes instead of eager ones
        self.summed_loss = torch.compile(summed_loss, dynamic=True) if args.compile else summed_loss
        self.step = self.epoch = self.position = 0
        self.guard = SkipGuard(args.max_skip_rate, self.world, self.device)
        if resume:
            self._resume_from(load_resume_state(args.out_dir, resume, self.state(), main=self.rank == 0))
        self.log = RunLog(args.out_dir, main=self.rank == 0, loggers=args.loggers, total=self.total_steps,
                          resumed_at=self.step if args.resume else None, stage=args.stage)

    def state(self) -> TrainState:
        """What a checkpoint saves."""
        return TrainState(self.model, self.tokenizer, self.optimizer, self.scheduler, self.scaler, self.parallel)

    def save(self, final: bool) -> str:
        """A checkpoint of where the run stands (the main process writes; the others wait) -> its path."""
        path = save_checkpoint(self.args.out_dir, self.state(), RunPosition(self.step, self.epoch, self.position),
                               final, self.args.keep_checkpoints, main=self.rank == 0)
        if self.features is not None and self.rank == 0:
            self.features.save()
        self.parallel.barrier()
        return path

    def _resume_from(self, at: RunPosition) -> None:
        self.step, self.epoch, self.position = at.step, at.epoch, at.position
        if self.position >= self.steps_per_epoch:  # resumed at an epoch boundary
            self.epoch, self.position = self.epoch + 1, 0

    def _prepare_data(self) -> None:
        """The dataset (samples within max_seq_len and the model's context), image features, the step counts."""
        args, config = self.args, self.model.config
        # packed samples under variable-length attention need no rows of max_seq_len: one row, (almost) no padding
        self.one_row = (self.packing and not args.share_prefix
                        and varlen_ready(config.flash_attn, config.dropout, self.device, self.dtype))
        self.max_seq_len = min(args.max_seq_len, config.max_position_embeddings)
        if self.max_seq_len < args.max_seq_len and self.rank == 0:
            print(f"max_seq_len {args.max_seq_len} is over the model's context: samples are cut to "
                  f"{self.max_seq_len} tokens", file=sys.stderr)
        self.stats = SkipStats()
        self.dataset = make_dataset(args, self.tokenizer, self.model, self.stats, self.max_seq_len)
        tower = self.model.vision_tower
        if tower is None and self.dataset.image_records():
            raise ValueError(f"{args.data} has {self.dataset.image_records():,} records with images, but the model "
                             "has no vision tower: give --vision DIR (a CLIP or SigLIP folder), or --from-weight a "
                             "model that has one")
        self.features = ImageFeatures(tower, args.feature_cache, tower_id(config, tower)) if tower is not None else None
        if self.features is not None and args.feature_cache is not None and self.dataset.image_records():
            # images whose features are cached are not decoded again
            known = self.features.known_keys()  # live in this process; loader workers get the keys cached so far
            self.dataset.cached_keys = known if args.num_workers == 0 else frozenset(known)
        if self.features is not None and args.num_workers > 0:  # the workers preprocess what is not cached
            # half the bytes to ship every step; pixels encoded once into a cache keep fp32 (the features, and so
            # the training, then equal those of preprocessing in this process)
            half = torch.float16 if self.device.type == "cuda" and args.feature_cache is None else torch.float32
            self.dataset.transform = functools.partial(pixel_values, processor=tower.processor, dtype=half)
        # --share-prefix N: an image's samples N at a time in one step (the chunks, not the samples, shuffled)
        self.groups = image_chunks(self.dataset.image_groups(), args.share_prefix) if args.share_prefix else None
        self.global_batch = args.batch_size * self.world * args.grad_accum
        self.steps_per_epoch = len(self.dataset) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.dataset)} samples cannot fill one global batch of {self.global_batch}")
        self.total_steps = self.steps_per_epoch * args.epochs
        self.total_steps = min(self.total_steps, args.max_steps) if args.max_steps else self.total_steps

    def settings(self) -> dict:
        """What run.json records and a resumed run must repeat: the arguments, resolved."""
        args = {f.name: getattr(self.args, f.name) for f in dataclasses.fields(self.args) if f.name != "evaluate"}
        for name in ("data", "from_weight", "tokenizer", "vision", "image_root", "llm", "feature_cache"):
            if args[name] and os.path.exists(args[name]):
                args[name] = os.path.abspath(args[name])
        return {**args, "freeze": STAGES[self.args.stage]["freeze"] if args["freeze"] is None else args["freeze"],
                "packing": self.packing,
                "max_seq_len": self.max_seq_len, "global_batch": self.global_batch, "samples": len(self.dataset)}

    def _prepare_model(self) -> None:
        """On the device, frozen as the stage says, frozen backbone weights in the compute dtype, checkpointing."""
        args = self.args
        self.dtype = compute_dtype(self.device, args.dtype)
        self.parallel = Parallel(args.parallel, self.world, self.device, self.dtype,
                                 evaluates=args.evaluate is not None and args.eval_every > 0)
        self.parallel.place(self.model)
        self.packing = resolve_packing(args, self.model, self.device, self.dtype)
        apply_freeze(self.model, STAGES[args.stage]["freeze"] if args.freeze is None else args.freeze)
        hold_frozen_in(self.model, self.dtype)
        self.params = count_parameters(self.model)
        if self.rank == 0:
            print(f"trainable parameters: {self.params['trainable_params']:,} of {self.params['total_params']:,}",
                  file=sys.stderr)
        if args.grad_checkpointing:
            self.model.checkpoint_activations()

    def _wrap(self) -> torch.nn.Module:
        """Compiled (each decoder layer in place: the layers share one compiled graph, so compiling takes the time
        of one layer, not of the whole model), then spread over the processes."""
        if self.args.compile:  # packed batches vary in length: compiled for any length once, not once per length
            for layer in self.model.decoder_layers():
                layer.compile(dynamic=True if self.packing else None)
        return self.parallel.wrap(self.model)

    def run(self) -> dict:
        start = time.time()
        self._since, self._tokens = start, 0  # throughput over each logging interval
        self._losses = []  # the interval's step losses (tensors: nothing waits for the GPU until it is logged)
        try:
            last = self._run_steps()
        except BaseException:
            self.log.close()  # the message that follows starts on its own line
            raise
        self.save(final=True)
        summary = {"steps": self.step, "seconds": round(time.time() - start, 1), "skipped": self.stats.summary(),
                   **self.params, **last}
        self.log.finish(summary)
        leave_distributed(self.world)
        return summary

    def _run_steps(self) -> dict:
        """Every planned step; Ctrl-C stops after the step under way with a checkpoint. -> the last log record."""
        plan, last = self.plan(), {}
        self.guard.start(len(plan) * self.global_batch)
        with StopRequest(enabled=self.world == 1) as stop:
            for (epoch, position, _), batches in zip(plan, self.batches([step for _, _, step in plan])):
                self.epoch = epoch
                self.step, self.position = self.step + 1, position + 1
                self.guard.count(batches)
                last = self._after_step(self.train_step(batches)) or last
                if self.position >= self.steps_per_epoch:
                    self.epoch, self.position = epoch + 1, 0
                if stop.requested:
                    path = self.save(final=False)
                    raise TrainingInterrupted(f"interrupted at step {self.step} of {self.total_steps}; checkpoint "
                                              f"{path}; the same command with --resume continues the run")
        return last

    def plan(self) -> list[tuple[int, int, list[int]]]:
        """The optimizer steps still to run, across epochs: (epoch, position in it, sample indices). One loader
        reads them all, so its workers live from the first epoch to the last."""
        plan = []
        for epoch in range(self.epoch, self.args.epochs):
            steps = step_batches(len(self.dataset), self.args.seed, epoch, self.global_batch, self.groups)
            first = self.position if epoch == self.epoch else 0
            plan += [(epoch, position, steps[position]) for position in range(first, len(steps))]
        return plan[:max(0, self.total_steps - self.step)]

    def batches(self, steps: list[list[int]]):
        """Each step's micro-batches for this process, collated (loader workers decode images in parallel); `steps`
        as `plan()` gives them."""
        micro = [mb for step in steps for mb in micro_batches(step, self.rank, self.world, self.args.grad_accum)]
        pad = self.tokenizer.pad_token_id
        batcher = (functools.partial(pack, max_len=self.max_seq_len, pad_token_id=pad, one_row=self.one_row,
                                     share_prefix=self.args.share_prefix > 0)
                   if self.packing else functools.partial(collate, pad_token_id=pad))
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=micro, num_workers=self.args.num_workers,
                                             collate_fn=batcher, worker_init_fn=ignore_interrupts,
                                             pin_memory=self.device.type == "cuda",
                                             prefetch_factor=4 if self.args.num_workers else None)
        group = []
        for batch in loader:
            if self.args.num_workers > 0:  # workers counted skips in their own copies of the stats
                self.stats.merge({reason: batch["skipped"].count(reason) for reason in set(batch["skipped"])})
            group.append(batch)
            if len(group) == self.args.grad_accum:
                yield group
                group = []

    def _after_step(self, step: dict) -> dict | None:
        """Log (the only place a step's results leave the GPU), checkpoint, evaluate; the logged record, if any."""
        args, record = self.args, None
        self._tokens += step["tokens"]
        self._losses.append(step["loss"])
        if self.step % args.log_every == 0 or self.step == self.total_steps:
            now = time.time()  # the loss logged: the mean over the interval's steps
            record = {"loss": round(float(sum(self._losses)) / len(self._losses), 5), "lr": step["lr"],
                      "grad_norm": round(float(step["grad_norm"]), 4),
                      "tokens_per_s": round(self._tokens * self.world / max(now - self._since, 1e-9))}
            self.log.write({"step": self.step, "epoch": self.epoch, **record})
            self._since, self._tokens, self._losses = now, 0, []
            check_finite_loss(record["loss"], self.step)
        if self.world == 1 or record is not None:  # under torchrun, at logging steps: where all ranks meet
            self.guard.check(self.step, self.stats.summary)
        if args.save_every and self.step % args.save_every == 0:
            self.save(final=False)
        if args.evaluate is not None and args.eval_every and self.step % args.eval_every == 0 and self.rank == 0:
            self.log.write({"step": self.step, **args.evaluate(self.model)})
        if self.features is not None and self.rank == 0 and self.step % max(1, self.steps_per_epoch) == 0:
            self.features.save()
        return record

    def train_step(self, batches: list[dict]) -> dict:
        """One optimizer step. Nothing waits for the GPU (in one process): loss and grad_norm come back as tensors,
        so the next batch is prepared while this step runs."""
        # the labels are still on the CPU: counting them makes nothing wait for the GPU
        supervised = float(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches))
        total = supervised if self.world == 1 else float(all_reduce_sum(torch.tensor(supervised, device=self.device)))
        if not self.model.training:  # (an evaluation in between left it in eval mode; train() walks every module)
            self.model.train()
        loss_sum, tokens = torch.zeros((), device=self.device), 0
        for j, batch in enumerate(batches):
            sync = j == len(batches) - 1 or self.world == 1
            with contextlib.nullcontext() if sync else self.parallel.without_sync(self.wrapped):
                loss, summed = self._forward(batch, total, len(batches))
                self.scaler.scale(loss).backward()
            loss_sum, tokens = loss_sum + summed, tokens + int(batch["token_mask"].sum())
        self.scaler.unscale_(self.optimizer)
        grad_norm = self.parallel.clip(self.model, self.args.grad_clip)
        if total > 0:  # a step whose samples were all skipped changes nothing (no decay-only update)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        group = self.optimizer.param_groups[0]  # --lr as scheduled (a projector group runs at x projector_lr_mult)
        return {"loss": all_reduce_sum(loss_sum) / max(total, 1.0), "grad_norm": grad_norm, "tokens": tokens,
                "lr": self.args.lr * group["lr"] / group["initial_lr"]}

    def _forward(self, batch: dict, total_supervised: float, accum: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss to backpropagate (this micro-batch's share of the global token mean) and its plain sum (detached)."""
        if batch["input_ids"].shape[0] == 0:  # everything skipped: a zero loss that still touches every weight
            zero = sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad)
            return zero, zero.detach()
        ids = batch["input_ids"].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            images = batch["images"]  # a stacked tensor (workers preprocessed them) or a list of PIL images
            features = self.features(images, batch["image_keys"], self.device) if len(images) else None
            if "segment_ids" in batch:  # packed rows: each sample attends within itself, counts positions from 0
                prefix = batch.get("prefix_ids")
                mask = PackedMask(batch["segment_ids"].to(self.device, non_blocking=True),
                                  batch["cu_seqlens"].to(self.device, non_blocking=True), self.max_seq_len,
                                  None if prefix is None else prefix.to(self.device, non_blocking=True))
                positions = batch["position_ids"].to(self.device, non_blocking=True)
            else:
                mask, positions = batch["attention_mask"].to(self.device, non_blocking=True), None
            chunked = self.args.chunked_loss and self.model.supports_chunked_loss  # its output has the hidden
            out = self.wrapped(input_ids=ids, attention_mask=mask, position_ids=positions, image_features=features,
                               use_cache=False, logits_to_keep=1 if chunked else 0)
            labels = batch["labels"].to(self.device, non_blocking=True)  # a blocking copy would wait for the GPU
            summed = (chunked_summed_loss(out.hidden_states, self.model.get_output_embeddings(), labels) if chunked
                      else self.summed_loss(out.logits, labels))
        loss = summed * self.world / max(total_supervised, 1.0) + out.aux_loss / accum
        return loss, summed.detach().float()


def ignore_interrupts(_worker: int) -> None:
    """Loader workers leave Ctrl-C to the main process (which finishes its step and saves first)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def pixel_values(image, processor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """image -> [3, H, W] (what DataLoader workers run, so the main process never preprocesses)."""
    return image2tensor(image, processor)[0].to(dtype)


def make_dataset(args: TrainArgs, tokenizer, model: VisionLanguageModel, stats: SkipStats, max_seq_len: int):
    if STAGES[args.stage]["text"]:
        return TextDataset(args.data, tokenizer, model.config, max_seq_len, stats=stats)
    return ConversationDataset(args.data, tokenizer, model.config, max_seq_len, image_root=args.image_root,
                               stats=stats)


def resolve_packing(args: TrainArgs, model: VisionLanguageModel, device: torch.device, dtype: torch.dtype) -> bool:
    """--packing as given; unset, on wherever a packed batch is one row of variable-length attention (no padding at
    all, the fast path) and with --share-prefix, off elsewhere (a CPU packs into masked rows of max_seq_len, which
    pays only where lengths vary)."""
    if (args.packing or args.share_prefix) and not model.supports_packing:
        raise ValueError("--packing and --share-prefix need the MiniMind language model (a Hugging Face backbone "
                         "reads masks its own way)")
    if args.packing is not None:
        return args.packing
    config = model.config
    return model.supports_packing and (args.share_prefix > 0 or varlen_ready(config.flash_attn, config.dropout,
                                                                             device, dtype))


def check_args(args: TrainArgs) -> None:
    """Settings that cannot work are errors before anything is built."""
    checks = [(args.stage in STAGES, f"unknown stage {args.stage!r}; choose one of {', '.join(STAGES)}"),
              (not (args.resume and args.overwrite), "--resume continues a run and --overwrite replaces it: pick one"),
              (0.0 <= args.max_skip_rate <= 1.0, f"--max-skip-rate must be in [0, 1], got {args.max_skip_rate}"),
              (min(args.batch_size, args.grad_accum, args.epochs, args.log_every) >= 1,
               "--batch-size, --grad-accum, --epochs and --log-every must be at least 1"),
              (min(args.save_every, args.keep_checkpoints, args.num_workers) >= 0,
               "--save-every, --keep-checkpoints and --num-workers must be at least 0"),
              (args.max_steps is None or args.max_steps >= 1, "--max-steps must be at least 1"),
              (args.share_prefix >= 0, "--share-prefix must be at least 0 (0: off)"),
              (args.packing is not False or not args.share_prefix, "--share-prefix works on packed rows: leave out "
                                                                     "--no-packing"),
              (args.data.lower().endswith(SUPPORTED_EXTENSIONS), f"--data {args.data}: the file must end in "
                                                                   f"{', '.join(SUPPORTED_EXTENSIONS)}")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    paths = [("--data", args.data, os.path.isfile), ("--from-weight", args.from_weight, os.path.isdir),
             ("--tokenizer", args.tokenizer, os.path.isdir), ("--image-root", args.image_root, os.path.isdir)]
    for flag, path, exists in paths:  # the files named: before any model is built
        if path and not exists(path):
            raise FileNotFoundError(f"{flag} {path} does not exist")
