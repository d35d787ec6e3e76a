"""Original-layout checkpoints this project builds itself: other sizes, MoE of both generations, fp16/fp32,
LLM-only files, and every way a file can fail to match."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from helpers import save_clip, save_siglip
from minimind_v import MiniMindVConfig, MiniMindVLM
from minimind_v.interop.original import SHAPE_FIELDS, detect_config, load_original, read_original, save_original
from minimind_v.interop.export import convert, same_tensors

CASES = {  # preset, overrides: two sizes per generation, dense and MoE
    "2v-dense-64": ("minimind2-v", dict(hidden_size=64, num_hidden_layers=2)),
    "2v-dense-96": ("minimind2-v", dict(hidden_size=96, num_hidden_layers=3, intermediate_size=256)),
    "2v-moe": ("minimind2-v-moe", dict(hidden_size=64, num_hidden_layers=2, n_shared_experts=2)),
    "3v-dense-64": ("minimind-3v", dict(hidden_size=64, num_attention_heads=4, head_dim=16, num_hidden_layers=2,
                                        intermediate_size=192)),
    "3v-moe": ("minimind-3v-moe", dict(hidden_size=64, num_attention_heads=8, head_dim=8, num_key_value_heads=2,
                                       num_hidden_layers=3, intermediate_size=128)),
}


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    return {"clip": save_clip(root / "clip", hidden=32, image_size=224, patch=16),
            "siglip": save_siglip(root / "siglip", hidden=32, image_size=64, patch=8)}


def build(case, towers, seed=0):
    preset, overrides = CASES[case]
    torch.manual_seed(seed)
    config = MiniMindVConfig.from_name(preset, vocab_size=320, ve_hidden_size=32, initializer_range=0.1, **overrides)
    return MiniMindVLM(config, vision_model_path=towers[config.vision_tower_kind]).eval()


def inputs(model):
    config = model.config
    size = 224 if config.vision_tower_kind == "clip" else 64
    ids = torch.tensor([[1, 40, 41] + [config.image_token_id] * config.image_token_len + [42, 43]])
    return ids, torch.randn(1, 1, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_original_layout_round_trip(case, dtype, towers, tmp_path):
    model = build(case, towers)
    path = tmp_path / "model.pth"
    save_original(model, path, dtype=dtype)
    state = torch.load(path, weights_only=True)
    assert all(v.dtype == dtype for v in state.values()) and "lm_head.weight" in state
    assert not any(k.startswith("vision_tower.") for k in state)
    detected = detect_config(state)
    for name in SHAPE_FIELDS + ("qk_norm", "moe_renorm_top1", "image_ids", "image_token_len", "rms_norm_eps"):
        assert getattr(detected, name) == getattr(model.config, name), name
    loaded = load_original(path, vision_model_path=model.config.vision_tower_path)
    reference = build(case, towers)  # the same weights, rounded as the file stores them
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if not name.startswith("vision_tower."):  # the tower comes from its folder, never from the file
                p.copy_(p.to(dtype).float())
    ids, pixels = inputs(model)
    expected = reference(ids, pixel_values=pixels).logits
    torch.testing.assert_close(loaded(ids, pixel_values=pixels).logits, expected, atol=0, rtol=0)
    greedy = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(loaded.generate(ids, pixel_values=pixels, **greedy),
                       reference.generate(ids, pixel_values=pixels, **greedy))
    convert(path, tmp_path / "hf", vision=model.config.vision_tower_path)  # -> HF folder -> original again
    convert(tmp_path / "hf", tmp_path / "back.pth")
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert same_tensors({k: v.half() for k, v in state.items()}, back)


def test_llm_only_checkpoint_gets_a_fresh_projector(towers, tmp_path, caplog):
    model = build("2v-dense-64", towers)
    state = {k: v for k, v in model.state_dict_without_tower().items() if not k.startswith("vision_proj.")}
    torch.save({k: v.half() for k, v in state.items()}, tmp_path / "llm_64.pth")
    with caplog.at_level(logging.WARNING):
        loaded = load_original(tmp_path / "llm_64.pth", vision_model_path=towers["clip"])
    assert "no projector weights" in caplog.text
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.weight, state["model.layers.0.mlp.up_proj.weight"].half().float())
    assert loaded.config.projector_type == "linear" and loaded.config.ve_hidden_size == 32


def test_original_tower_keys_are_ignored_and_fp32_files_load(towers, tmp_path):
    model = build("3v-dense-64", towers)
    state = dict(model.state_dict_without_tower())
    state["vision_encoder.vision_model.post_layernorm.weight"] = torch.ones(32)  # an unfiltered original save
    torch.save(state, tmp_path / "full.pth")
    assert "vision_encoder.vision_model.post_layernorm.weight" not in read_original(tmp_path / "full.pth")
    loaded = load_original(tmp_path / "full.pth", vision_model_path=towers["siglip"])
    ids, pixels = inputs(model)
    torch.testing.assert_close(loaded(ids, pixel_values=pixels).logits, model(ids, pixel_values=pixels).logits)


def test_mismatches_are_errors_that_name_the_keys(towers, tmp_path):
    model = build("2v-moe", towers)
    state = model.state_dict_without_tower()
    broken = {k: v for k, v in state.items() if k != "model.layers.1.mlp.experts.2.up_proj.weight"}
    broken["model.layers.0.self_attn.rotary.weight"] = torch.zeros(3)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"missing keys: \['model.layers.1.mlp.experts.2.up_proj.weight'\].*"
                                         r"unexpected keys: \['model.layers.0.self_attn.rotary.weight'\]"):
        load_original(tmp_path / "broken.pth")
    torch.save(state, tmp_path / "ok.pth")
    with pytest.raises(ValueError, match="intermediate_size: config 999 vs checkpoint"):
        load_original(tmp_path / "ok.pth", config=MiniMindVConfig.from_name("minimind2-v-moe", vocab_size=320,
                      hidden_size=64, num_hidden_layers=2, n_shared_experts=2, intermediate_size=999,
                      ve_hidden_size=32))
    with pytest.raises(ValueError, match="shape-mismatched keys"):
        load_original(tmp_path / "ok.pth", intermediate_size=999)
    torch.save({"a": 1}, tmp_path / "notensors.pth")
    with pytest.raises(ValueError, match="state dict of tensors"):
        read_original(tmp_path / "notensors.pth")
    torch.save({"lm_head.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a MiniMind checkpoint"):
        load_original(tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError):
        read_original(tmp_path / "absent.pth")


REMOTE = r"""
import sys
sys.modules["minimind_v"] = None
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
ids, pixels, expected = torch.load(sys.argv[2], weights_only=True)
diff = (model(ids, pixel_values=pixels).logits - expected).abs().max()
assert diff < 1e-5, f"logits differ by {diff}"
print("REMOTE OK")
"""


def test_remote_code_export_of_a_moe_model(towers, tmp_path):
    model = build("3v-moe", towers)
    save_original(model, tmp_path / "moe.pth", dtype=torch.float32)
    convert(tmp_path / "moe.pth", tmp_path / "export", vision=towers["siglip"], remote_code=True)
    ids, pixels = inputs(model)
    with torch.no_grad():
        torch.save((ids, pixels, model(ids, pixel_values=pixels).logits), tmp_path / "io.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", REMOTE, str(tmp_path / "export"), str(tmp_path / "io.pt")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "REMOTE OK" in result.stdout, result.stderr[-3000:]


def test_convert_to_a_pth_in_a_missing_folder_creates_it(model_dir, tmp_path):
    from minimind_v.cli import main

    target = tmp_path / "not" / "yet" / "model.pth"
    assert main(["convert", str(model_dir), str(target)]) == 0
    state = torch.load(target, weights_only=True)
    assert state and all(t.dtype == torch.float16 for t in state.values())


PROCESSOR = r"""
import json, sys
sys.modules["minimind_v"] = None
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor, pipeline
folder, image = sys.argv[1], sys.argv[2]
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[Image.open(image)], text=prompt)
tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
chat = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
messages[0]["content"][0]["image"] = image
text = chat(text=messages, max_new_tokens=6, return_full_text=False)[0]["generated_text"]
print(json.dumps({"processor": type(processor).__name__, "prompt": prompt, "tokens": tokens, "text": text,
                  "pixels": list(inputs["pixel_values"].shape)}))
"""


def test_the_remote_code_export_has_a_processor_a_content_part_template_and_a_model_card(model_dir, tmp_path):
    """Without this package: AutoProcessor gives the processor, its chat template takes content parts, its output
    feeds generate, and pipeline("image-text-to-text") answers - the same tokens as this package's own prompt."""
    from minimind_v.build import load_model
    from minimind_v.data.processing import encode_prompt

    convert(model_dir, tmp_path / "export", remote_code=True)
    image = str(model_dir.parent / "blue.png")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", PROCESSOR, str(tmp_path / "export"), image], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    model, tokenizer = load_model(str(model_dir))
    ids = encode_prompt(tokenizer, model.config, [{"role": "user", "content": "<image>what is this?"}])
    from PIL import Image

    pixels = model.image2tensor(Image.open(image), model.processor)[None]
    expected = model.generate(ids, pixel_values=pixels, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
    assert got["processor"] == "MiniMindVProcessor" and got["prompt"].endswith("<image>what is this?<|im_end|>\n"
                                                                                "<|im_start|>assistant\n")
    assert got["tokens"] == expected and got["pixels"][0] == 1
    assert got["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    card = (tmp_path / "export" / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and f"{sum(p.numel() for p in model.parameters()):,}" in card
