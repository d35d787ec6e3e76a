"""Helpers the tests share: tiny random vision towers and a byte-level tokenizer built in temporary folders, a tiny
VLM config, and the training workspace's settings. (conftest.py holds the fixtures built from them.)"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (CLIPConfig, CLIPImageProcessorPil, CLIPModel, PreTrainedTokenizerFast, SiglipImageProcessorPil,
                          SiglipVisionConfig, SiglipVisionModel)

from minimind_v import MiniMindVConfig
from minimind_v.training.trainer import TrainArgs

SHARED = Path(__file__).resolve().parents[2] / "shared"  # ../shared beside the repository
GENERATOR = SHARED / "bench" / "make_vlm_parquet.py"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_clip(path, hidden: int = 32, image_size: int = 32, patch: int = 8, heads: int = 4):
    """A full random CLIPModel folder (text half included, as openai/clip-vit-base-patch16) + its processor."""
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=hidden, intermediate_size=64, num_hidden_layers=1, num_attention_heads=heads,
                           image_size=image_size, patch_size=patch),
        projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return str(path)


def save_siglip(path, hidden: int = 32, image_size: int = 32, patch: int = 8):
    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                image_size=image_size, patch_size=patch)
    SiglipVisionModel(config).save_pretrained(path)
    SiglipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return str(path)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: 3 ChatML specials, then the 256 byte symbols (so '@' is id 34, as in MiniMind)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=259, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["hello world"], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", model_max_length=4096)
    fast.chat_template = CHATML
    assert fast.convert_tokens_to_ids("@") == 34
    return fast


def tiny_config(**overrides) -> MiniMindVConfig:
    """A 2-layer, 64-wide VLM config matching the 32-wide, 16-token tiny towers above."""
    base = dict(vocab_size=300, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                intermediate_size=128, max_position_embeddings=512, image_special_token="@" * 16,
                image_ids=[34] * 16, ve_hidden_size=32)
    return MiniMindVConfig(**{**base, **overrides})


# --- the tiny training workspace (conftest.workspace builds it)

MODEL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3, intermediate_size=96,
             max_position_embeddings=256, image_special_token="@" * 16, image_ids=[34] * 16, ve_hidden_size=32,
             vision_tower_kind="clip")
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def png(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buffer, format="PNG")
    return buffer.getvalue()


def args_for(ws, stage, out, **kw) -> TrainArgs:
    data = ws["text"] if stage == "pretrain-llm" else ws["sft"]
    base = dict(stage=stage, data=data, out_dir=str(out), tokenizer=ws["tokenizer"], vision=ws["clip"],
                overrides=dict(MODEL), batch_size=8, lr=3e-3, max_seq_len=64, log_every=1, warmup_ratio=0.1,
                device="cpu")  # test_train_options.py runs the numeric options on a GPU too
    return TrainArgs(**{**base, **kw})


def weights(out) -> dict:
    return load_file(os.path.join(out, "model", "model.safetensors"))


# --- runs under torchrun (Gloo on the CPU)

RUN_ONE = r"""
import json, os, sys
from minimind_v.training.trainer import TrainArgs, Trainer
spec = json.loads(sys.argv[1])
crash = spec.pop("crash", None)  # [step, rank]: that process raises when the step begins
trainer = Trainer(TrainArgs(**spec))
if crash and int(os.environ["RANK"]) == crash[1]:
    step = trainer.train_step
    def train_step(batches):
        if trainer.step == crash[0]:
            raise RuntimeError(f"injected failure at step {trainer.step} in rank {crash[1]}")
        return step(batches)
    trainer.train_step = train_step
trainer.run()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: TrainArgs, tmp_path, nodes: int = 1, crash: tuple[int, int] | None = None, check: bool = True):
    """The run under `torchrun`: 2 processes on one node, or `nodes` single-process "nodes" meeting through a c10d
    rendezvous on this machine -> the completed processes (one per node)."""
    spec = {k: v for k, v in args.__dict__.items() if k != "evaluate"} | ({"crash": list(crash)} if crash else {})
    script = tmp_path / "run_one.py"
    script.write_text(RUN_ONE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = free_port()
    where = (["--nproc_per_node=2", f"--master_port={port}"] if nodes == 1 else
             [f"--nnodes={nodes}", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
              "--rdzv-id=test"])
    command = [sys.executable, "-m", "torch.distributed.run", *where, str(script), json.dumps(spec)]
    running = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                cwd=tmp_path) for _ in range(nodes)]
    results = []
    for process in running:
        out, err = process.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(command, process.returncode, out, err))
    if check:
        for result in results:
            assert result.returncode == 0, result.stderr[-3000:]
    return results
