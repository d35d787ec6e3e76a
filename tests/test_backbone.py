"""Any Hugging Face causal LM as the language model: tiny random Qwen3 and Llama backbones saved to temp folders
train, save only what trained, reload and generate through the public API; LoRA counts and the merged export."""

import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from helpers import args_for, build_tokenizer
from minimind_v.cli import main
from minimind_v.generation import Engine, GenerationRequest, SamplingParams
from minimind_v.build import load_for_inference
from minimind_v.models.backbone import IMAGE_PAD, load_backbone_tokenizer
from minimind_v.models.backbone import HFBackboneVLM
from minimind_v.models import load_vlm
from minimind_v.training.trainer import Trainer

VISION = {"ve_hidden_size": 32, "image_token_len": 16}  # the conftest CLIP tower: 32 px, 8 px patches, 32 wide


def save_backbone(path, kind: str, hidden: int = 64) -> str:
    """A tiny random causal LM + tokenizer. qwen3: has <|image_pad|>, tied, vocab padded past the tokenizer;
    llama: no placeholder token (it gets added), untied head."""
    tok = build_tokenizer()
    if kind == "qwen3":
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_PAD]})
    common = dict(hidden_size=hidden, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = (Qwen3Config(vocab_size=len(tok) + 12, head_dim=16, tie_word_embeddings=True, **common)
              if kind == "qwen3" else LlamaConfig(vocab_size=len(tok), tie_word_embeddings=False, **common))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def backbone(request, tmp_path_factory):
    return request.param, save_backbone(tmp_path_factory.mktemp(request.param), request.param)


def hf_args(workspace, out, llm, **kw):
    return args_for(workspace, "sft", out, llm=llm, tokenizer=None, overrides=dict(VISION), **kw)


def color_request(color=(220, 30, 30)):
    return GenerationRequest(messages=[{"role": "user", "content": "<image>\nwhat color is it?"}],
                             images=[Image.new("RGB", (40, 40), color)], params=SamplingParams(max_new_tokens=6))


def first_batch_logits(model, trainer):
    batch = next(trainer.batches([list(range(4))]))[0]
    features = trainer.features(batch["images"], batch["image_keys"], model.device)
    with torch.no_grad():
        return model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            image_features=features).logits


def test_backbone_trains_saves_reloads_and_generates(backbone, workspace, tmp_path):
    kind, llm = backbone
    trainer = Trainer(hf_args(workspace, tmp_path, llm, max_steps=8))
    model = trainer.model
    assert isinstance(model, HFBackboneVLM) and type(model.language_model).__name__.lower().startswith(kind)
    layers = model.decoder_layers()
    trained = (sum(p.numel() for p in model.vision_proj.parameters()) +
               sum(p.numel() for layer in (layers[0], layers[-1]) for p in layer.parameters()))  # sft: freeze 1
    assert trainer.params["trainable_params"] == trained
    summary = trainer.run()
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = [r["loss"] for r in records if "step" in r and "loss" in r]
    assert losses[-1] < losses[0] and summary["trainable_params"] == trained

    saved = load_file(tmp_path / "model" / "model.safetensors")  # only what trained: projector + layers 0 and 2
    assert {k.split(".")[0] for k in saved} == {"vision_proj", "language_model"}
    assert {k.split(".layers.")[1].split(".")[0] for k in saved if k.startswith("language_model")} == {"0", "2"}
    config = json.load(open(tmp_path / "model" / "config.json"))
    assert config["llm_path"] == os.path.abspath(llm) and config["vocab_size"] >= len(trainer.tokenizer)

    reloaded, tokenizer = load_for_inference(str(tmp_path / "model"), device="cpu")
    assert torch.equal(first_batch_logits(reloaded, trainer), first_batch_logits(model, trainer))
    result = Engine(reloaded, tokenizer).generate([color_request()])[0]
    assert result.completion_tokens > 0 and result.token_ids == Engine(model, trainer.tokenizer).generate(
        [color_request()])[0].token_ids


def test_backbones_decode_in_fixed_shape_steps(backbone, clip_dir):
    """A Hugging Face backbone decodes through the fixed-shape step (what CUDA graphs replay; run eagerly here, and
    compiled as `--compile` does on a CPU) to the tokens of step-by-step decoding, padded rows and images included;
    one with a sliding window or a mixture of experts keeps step-by-step decoding."""
    from minimind_v.build import new_model
    from minimind_v.generation.static_decode import DecoderPool

    kind, llm = backbone
    model, tokenizer = new_model("minimind2-v", llm=llm, vision=clip_dir, overrides=dict(VISION), seed=0)
    model.eval()
    assert model.supports_static_decode
    requests = [color_request(), GenerationRequest(messages=[{"role": "user", "content": "hi, who are you?"}],
                                                   params=SamplingParams(max_new_tokens=9))]
    dynamic = [r.token_ids for r in Engine(model, tokenizer).generate(requests)]
    static = Engine(model, tokenizer)
    static.decoders = DecoderPool()
    assert [r.token_ids for r in static.generate(requests)] == dynamic and len(static.decoders.decoders) == 1
    if kind == "qwen3":  # compiling takes a while on 2 cores: one backbone
        compiled = Engine(model, tokenizer, compile=True)
        assert compiled.decoding_mode() == "compiled static steps"
        assert [r.token_ids for r in compiled.generate(requests)] == dynamic
    text = model.language_model.config.get_text_config()
    for name, value in (("sliding_window", 64), ("num_experts", 4)):
        old = getattr(text, name, None)
        setattr(text, name, value)
        if name == "sliding_window":
            text.use_sliding_window = True
        assert not model.supports_static_decode
        setattr(text, name, old)
        text.use_sliding_window = False
    assert model.supports_static_decode


def test_placeholder_token_added_with_the_mean_embedding(backbone, tmp_path):
    kind, llm = backbone
    tokenizer = load_backbone_tokenizer(llm)
    base = AutoModelForCausalLM.from_pretrained(llm)
    trainer_args = hf_args({"sft": "", "clip": None, "tokenizer": None}, tmp_path, llm)
    from minimind_v.build import training_model

    model, _ = training_model(trainer_args)
    image_id = model.config.image_token_id
    assert tokenizer.convert_tokens_to_ids(IMAGE_PAD) == image_id
    embed = model.get_input_embeddings().weight
    if kind == "llama":  # added: one new row (input and untied output) at the mean of the old ones
        assert image_id == base.config.vocab_size and embed.shape[0] == base.config.vocab_size + 1
        for table, old in ((embed, base.get_input_embeddings().weight),
                           (model.get_output_embeddings().weight, base.get_output_embeddings().weight)):
            assert torch.allclose(table[-1], old.mean(0)) and torch.equal(table[:-1], old)
    else:  # Qwen3's tokenizer has it: nothing resized
        assert embed.shape[0] == base.config.vocab_size and torch.equal(embed, base.get_input_embeddings().weight)
    own = model.language_model.state_dict()  # building the VLM leaves every base weight as it was
    assert all(torch.equal(own[k], v) for k, v in base.state_dict().items() if "embed" not in k and "lm_head" not in k)


def test_lora_counts_checkpoint_and_merged_export(backbone, workspace, tmp_path):
    kind, llm = backbone
    trainer = Trainer(hf_args(workspace, tmp_path / "run", llm, lora_rank=4, freeze=0, max_steps=4))
    model, rank = trainer.model, 4
    base = AutoModelForCausalLM.from_pretrained(llm)
    targets = [m for name, m in base.named_modules()
               if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in model.config.lora_targets]
    lora = sum(rank * (m.in_features + m.out_features) for m in targets)
    assert len(targets) == 7 * 3 and trainer.params["trainable_params"] == lora + sum(
        p.numel() for p in model.vision_proj.parameters())
    trainer.run()
    saved = load_file(tmp_path / "run" / "model" / "model.safetensors")  # projector + adapters, no base weight
    assert all(k.startswith("vision_proj.") or ".lora_" in k for k in saved)
    assert sum(v.numel() for k, v in saved.items() if ".lora_" in k) == lora
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # the adapters did train

    assert main(["convert", str(tmp_path / "run" / "model"), str(tmp_path / "merged")]) == 0
    merged = load_vlm(str(tmp_path / "merged"))
    assert merged.config.lora_rank == 0 and merged.config.llm_path == "language_model"
    assert not any(".lora_" in k for k in merged.state_dict())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "language_model")  # a plain HF model
    assert type(plain).__name__.lower().startswith(kind)
    unmerged = load_vlm(str(tmp_path / "run" / "model"))
    assert (first_batch_logits(merged, trainer) - first_batch_logits(unmerged, trainer)).abs().max() < 1e-4


def test_frozen_backbone_weights_in_bf16(backbone, workspace, tmp_path):
    _, llm = backbone
    trainer = Trainer(hf_args(workspace, tmp_path, llm, dtype="bf16", max_steps=2))
    dtypes = {p.requires_grad: p.dtype for p in trainer.model.language_model.parameters()}
    assert dtypes == {False: torch.bfloat16, True: torch.float32}  # frozen halves; trained keep fp32 masters
    summary = trainer.run()
    assert torch.isfinite(torch.tensor(summary["loss"]))


def test_gradient_checkpointing_on_the_backbone_gives_the_same_weights(workspace, tmp_path):
    llm = save_backbone(tmp_path / "llama", "llama")
    runs = []
    for checkpointing in (False, True):
        trainer = Trainer(hf_args(workspace, tmp_path / str(checkpointing), llm, grad_checkpointing=checkpointing,
                                  max_steps=2))
        lm = trainer.model.language_model  # the attribute's name in transformers >= 5.23, and before
        on = lm.is_activation_checkpointing if hasattr(lm, "is_activation_checkpointing") else \
            lm.is_gradient_checkpointing
        assert on == checkpointing
        trainer.run()
        runs.append(load_file(tmp_path / str(checkpointing) / "model" / "model.safetensors"))
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.allclose(runs[0][k], runs[1][k], atol=1e-6) for k in runs[0])


def test_cli_trains_on_a_backbone_and_chat_answers(workspace, tmp_path, capsys):
    llm = save_backbone(tmp_path / "qwen", "qwen3")
    assert main(["train", "sft", "--llm", llm, "--data", workspace["sft"], "--out-dir", str(tmp_path / "run"),
                 "--vision", workspace["clip"], "--max-steps", "2", "--batch-size", "4", "--max-seq-len", "64",
                 "--device", "cpu", "--set", "ve_hidden_size=32", "--set", "image_token_len=16"]) == 0
    assert "trainable parameters:" in capsys.readouterr().err
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (220, 30, 30)).save(image)
    assert main(["chat", str(tmp_path / "run" / "model"), "--image", str(image), "--prompt", "color?",
                 "--max-new-tokens", "4", "--device", "cpu"]) == 0


def test_bad_backbones_are_clear_errors(workspace, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Trainer(hf_args(workspace, tmp_path / "a", str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="not a causal language model"):
        Trainer(hf_args(workspace, tmp_path / "b", workspace["clip"]))
    llm = save_backbone(tmp_path / "llama", "llama")
    Trainer(hf_args(workspace, tmp_path / "c", llm, max_steps=1)).run()
    save_backbone(tmp_path / "llama", "llama", hidden=32)  # the base folder changed under the checkpoint
    with pytest.raises(ValueError, match="still the base model"):
        load_vlm(str(tmp_path / "c" / "model"))


def test_lora_on_the_minimind_backbone(workspace, tmp_path):
    trainer = Trainer(args_for(workspace, "sft", tmp_path / "run", lora_rank=4, freeze=0, max_steps=3))
    model = trainer.model
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert adapters > 0 and trainer.params["trainable_params"] == adapters + sum(
        p.numel() for p in model.vision_proj.parameters())
    trainer.run()
    reloaded = load_vlm(str(tmp_path / "run" / "model"))
    assert reloaded.config.lora_rank == 4
    assert torch.equal(first_batch_logits(reloaded, trainer), first_batch_logits(model, trainer))
    assert main(["convert", str(tmp_path / "run" / "model"), str(tmp_path / "merged")]) == 0
    merged = load_vlm(str(tmp_path / "merged"))
    assert merged.config.lora_rank == 0 and not any(".lora_" in k for k in merged.state_dict())
    assert (first_batch_logits(merged, trainer) - first_batch_logits(reloaded, trainer)).abs().max() < 1e-4
    assert main(["convert", str(tmp_path / "run" / "model"), str(tmp_path / "merged.pth")]) == 0  # merged, too
    assert not any(".lora_" in k for k in torch.load(tmp_path / "merged.pth", weights_only=True))


def test_stages_chain_and_keep_what_earlier_stages_trained(workspace, tmp_path):
    llm = save_backbone(tmp_path / "llama", "llama")
    Trainer(hf_args(workspace, tmp_path / "a", llm, max_steps=2)).run()  # sft: layers 0 and 2 train
    first = load_file(tmp_path / "a" / "model" / "model.safetensors")
    later = Trainer(args_for(workspace, "sft", tmp_path / "b", from_weight=str(tmp_path / "a" / "model"),
                             tokenizer=None, vision=None, freeze=2, dtype="bf16", max_steps=2))
    assert later.model.config.trained_llm_parts == ["language_model.model.layers.0.", "language_model.model.layers.2."]
    later.run()
    second = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert second.keys() == first.keys()  # still saved, in fp32, unchanged (frozen in this stage)
    assert all(torch.equal(second[k], first[k]) for k in first if not k.startswith("vision_proj."))
    assert not all(torch.equal(second[k], first[k]) for k in first if k.startswith("vision_proj."))


def test_resume_with_lora_on_a_backbone(workspace, tmp_path, monkeypatch):
    from test_train import run_until_crash

    llm = save_backbone(tmp_path / "llama", "llama")
    kw = dict(epochs=2, lora_rank=4, freeze=0, save_every=3)
    Trainer(hf_args(workspace, tmp_path / "straight", llm, **kw)).run()
    run_until_crash(Trainer(hf_args(workspace, tmp_path / "resumed", llm, **kw)), 7, monkeypatch)
    resumed = Trainer(hf_args(workspace, tmp_path / "resumed", llm, resume=True, **kw))
    assert resumed.step == 6
    resumed.run()
    straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    again = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert straight.keys() == again.keys()
    for key in straight:
        torch.testing.assert_close(again[key], straight[key], atol=1e-6, rtol=1e-5)


def test_the_api_server_serves_a_backbone_model(workspace, tmp_path):
    openai = pytest.importorskip("openai")
    uvicorn = pytest.importorskip("uvicorn")
    import base64
    import io
    import threading
    import time

    from minimind_v.serving.openai_api import ServerSettings, create_app
    from test_server import free_port

    llm = save_backbone(tmp_path / "qwen", "qwen3")
    Trainer(hf_args(workspace, tmp_path / "run", llm, max_steps=1)).run()
    model, tokenizer = load_for_inference(str(tmp_path / "run" / "model"), device="cpu")
    engine = Engine(model, tokenizer)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, ServerSettings(model_name="qwen-vlm")),
                                           host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        buffer = io.BytesIO()
        color_request().images[0].save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(model="qwen-vlm", max_tokens=6, temperature=0, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "\nwhat color is it?"}]}])
        assert reply.choices[0].message.content == engine.generate([color_request()])[0].text
    finally:
        server.should_exit = True
        thread.join(timeout=10)
