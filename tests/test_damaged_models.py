"""Damaged model folders: every kind of bad config.json or weights file is a one-line error naming the file, found
before anything is allocated; non-finite weights never load. Through the library and through the CLI."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import build_tokenizer, tiny_config
from minimind_v import MiniMindVLM
from minimind_v.cli import main
from minimind_v.config import MiniMindVConfig
from minimind_v.models import load_vlm


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    torch.manual_seed(0)
    MiniMindVLM(tiny_config(vocab_size=300), vision_model_path=None).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def rewrite_config(**changes):
    def change(folder):
        config = json.load(open(folder / "config.json"))
        json.dump({**config, **changes}, open(folder / "config.json", "w"))
    return change


def truncate_weights(fraction):
    def change(folder):
        path = folder / "model.safetensors"
        os.truncate(path, int(os.path.getsize(path) * fraction))
    return change


def make_nan(folder):
    path = folder / "model.safetensors"
    weights = load_file(path)
    weights["model.norm.weight"][3] = float("nan")
    save_file(weights, path, metadata={"format": "pt"})


DAMAGE = {
    "config is a JSON list": (lambda f: json.dump([1, 2], open(f / "config.json", "w")), "config.json must hold a JSON object"),
    "config is {}": (lambda f: json.dump({}, open(f / "config.json", "w")), "config.json does not match the weights"),
    "config is not JSON": (lambda f: (f / "config.json").write_text("{oops"), "config.json is not a readable JSON"),
    "zero heads": (rewrite_config(num_attention_heads=0), "'num_attention_heads' must be at least 1"),
    "negative layers": (rewrite_config(num_hidden_layers=-2), "'num_hidden_layers' must be at least 1"),
    "absurd width": (rewrite_config(hidden_size=10 ** 9, head_dim=None, intermediate_size=None),
                     "config.json asks for a model that cannot be built"),
    "large width": (rewrite_config(hidden_size=10 ** 6, head_dim=None, intermediate_size=None),
                    "config.json does not match the weights"),
    "absurd vocabulary": (rewrite_config(vocab_size=10 ** 10), "config.json does not match the weights"),
    "unknown key": (rewrite_config(hiden_size=64), "unknown MiniMindVConfig key"),
    "empty weights": (truncate_weights(0), "model.safetensors is not a readable safetensors file"),
    "weights cut in the header": (truncate_weights(0.001), "model.safetensors is not a readable safetensors file"),
    "weights cut in the data": (truncate_weights(0.9), "model.safetensors is not a readable safetensors file"),
    "garbage weights": (lambda f: (f / "model.safetensors").write_bytes(os.urandom(4096)),
                        "model.safetensors is not a readable safetensors file"),
    "NaN weights": (make_nan, "hold NaN or infinite values (model.norm.weight)"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_model_folder_is_one_clear_error(good, tmp_path, case, capsys):
    damage, message = DAMAGE[case]
    folder = tmp_path / "model"
    shutil.copytree(good, folder)
    damage(folder)
    with pytest.raises(ValueError) as caught:
        load_vlm(folder)
    assert message in str(caught.value) and str(folder) in str(caught.value)
    assert main(["chat", str(folder), "--prompt", "hi", "--device", "cpu"]) == 2  # the CLI: no traceback
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_good_folder_still_loads_and_sizes_below_one_are_refused(good):
    assert isinstance(load_vlm(good), MiniMindVLM)
    for field in ("vocab_size", "hidden_size", "num_key_value_heads", "max_position_embeddings", "image_token_len"):
        with pytest.raises(ValueError, match=f"'{field}' must be at least 1"):
            MiniMindVConfig(**{**tiny_config().to_dict(), field: 0})
