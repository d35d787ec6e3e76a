"""Shared fixtures: tiny random vision towers, a tiny byte-level tokenizer, a saved tiny model and a training
workspace, built once and saved to temporary folders (the helpers they use are in helpers.py)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from helpers import COLORS, build_tokenizer, png, save_clip, save_siglip, tiny_config


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    return save_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def siglip_dir(tmp_path_factory):
    return save_siglip(tmp_path_factory.mktemp("siglip"))


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def model_dir(clip_dir, tokenizer, tmp_path_factory):
    """A tiny random VLM saved as a model folder (tokenizer included), and blue.png beside it."""
    from minimind_v import MiniMindVLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("saved") / "model"
    MiniMindVLM(tiny_config(vocab_size=len(tokenizer)), vision_model_path=clip_dir).save_pretrained(path)
    tokenizer.save_pretrained(path)
    Image.new("RGB", (40, 30), (20, 120, 220)).save(path.parent / "blue.png")
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    build_tokenizer().save_pretrained(root / "tokenizer")
    with open(root / "text.jsonl", "w") as f:
        for i in range(96):
            f.write(json.dumps({"text": f"the {list(COLORS)[i % 3]} square is number {i % 7}."}) + "\n")
    rows = [(json.dumps([{"role": "user", "content": "<image>\nwhat color is it?"},
                         {"role": "assistant", "content": name}]), png(rgb))
            for i in range(48) for name, rgb in [list(COLORS.items())[i % 3]]]
    rows.append((rows[0][0], b"\x89PNG not really"))  # a corrupt image: skipped and counted
    pq.write_table(pa.table({"conversations": [r[0] for r in rows],
                             "image_bytes": pa.array([r[1] for r in rows], type=pa.binary())}), root / "sft.parquet")
    return {"root": root, "tokenizer": str(root / "tokenizer"), "text": str(root / "text.jsonl"),
            "sft": str(root / "sft.parquet"), "clip": save_clip(root / "clip")}
