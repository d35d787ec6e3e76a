"""The training arguments: one typed dataclass whose fields carry their own help, from which `minimind-v train` and
`minimind-v bench train` derive their flags, and which a JSON or YAML file can fill (`--config`). Standard library
only, so the CLI builds its parser without importing torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field

# stage -> its defaults: which weights train (freeze) and whether the data is plain text
STAGES = {"pretrain-llm": dict(freeze=0, text=True), "pretrain-vlm": dict(freeze=2, text=False),
          "sft": dict(freeze=1, text=False)}
PARALLEL_MODES = ("ddp", "fsdp")  # --parallel (training/parallel.py)
NOT_FLAGS = ("stage", "overrides", "loggers", "evaluate")  # set by positionals, --set, --log, or in code
DERIVED = ("global_batch", "samples")  # what run.json adds to the arguments: ignored when it is read back as --config
DATA_HELP = ("a .parquet in MiniMind-V's layout (conversations + image_bytes), a LLaVA-style .json/.jsonl "
             "(conversations + image paths), or .jsonl/.parquet with a text field (pretrain-llm)")
FREEZE_HELP = ("what trains: 0 the whole language model and the projector, 1 the projector and the first and last "
               "decoder layers, 2 the projector only (default: the stage's - pretrain-llm 0, pretrain-vlm 2, sft 1); "
               "the vision tower never trains")


def arg(default=dataclasses.MISSING, help: str = "", **kwargs):
    """A field with its command-line help (and, for `default_factory`, no plain default)."""
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class TrainArgs:
    stage: str = arg(help="pretrain-llm (plain text, from scratch), pretrain-vlm (captions) or sft (conversations)")
    data: str = arg(help=DATA_HELP)
    out_dir: str = arg(help="the run folder: run.json, metrics, checkpoints/, model/ (the final model), loss.png")
    preset: str = arg("minimind2-v", "the model size of a new model (`minimind-v presets` lists them)")
    llm: str | None = arg(None, "a local Hugging Face causal LM folder or .gguf file as the language model")
    lora_rank: int | None = arg(None, "train LoRA adapters of this rank on the language model instead of its weights")
    overrides: dict = arg(help="config fields of a new model", default_factory=dict)
    from_weight: str | None = arg(None, "start from a model folder (an earlier stage's out-dir/model)")
    tokenizer: str | None = arg(None, "tokenizer folder (default: --from-weight's, else the shipped 2,048-token one)")
    vision: str | None = arg(None, "vision tower: a local CLIP/SigLIP folder, efficientnet-lite0 or "
                                   "efficientnet-lite0-multiscale (needed for image data unless --from-weight has one)")
    image_root: str | None = arg(None, "folder that image paths are relative to (default: the data file's)")
    freeze: int | None = arg(None, FREEZE_HELP)
    epochs: int = arg(1, "passes over the data")
    max_steps: int | None = arg(None, "stop after this many optimizer steps (the schedule is planned for them)")
    batch_size: int = arg(16, "samples per micro-batch and process")
    grad_accum: int = arg(1, "micro-batches per optimizer step")
    lr: float = arg(5e-4, "peak learning rate (after warmup; cosine down to --min-lr-ratio of it)")
    projector_lr_mult: float = arg(5.0, "the projector's learning rate as a multiple of --lr")
    weight_decay: float = arg(0.01, "AdamW weight decay (not on norms and biases)")
    warmup_ratio: float = arg(0.03, "fraction of the steps spent warming the learning rate up")
    min_lr_ratio: float = arg(0.1, "the learning rate at the end, as a fraction of --lr")
    max_seq_len: int = arg(512, "tokens per sample (longer samples are cut and counted)")
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0: no clipping)")
    dtype: str = arg("auto", "auto (bf16 where the GPU has it, else fp16; fp32 on a CPU), bf16, fp16 or fp32")
    device: str = arg("auto", "auto, cpu, cuda, cuda:1, mps")
    grad_checkpointing: bool = arg(False, "recompute activations in the backward pass: less memory, slower steps")
    packing: bool | None = arg(None, "several samples per row with block-diagonal attention: no compute on padding "
                                     "(default: on where a row is one variable-length attention call - the MiniMind "
                                     "language model on a GPU in bf16/fp16 - and with --share-prefix; "
                                     "--no-packing: off)")
    share_prefix: int = arg(0, "with --packing: samples that show one image train in the same step, N at a time, a "
                               "row computing their common start (prompt, image) once; each sees only itself (0: off)")
    parallel: str = arg("ddp", "under torchrun: ddp (a whole replica per process) or fsdp (weights, gradients and "
                               "optimizer state sharded over the processes, per decoder layer)")
    chunked_loss: bool = arg(False, "loss from the hidden states in chunks: less memory, logits recomputed")
    compile: bool = arg(False, "torch.compile each decoder layer, in place (one compilation serves every layer)")
    seed: int = arg(0, "seed of the model's initialisation and the data order")
    num_workers: int = arg(0, "data-loader worker processes (0: in the training process)")
    log_every: int = arg(10, "steps per logged line (the mean loss of those steps)")
    save_every: int = arg(0, "steps between checkpoints (0: at the end only)")
    keep_checkpoints: int = arg(2, "the newest N checkpoints stay (0: all)")
    max_skip_rate: float = arg(0.5, "stop when more than this fraction of the samples read were skipped as bad")
    feature_cache: str | None = arg(None, "folder keeping the vision tower's features: each image runs through "
                                          "the tower once, in every epoch and stage after that none")
    resume: bool = arg(False, "continue the run in --out-dir from its newest checkpoint")
    overwrite: bool = arg(False, "replace a run already in --out-dir")
    loggers: list[str] = arg(help="wandb, swanlab, tensorboard", default_factory=list)
    eval_every: int = arg(0, "steps between evaluations on --eval-data (0: none)")
    evaluate: object = arg(None, "callable(model) -> dict of metrics, run on the main process")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_train_arguments(parser: argparse.ArgumentParser, names: list[str] | None = None, **defaults) -> None:
    """One flag per TrainArgs field (or only `names`), with the field's type, default (or `defaults`) and help."""
    for f in dataclasses.fields(TrainArgs):
        if f.name in NOT_FLAGS or (names is not None and f.name not in names):
            continue
        default = defaults.get(f.name, None if f.default is dataclasses.MISSING else f.default)
        if f.type in ("bool", "bool | None"):  # bool | None: --flag / --no-flag, unset: the default decides
            action = "store_true" if f.type == "bool" else argparse.BooleanOptionalAction
            parser.add_argument(flag(f.name), action=action, default=default, help=f.metadata["help"])
            continue
        kind = {"int": int, "float": float, "int | None": int}.get(f.type, str)
        parser.add_argument(flag(f.name), type=kind, default=default, help=f.metadata["help"],
                            choices={"freeze": [0, 1, 2], "parallel": list(PARALLEL_MODES)}.get(f.name))


def read_config_file(path: str) -> dict:
    """A JSON or YAML mapping of TrainArgs fields (flag names with - or _; a run's run.json works as is) -> {field:
    value}. Unknown keys are errors that name the closest field."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if os.path.splitext(path)[1].lower() in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text)
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {path} is not valid JSON ({err}); YAML files end in .yaml or .yml") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of training arguments, not {type(values).__name__}")
    types = {f.name: f.type for f in dataclasses.fields(TrainArgs) if f.name != "evaluate"}
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in DERIVED:
            continue
        if name not in types:
            close = difflib.get_close_matches(name, types, n=1)
            raise ValueError(f"config file {path}: unknown training argument {key!r}"
                             + (f"; did you mean {close[0]!r}?" if close else ""))
        if not fits(value, types[name]):
            raise ValueError(f"config file {path}: {key} must be {types[name]}, got {value!r}")
        out[name] = value
    return out


def fits(value, annotation: str) -> bool:
    """Whether a config file's value suits a field's annotation ("int | None", "float", ...); a string always does
    (the option's own type reads it, as from the command line)."""
    kinds = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict": (dict,),
             "list[str]": (list,), "None": (type(None),)}
    allowed = tuple(k for part in annotation.split(" | ") for k in kinds.get(part, (object,)))
    if isinstance(value, bool) and bool not in allowed:
        return False
    return isinstance(value, allowed) or (isinstance(value, str) and annotation not in ("dict", "list[str]"))
