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
    before = int8_weights(quantized)
    assert quantize_int8(quantized) == 0 and int8_weights(quantized) == before  # already int8: left as it is
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

    import minimind_v.build as build

    replaced = []  # what each quantize_int8 call replaced (the original function, counted)
    monkeypatch.setattr(build, "quantize_int8", lambda model: replaced.append(quantize_int8(model)))
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "what color?", "answer": "red"}) + "\n")
    out = tmp_path / "answers.jsonl"
    assert main(["eval", str(model_dir), "--data", str(data), "--output", str(out), "--int8"]) == 0
    assert len(replaced) == 1 and replaced[0] > 0 and len(out.read_text().splitlines()) == 1


def test_an_int8_folder_saves_a_quarter_and_loads_as_int8(model_dir, tmp_path):
    """`convert --int8`: the folder holds int8 weights and scales, loads strictly as int8 (no flag needed) with the
    logits of the model quantized in memory, and `--int8` on it changes nothing."""
    from minimind_v.build import load_for_inference
    from minimind_v.models import load_vlm

    target = tmp_path / "int8"
    assert main(["convert", str(model_dir), str(target), "--int8"]) == 0
    full_size, int8_size = ((folder / "model.safetensors").stat().st_size for folder in (model_dir, target))
    assert int8_size < 0.6 * full_size  # the tiny model's decoder layers are most of its weights
    loaded = load_vlm(target)
    assert loaded.config.int8_weights and int8_weights(loaded) > 0
    expected = load_vlm(model_dir)
    quantize_int8(expected)
    assert expected.config.int8_weights  # a MiniMind model records it, so it saves as int8
    ids = torch.randint(0, expected.config.vocab_size - 1, (1, 9))
    with torch.inference_mode():
        assert torch.equal(loaded.eval()(input_ids=ids).logits, expected.eval()(input_ids=ids).logits)
    again, _ = load_for_inference(str(target), device="cpu", int8=True)
    assert int8_weights(again) == int8_weights(loaded)
    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "what color?", "answer": "red"}\n')
    assert main(["eval", str(target), "--data", str(data), "--int8"]) == 0  # the flag on an int8 folder: no-op


def test_int8_folders_are_refused_where_full_weights_are_needed(model_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from minimind_v.build import training_model
    from minimind_v.models import load_vlm
    from minimind_v.training.trainer import TrainArgs

    target = tmp_path / "int8"
    assert main(["convert", str(model_dir), str(target), "--int8"]) == 0
    assert main(["convert", str(target), str(tmp_path / "back.pth")]) == 2
    assert main(["convert", str(model_dir), str(tmp_path / "m.pth"), "--int8"]) == 2
    err = capsys.readouterr().err
    assert "holds int8 weights" in err and "no int8 weights" in err
    with pytest.raises(ValueError, match="int8 weights, which only answer"):
        training_model(TrainArgs(stage="sft", data="unused", out_dir=str(tmp_path), from_weight=str(target)))
    weights = load_file(target / "model.safetensors")
    scale = next(key for key in weights if key.endswith(".scale"))
    weights[scale] = torch.full_like(weights[scale], float("nan"))
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"NaN or infinite values \\({scale}"):
        load_vlm(target)
    with pytest.raises(ValueError, match="int8_weights"):
        tiny_config(int8_weights=True, lora_rank=4)


REMOTE_INT8 = r"""
import sys
sys.modules["minimind_v"] = None
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
assert sum(b.dtype == torch.int8 for b in model.buffers()) == 7 * model.config.num_hidden_layers
ids, expected = torch.load(sys.argv[2], weights_only=True)
assert torch.equal(model(ids).logits, expected), "logits differ"
print("REMOTE OK")
"""


def test_the_remote_code_export_carries_int8_weights(model_dir, tmp_path):
    import os
    import subprocess
    import sys

    from minimind_v.models import load_vlm

    assert main(["convert", str(model_dir), str(tmp_path / "export"), "--remote-code", "--int8"]) == 0
    model = load_vlm(model_dir)
    quantize_int8(model)
    ids = torch.randint(0, model.config.vocab_size - 1, (1, 7))
    with torch.inference_mode():
        torch.save((ids, model.eval()(input_ids=ids).logits), tmp_path / "io.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", REMOTE_INT8, str(tmp_path / "export"), str(tmp_path / "io.pt")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "REMOTE OK" in result.stdout, result.stderr[-3000:]


def test_int8_projections_fuse_into_one_product(models, monkeypatch):
    """q/k/v (and gate/up) of int8 layers as one product over their stacked rows and scales: the outputs of each
    layer alone (the path compiled GPU steps take, forced here on the CPU)."""
    import minimind_v.models.attention as attention

    _, quantized, _ = models
    layer = quantized.decoder_layers()[0]
    linears = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
    for rows in (1, 12):  # the multiply-and-sum of a small step; the converted weight of a larger one
        x = torch.randn(rows, 1, quantized.config.hidden_size)
        with torch.inference_mode():
            alone = attention.projections(x, *linears)
            monkeypatch.setattr(attention, "fuse_projections", lambda x: True)
            fused = attention.projections(x, *linears)
            monkeypatch.undo()
        assert [t.shape for t in fused] == [t.shape for t in alone]
        assert all(torch.allclose(f, a, atol=1e-5) for f, a in zip(fused, alone))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_compiled_int8_graphs_on_a_gpu_equal_eager_int8_decoding(models, tokenizer):
    """Small steps (one row: multiply and sum) and larger ones (12 rows: the converted weight), fused, graphed."""
    _, quantized, _ = models
    model = copy.deepcopy(quantized).to("cuda")
    ask = [GenerationRequest(messages=[{"role": "user", "content": f"say {i}"}],
                             params=SamplingParams(max_new_tokens=16)) for i in range(12)]
    compiled, eager = Engine(model, tokenizer, compile=True), Engine(model, tokenizer, cuda_graphs=False)
    for requests in (ask[:1], ask):
        assert [r.token_ids for r in compiled.generate(requests)] == [r.token_ids for r in eager.generate(requests)]
