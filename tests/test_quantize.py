"""int8 weight-only decoder layers (models/quantize.py): close to the full-precision model, the compiled one-row
path equal to the eager one, and the command-line flag."""

import copy

import pytest
import torch
from torch import nn

from helpers import tiny_config
from minimind_v import MiniMindVLM
from minimind_v.build import describe
from minimind_v.cli import main
from minimind_v.generation import Engine, GenerationRequest, SamplingParams
from minimind_v.models.quantize import Int8Linear, int8_weights, quantize_int8


@pytest.fixture(scope="module")
def models(clip_dir, tokenizer):
    torch.manual_seed(0)
    full = MiniMindVLM(tiny_config(vocab_size=len(tokenizer)), vision_model_path=clip_dir).eval()
    quantized = copy.deepcopy(full)
    return full, quantized, quantize_int8(quantized)


def test_every_decoder_linear_becomes_int8_and_the_logits_stay_close(models):
    full, quantized, replaced = models
    layers = full.config.num_hidden_layers
    assert replaced == 7 * layers and int8_weights(quantized) == sum(
        m.weight.numel() for layer in full.decoder_layers() for m in layer.modules() if type(m) is nn.Linear)
    assert "of them int8" in describe(quantized) and "int8" not in describe(full)
    linear = next(m for m in quantized.modules() if isinstance(m, Int8Linear))
    assert linear.weight_int8.dtype == torch.int8 and linear.weight_int8.abs().max() == 127  # each row's max
    ids = torch.randint(0, full.config.vocab_size - 1, (2, 12))
    with torch.inference_mode():
        want, got = full(input_ids=ids).logits, quantized(input_ids=ids).logits
    assert 0 < (got - want).abs().max() <= 0.02 * want.abs().max()  # rounding to 1/254 of each row's range
    with pytest.raises(ValueError, match="bias-free"):
        Int8Linear(nn.Linear(4, 4))


def test_compiled_int8_decoding_equals_eager_int8_decoding(models, tokenizer):
    """On a CPU the compiled step multiplies and sums over the int8 weight (one row); eager decoding converts it."""
    _, quantized, _ = models
    request = GenerationRequest(messages=[{"role": "user", "content": "tell me more"}],
                                params=SamplingParams(max_new_tokens=10))
    eager = Engine(quantized, tokenizer).generate([request])[0].token_ids
    assert Engine(quantized, tokenizer, compile=True).generate([request])[0].token_ids == eager


def test_int8_flag_of_bench_decode(capsys):
    small = ["--set", "hidden_size=64", "--set", "num_hidden_layers=2", "--set", "intermediate_size=128",
             "--set", "num_attention_heads=4", "--set", "num_key_value_heads=2"]
    assert main(["bench", "decode", "--device", "cpu", "--new-tokens", "4", "--batch", "1", "--runs", "1",
                 "--images", "0", "--int8", *small]) == 0
    assert "of them int8" in capsys.readouterr().err


def test_eval_int8_answers_with_int8_layers(model_dir, tmp_path, monkeypatch):
    import json

    import minimind_v.models.quantize as quantize

    replaced = []  # what each quantize_int8 call replaced (the original function, counted)
    monkeypatch.setattr(quantize, "quantize_int8", lambda model: replaced.append(quantize_int8(model)))
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "what color?", "answer": "red"}) + "\n")
    out = tmp_path / "answers.jsonl"
    assert main(["eval", str(model_dir), "--data", str(data), "--output", str(out), "--int8"]) == 0
    assert len(replaced) == 1 and replaced[0] > 0 and len(out.read_text().splitlines()) == 1
