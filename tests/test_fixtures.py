"""Parity with the original MiniMind-V: ../shared/fixtures holds tiny checkpoints of both generations with the
original implementation's own outputs (see its README). Skipped cleanly when the folder is absent."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from minimind_v import MiniMindVLM
from minimind_v.interop.original import load_original, read_original
from minimind_v.cli import main
from minimind_v.interop.export import same_tensors
from minimind_v.models.vision_tower import load_image_processor, load_vision_tower
from minimind_v.data.processing import chat_prompt, encode_prompt

FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures"
GENERATIONS = ["minimind2-v", "minimind-3v"]
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason="../shared/fixtures is not present")


def fixture(generation):
    folder = FIXTURES / generation
    expected = json.loads((folder / "expected.json").read_text(encoding="utf-8"))
    return folder, expected


def check_parity(model, folder, expected, tokenizer_dir=None):
    """The issue's checks: input_ids, pixel sum, last-8 logits, argmax everywhere, 12 cached greedy steps."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or folder)
    assert chat_prompt(tokenizer, model.config, expected["prompt"]) == expected["chat_text"]
    input_ids = encode_prompt(tokenizer, model.config, expected["prompt"])
    assert input_ids[0].tolist() == expected["input_ids"]
    pixels = MiniMindVLM.image2tensor(Image.open(folder / "image.png"), model.processor)
    assert abs(pixels.sum().item() - expected["pixel_values_sum"]) < 1e-3
    pixels = pixels.unsqueeze(0)  # [1, 1, 3, H, W]
    with torch.no_grad():
        logits = model(input_ids, pixel_values=pixels, use_cache=False).logits[0]
    last8 = torch.from_numpy(np.load(folder / "expected_last8_logits.npy"))
    torch.testing.assert_close(logits[-8:], last8, atol=1e-4, rtol=0)
    assert logits.argmax(-1).tolist() == expected["expected_argmax"]
    step_logits = torch.from_numpy(np.load(folder / "expected_greedy_step_logits.npy"))
    tokens, cache, step_input = [], None, input_ids
    with torch.no_grad():
        for step in range(12):  # prefill with the image, then one token at a time on the KV cache
            out = model(step_input, pixel_values=pixels if step == 0 else None, past_key_values=cache, use_cache=True)
            torch.testing.assert_close(out.logits[0, -1], step_logits[step], atol=1e-4, rtol=0)
            tokens.append(int(out.logits[0, -1].argmax()))
            cache, step_input = out.past_key_values, torch.tensor([[tokens[-1]]])
    assert tokens == expected["expected_greedy_12"]
    generated = model.generate(input_ids, pixel_values=pixels, max_new_tokens=12, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
    assert generated[0, input_ids.shape[1]:].tolist() == expected["expected_greedy_12"]


@pytest.mark.parametrize("generation", GENERATIONS)
def test_public_api_reproduces_the_original(generation):
    folder, expected = fixture(generation)
    model = load_original(folder / "model.pth", vision_model_path=str(folder / "vision"))
    config = expected["config"]
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.num_key_value_heads,
            model.config.intermediate_size, model.config.rms_norm_eps) == (
        config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"],
        config["intermediate_size"], config["rms_norm_eps"])
    check_parity(model, folder, expected)


@pytest.mark.parametrize("generation", GENERATIONS)
def test_cli_conversion_reproduces_the_original_and_round_trips(generation, tmp_path, capsys):
    folder, expected = fixture(generation)
    hf = tmp_path / "hf"
    assert main(["convert", str(folder / "model.pth"), str(hf), "--vision", str(folder / "vision"),
                 "--tokenizer", str(folder)]) == 0
    assert {"model.safetensors", "config.json", "tokenizer.json", "preprocessor_config.json"} <= set(os.listdir(hf))
    converted = MiniMindVLM.from_pretrained(hf, vision_model_path=None)  # processor and tokenizer: the new folder
    converted.attach_vision_tower(load_vision_tower(folder / "vision"))
    converted.vision_tower.processor = load_image_processor(hf)
    check_parity(converted, folder, expected, tokenizer_dir=hf)
    assert main(["convert", str(hf), str(tmp_path / "back.pth")]) == 0
    assert same_tensors(read_original(folder / "model.pth"), torch.load(tmp_path / "back.pth", weights_only=True))


REMOTE_CHECK = r"""
import sys
sys.modules["minimind_v"] = None  # the package must not be needed: importing it now raises ImportError
import json, numpy as np, torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, fixture = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
expected = json.load(open(fixture + "/expected.json"))
ids = tokenizer(expected["chat_text"], return_tensors="pt", add_special_tokens=False)["input_ids"]
assert ids[0].tolist() == expected["input_ids"]
pixels = model.image2tensor(Image.open(fixture + "/image.png"), model.processor).unsqueeze(0)
with torch.no_grad():
    logits = model(ids, pixel_values=pixels).logits[0]
last8 = torch.from_numpy(np.load(fixture + "/expected_last8_logits.npy"))
assert (logits[-8:] - last8).abs().max() < 1e-4
out = model.generate(ids, pixel_values=pixels, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
assert out[0, ids.shape[1]:].tolist() == expected["expected_greedy_12"]
text = model.generate(tokenizer("hello", return_tensors="pt")["input_ids"], max_new_tokens=3, do_sample=False)
assert text.shape[1] > 1
print("REMOTE OK")
"""

ALLOWED_IMPORTS = {"torch", "transformers", "PIL", "numpy", "__future__", "dataclasses", "difflib", "typing", "json",
                   "logging", "math", "os", "functools", "collections", "safetensors"}  # safetensors comes with transformers


@pytest.mark.parametrize("generation", GENERATIONS)
def test_remote_code_export_runs_without_the_package(generation, tmp_path):
    folder, _ = fixture(generation)
    out = tmp_path / "export"
    assert main(["convert", str(folder / "model.pth"), str(out), "--vision", str(folder / "vision"),
                 "--tokenizer", str(folder), "--remote-code"]) == 0
    for code in out.glob("*.py"):  # the code only needs torch, transformers, pillow (numpy comes with them)
        for line in code.read_text().splitlines():
            if line.startswith(("import ", "from ")) and not line.startswith("from ."):
                assert line.split()[1].split(".")[0] in ALLOWED_IMPORTS, (code.name, line)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([sys.executable, "-c", REMOTE_CHECK, str(out), str(folder)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "REMOTE OK" in result.stdout, result.stderr[-3000:]
