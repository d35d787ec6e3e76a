"""The reference setting of the performance figures (`minimind-v bench train` / `bench decode`).

    language model   MiniMind 768 x 8 (the `minimind-3v` preset, dense), random weights, the shipped tokenizer
    vision tower     SigLIP B/32-256 with random weights (768 wide, 12 layers, 64 tokens per 256-px image)
    data             the shared generator's parquet (`make_vlm_parquet.py OUT ROWS --seed 0`, 2,400 rows)
    tokenizer        the original 6,400-token MiniMind tokenizer where the shared fixtures have it (the reference's
                     token counts: 423 per row on average), else the shipped one (longer rows)

The same setting as the original MiniMind-V timings. Where the generator and the original tokenizer are comes from
flags (`--generator`, `--data`, `--tokenizer`) or the environment ($MINIMIND_V_BENCH_GENERATOR,
$MINIMIND_V_BENCH_TOKENIZER); nothing is looked up elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import torch
from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

PRESET = "minimind-3v"
GENERATOR_ENV = "MINIMIND_V_BENCH_GENERATOR"  # the data generator, make_vlm_parquet.py (or pass --generator)
TOKENIZER_ENV = "MINIMIND_V_BENCH_TOKENIZER"  # the original 6,400-token tokenizer folder (or pass --tokenizer)


# the original MiniMind-V's figures in this setting (../shared/bench/README.md), printed under the bench tables
REFERENCE_TRAIN = ("original MiniMind-V on one H200, whole LLM trainable: batch 16 223.7 samples/s (93,325 real "
                   "tokens/s) eager, 379.6 with torch.compile; its best, batch 128 compiled, 722.7 (301,489)")
REFERENCE_DECODE = ("original MiniMind-V (transformers generate, fp16, 256 new tokens) on one H200: 127.4 tokens/s at "
                    "batch 1, 7,727 at batch 64; 34 at batch 1 on a 2-core CPU in fp32")


def save_reference_tower(path: str | os.PathLike) -> str:
    """A random SigLIP B/32-256 vision tower folder (seeded), with its image processor."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "config.json")):  # under torchrun every process may get here: each
        torch.manual_seed(0)                                      # writes its own folder, the first rename wins
        config = SiglipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                    num_attention_heads=12, image_size=256, patch_size=32)
        mine = f"{path}.tmp{os.getpid()}"
        SiglipVisionModel(config).save_pretrained(mine)
        SiglipImageProcessorPil(size={"height": 256, "width": 256}).save_pretrained(mine)
        try:
            os.rename(mine, path)
        except OSError:  # another process's folder is there
            shutil.rmtree(mine)
    return path


def reference_model(tower: str | None, **overrides):
    """(model, tokenizer): the 768 x 8 MiniMind VLM with random weights (seed 0) on `tower` (None: text only), sized
    to the shipped tokenizer."""
    from ..build import new_model

    return new_model(PRESET, vision=tower, overrides=overrides, seed=0)


def reference_for_inference(with_tower: bool = True, device: str = "auto", dtype: str = "auto", int8: bool = False,
                            **overrides):
    """The reference 768 x 8 model (random weights; a random SigLIP B/32-256 tower unless `with_tower` is False)
    on `device` in the policy's dtype (`int8`: its decoder layers' weights int8) -> (model, tokenizer)."""
    import tempfile

    from ..build import for_inference

    tower = save_reference_tower(os.path.join(tempfile.gettempdir(), "minimind-v-reference-tower")) if with_tower \
        else None
    model, tokenizer = reference_model(tower, **overrides)
    return for_inference(model, device, dtype, int8), tokenizer


def find_generator(path: str | None = None) -> str:
    """The reference data generator: `path`, else $MINIMIND_V_BENCH_GENERATOR."""
    candidate = path or os.environ.get(GENERATOR_ENV)
    if candidate and os.path.isfile(candidate):
        return candidate
    where = f"{candidate!r} does not exist" if candidate else f"neither --generator nor ${GENERATOR_ENV} is set"
    raise FileNotFoundError(f"the reference data generator make_vlm_parquet.py was not found ({where}); pass "
                            f"--generator PATH, set ${GENERATOR_ENV}, or pass --data PARQUET")


def find_reference_tokenizer() -> str | None:
    """The original MiniMind tokenizer folder named by $MINIMIND_V_BENCH_TOKENIZER, if set (else None: the shipped
    one); an unusable folder is an error rather than a silent change of setting."""
    folder = os.environ.get(TOKENIZER_ENV)
    if folder and not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        raise FileNotFoundError(f"${TOKENIZER_ENV}={folder!r} holds no tokenizer.json")
    return folder or None


def make_reference_data(out: str | os.PathLike, rows: int = 2400, seed: int = 0, generator: str | None = None) -> str:
    """Write (once) the generator's parquet of `rows` rows; returns its path."""
    out = os.fspath(out)
    if not os.path.isfile(out):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        mine = f"{out}.tmp{os.getpid()}"  # every process of a torchrun run may write it: the same bytes
        subprocess.run([sys.executable, find_generator(generator), mine, str(rows), "--seed", str(seed)], check=True)
        os.replace(mine, out)
    return out
