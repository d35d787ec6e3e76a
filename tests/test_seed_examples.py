"""The seed usage document's examples, run as written (only the import line changed).

Examples 1-5 live verbatim, one per file, in tests/seed_examples/ (named so that pytest never collects or imports
them). `test_seed_example` runs each file with exec in a fresh working directory prepared with what the example
assumes (the image files and a random CLIP ViT-B/16-shaped folder at ./models/clip-vit-base-patch16), in a namespace
holding the names the example uses without defining them (`tokenizer`, a `model`, the seed's imports), then checks
the results: the namespace's variables, the printed output and the logs. The one deliberate change to the seed's code
is the Aux_Loss log line of example 5, whose f-string format spec is invalid Python (see the comment there).
"""

from __future__ import annotations

import abc
import contextlib
import math
import os
import re
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import build_tokenizer, save_clip, tiny_config
from minimind_v import MiniMindVLM, VLLMconfig, get_model_configs  # noqa: F401  (the seed's names)

CLIP_REL = os.path.join("models", "clip-vit-base-patch16")
SEED_EXAMPLES = Path(__file__).resolve().parent / "seed_examples"
# what the seed's examples use as already imported (example 1 shows these imports; examples 2-5 omit them)
SEED_NAMES = dict(torch=torch, Image=Image, MiniMindVLM=MiniMindVLM, VLLMconfig=VLLMconfig)


# --------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def clip224_dir(tmp_path_factory):
    """A random full CLIPModel folder shaped like openai/clip-vit-base-patch16: 768 wide, 224 px, 16 px patches."""
    return save_clip(tmp_path_factory.mktemp("clip224"), hidden=768, image_size=224, patch=16, heads=12)


def _random_image(seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8), mode="RGB")  # 64x48
    return image.convert(mode)


@pytest.fixture
def workdir(tmp_path, monkeypatch, clip224_dir):
    """cwd with ./models/clip-vit-base-patch16, example.jpg, image_0..2.jpg (image_2 grayscale) and cat.jpg."""
    (tmp_path / "models").mkdir()
    os.symlink(clip224_dir, tmp_path / CLIP_REL, target_is_directory=True)
    _random_image(1).save(tmp_path / "example.jpg")
    for i in range(3):
        _random_image(10 + i, mode="L" if i == 2 else "RGB").save(tmp_path / f"image_{i}.jpg")
    _random_image(20).save(tmp_path / "cat.jpg")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    return tmp_path


@pytest.fixture(scope="module")
def vlm(clip224_dir):
    """The example-1 model (768 wide, 12 layers, vocab 50000, 196-token CLIP tower), built once, in eval mode."""
    torch.manual_seed(0)
    config = VLLMconfig(vocab_size=50000, hidden_size=768, num_attention_heads=12, num_hidden_layers=12,
                        intermediate_size=3072, max_position_embeddings=2048, image_special_token='@' * 196,
                        image_ids=[34] * 196, use_moe=False, flash_attn=True, dropout=0.1, rope_theta=10000.0)
    return MiniMindVLM(params=config, vision_model_path=clip224_dir).eval()


# ------------------------------------------------------------------------------------------- running an example
def run_seed_example(filename: str, names: dict) -> dict:
    """Execute tests/seed_examples/<filename> in a fresh namespace that starts with `names`; return the namespace."""
    path = SEED_EXAMPLES / filename
    namespace = {"__name__": "__seed_example__", "__file__": str(path), **names}
    exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), namespace)
    return namespace


class SeedExample(abc.ABC):
    """One seed example file: `given()` returns the names it assumes (and sets up the rest), the file runs inside
    `context()`, then `check(namespace)` asserts on what it produced."""

    file: str

    def __init__(self, request: pytest.FixtureRequest):
        self.request = request

    def fixture(self, name: str):
        return self.request.getfixturevalue(name)

    def printed(self) -> str:
        return self.fixture("capsys").readouterr().out

    def given(self) -> dict:
        return {**SEED_NAMES, "tokenizer": build_tokenizer()}

    def context(self):
        return contextlib.nullcontext()

    @abc.abstractmethod
    def check(self, ns: dict) -> None:
        """Assert on what the example produced."""


# ------------------------------------------------------------------------------------- example 1: basic inference
class Example1(SeedExample):
    """The 12-layer VLM with the CLIP tower predicts a next token for a text + 196-placeholder prompt and an image."""

    file = "example1_basic_inference.py"

    def check(self, ns: dict) -> None:
        model, input_ids, pixel_values, outputs = ns["model"], ns["input_ids"], ns["pixel_values"], ns["outputs"]
        logits, predicted_token_id = ns["logits"], ns["predicted_token_id"]
        assert self.printed() == f"预测的下一个token ID: {predicted_token_id}\n"
        assert model.vision_encoder is not None and model.processor is not None
        assert pixel_values.shape == (1, 1, 3, 224, 224)
        # 12 Chinese characters of 3 byte tokens each, then the 196 placeholders (id 34)
        assert input_ids.shape == (1, 12 * 3 + 196)
        assert int((input_ids == 34).sum()) == 196
        assert logits.shape == (1, 1, 50000)
        assert torch.isfinite(logits).all()
        assert isinstance(predicted_token_id, int) and 0 <= predicted_token_id < 50000
        assert outputs.past_key_values is not None
        assert outputs.past_key_values.get_seq_length() == input_ids.shape[1]
        # the model was in training mode (dropout 0.1) and nothing above changed that
        assert model.training and not model.vision_encoder.training
        self.check_the_image_matters(model, input_ids, pixel_values)

    @staticmethod
    def check_the_image_matters(model, input_ids, pixel_values) -> None:
        """In eval mode the same image gives the same logits, another image different ones."""
        model.eval()
        other = MiniMindVLM.image2tensor(Image.open("cat.jpg"), model.processor).unsqueeze(0)
        with torch.no_grad():
            same_a = model(input_ids=input_ids, pixel_values=pixel_values, logits_to_keep=1).logits
            same_b = model(input_ids=input_ids, pixel_values=pixel_values, logits_to_keep=1).logits
            changed = model(input_ids=input_ids, pixel_values=other, logits_to_keep=1).logits
        torch.testing.assert_close(same_a, same_b)
        assert (same_a - changed).abs().max() > 1e-4


# ---------------------------------------------------------------------------------- example 2: large MoE config
def _expected_moe_param_count(cfg) -> int:
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    inter = 64 * math.ceil(int(1024 * 8 / 3) / 64)
    assert inter == 2752 == cfg.intermediate_size
    attention = h * h + 2 * h * kv + h * h  # q, k, v, o (no biases)
    experts = (cfg.n_routed_experts + cfg.n_shared_experts) * 3 * h * inter  # gate/up/down per SwiGLU expert
    layer = attention + 2 * h + cfg.n_routed_experts * h + experts  # + 2 RMSNorms + router
    embedding = cfg.vocab_size * h  # tied with lm_head: counted once
    projector = 768 * h + h  # Linear(ve_hidden_size=768, hidden) with bias
    return embedding + cfg.num_hidden_layers * layer + h + projector


class Example2(SeedExample):
    """The ~3.8B MoE config builds (on the meta device) with the expected parameter count; the hub id it names is
    not a local folder, so it warns and builds no vision tower instead of downloading."""

    file = "example2_large_moe_config.py"

    def given(self) -> dict:
        self.fixture("caplog").set_level("WARNING")
        return dict(SEED_NAMES)

    def context(self):
        return torch.device("meta")  # ~3.8B parameters: build without allocating them

    def check(self, ns: dict) -> None:
        moe_model, moe_config = ns["moe_model"], ns["moe_config"]
        # not a local folder: a warning, no download, and a model without a vision tower
        assert moe_model.vision_encoder is None and moe_model.processor is None
        assert any("openai/clip-vit-large-patch14" in r.getMessage() and "not a local folder" in r.getMessage()
                   for r in self.fixture("caplog").records)
        assert moe_config.head_dim == 64 and moe_config.num_key_value_heads == 8
        expected = _expected_moe_param_count(moe_config)
        assert expected == 3_831_318_528
        # the embedding and the LM head are one tensor
        assert moe_model.lm_head.weight is moe_model.model.embed_tokens.weight
        assert self.printed() == f"模型参数量: {expected:,}\n激活参数量: {expected:,}\n"
        assert all(p.is_meta for p in moe_model.parameters())


def test_small_moe_vlm_trains_with_aux_loss(clip_dir):
    """A real (not meta) small MoE VLM with a CLIP tower: training forward gives a positive, finite aux loss."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    cfg = tiny_config(use_moe=True, n_routed_experts=4, num_experts_per_token=2, n_shared_experts=1)
    model = MiniMindVLM(params=cfg, vision_model_path=clip_dir).train()
    ids = tokenizer("看图:" + cfg.image_special_token + "一只猫", return_tensors="pt")["input_ids"]
    labels = ids.masked_fill(ids == cfg.image_token_id, -100)
    pixels = MiniMindVLM.image2tensor(_random_image(3), model.processor).unsqueeze(0)  # [1, 1, 3, 32, 32]
    out = model(input_ids=ids, pixel_values=pixels, labels=labels)
    assert torch.isfinite(out.loss) and torch.isfinite(out.aux_loss)
    assert out.aux_loss.item() > 0
    (out.loss + out.aux_loss).backward()
    assert model.model.layers[0].mlp.gate.weight.grad is not None
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert model.eval()(input_ids=ids, pixel_values=pixels).aux_loss.item() == 0.0


# ------------------------------------------------------------------------------------- example 3: batch inference
class Example3(SeedExample):
    """Batched inference over three images (one grayscale) gives the same predictions as one sample at a time,
    and different images give different outputs."""

    file = "example3_batch_inference.py"

    def given(self) -> dict:
        # the example-1 model, in eval mode so that the results are deterministic
        return {**super().given(), "model": self.fixture("vlm")}

    def check(self, ns: dict) -> None:
        tokenizer, model, texts, images, predictions = (ns[k] for k in ("tokenizer", "model", "texts", "images",
                                                                        "predictions"))
        assert images[2].mode == "L"  # a grayscale image goes through image2tensor too
        assert len(predictions) == 3
        assert all(isinstance(p, int) and 0 <= p < 50000 for p in predictions)
        # batch == one sample at a time
        single, last_logits = [], []
        for text, image in zip(texts, images):
            ids = tokenizer(text + model.params.image_special_token, return_tensors="pt")["input_ids"]
            pixels = MiniMindVLM.image2tensor(image, model.processor).unsqueeze(0)
            with torch.no_grad():
                logits = model(input_ids=ids, pixel_values=pixels, logits_to_keep=1).logits[0, -1]
            single.append(int(logits.argmax()))
            last_logits.append(logits)
        assert predictions == single
        # and the three images really give three different outputs
        assert (last_logits[0] - last_logits[1]).abs().max() > 1e-4


# -------------------------------------------------------------------------------- example 4: autoregressive sampling
class Example4(SeedExample):
    """Top-k/top-p sampling with the KV cache prints a description; greedy decoding through the cache (image at
    prefill only) gives the same logits and tokens as recomputing the whole sequence."""

    file = "example4_generate.py"

    def given(self) -> dict:
        names = {**super().given(), "model": self.fixture("vlm")}
        torch.manual_seed(0)
        return names

    def check(self, ns: dict) -> None:
        generated_description, prompt = ns["generated_description"], ns["prompt"]
        assert isinstance(generated_description, str)
        assert self.printed() == f"生成的描述: {prompt}{generated_description}\n"
        self.check_cache_matches_full_forward(ns["model"], ns["tokenizer"], prompt, ns["image"])

    @staticmethod
    @torch.no_grad()
    def check_cache_matches_full_forward(model, tokenizer, prompt, image, steps: int = 4) -> None:
        ids = tokenizer(prompt + model.params.image_special_token, return_tensors="pt")["input_ids"]
        pixels = MiniMindVLM.image2tensor(image, model.processor).unsqueeze(0)
        cached, cached_logits, past, step_ids = [], [], None, ids
        for step in range(steps):
            out = model(input_ids=step_ids, pixel_values=pixels if step == 0 else None, past_key_values=past,
                        use_cache=True)
            past = out.past_key_values
            cached_logits.append(out.logits[0, -1])
            cached.append(int(out.logits[0, -1].argmax()))
            step_ids = torch.tensor([[cached[-1]]])
        assert past.get_seq_length() == ids.shape[1] + steps - 1
        full, seq = [], ids
        for step in range(steps):
            logits = model(input_ids=seq, pixel_values=pixels, use_cache=False, logits_to_keep=1).logits[0, -1]
            torch.testing.assert_close(logits, cached_logits[step], atol=2e-4, rtol=1e-4)
            full.append(int(logits.argmax()))
            seq = torch.cat([seq, torch.tensor([[full[-1]]])], dim=1)
        assert cached == full


# ------------------------------------------------------------------------------ example 5: training, layered LR
def _train_batches(tokenizer, processor, placeholder: str) -> list[dict]:
    """Three batches of 2: text + image placeholder + text; the last batch right-padded."""
    def sample(prompt, answer, image_seed):
        ids = tokenizer(prompt + placeholder + answer, return_tensors="pt")["input_ids"][0]
        pixels = MiniMindVLM.image2tensor(_random_image(image_seed), processor)  # [1, 3, 224, 224]
        return ids, pixels

    def batch(samples):
        width = max(len(ids) for ids, _ in samples)
        input_ids = torch.full((len(samples), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
        for row, (ids, _) in enumerate(samples):
            input_ids[row, :len(ids)], attention_mask[row, :len(ids)] = ids, 1
        labels = input_ids.masked_fill((input_ids == 34) | (attention_mask == 0), -100)
        pixel_values = torch.stack([pixels for _, pixels in samples])  # [B, 1, 3, 224, 224]
        return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, labels=labels)

    return [batch([sample("描述图片:", "一只猫", 30), sample("这是什么:", "一条狗", 31)]),
            batch([sample("图片内容:", "天空", 32), sample("看图:", "红色的花", 33)]),
            batch([sample("描述:", "很长很长的一段回答。", 34), sample("是什么:", "树", 35)])]


def _mean_loss(model, batches) -> float:
    model.eval()
    with torch.no_grad():
        return sum(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                         labels=b["labels"]).loss.item() for b in batches) / len(batches)


class Example5(SeedExample):
    """The layered-LR optimizer puts exactly the projector in the 5e-4 group; the training loop logs every epoch,
    leaves the frozen tower untouched, trains the projector and lowers the loss."""

    file = "example5_training_loop.py"

    def given(self) -> dict:
        tokenizer = build_tokenizer()
        torch.manual_seed(0)
        small = VLLMconfig(vocab_size=300, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                           num_hidden_layers=2, intermediate_size=128)  # default 196 '@' placeholder, ve 768
        model = MiniMindVLM(params=small, vision_model_path="./models/clip-vit-base-patch16")
        self.train_dataloader = _train_batches(tokenizer, model.processor, small.image_special_token)
        padded = self.train_dataloader[2]["attention_mask"]
        assert (padded == 0).any() and (padded[:, 0] == 1).all()  # right padding in the last batch
        self.tower_before = {k: v.clone() for k, v in model.vision_tower.state_dict().items()}
        self.proj_before = {k: v.clone() for k, v in model.vision_proj.state_dict().items()}
        self.loss_before = _mean_loss(model, self.train_dataloader)
        return {**SEED_NAMES, "model": model}

    def check(self, ns: dict) -> None:
        model, optimizer, vision_params = ns["model"], ns["optimizer"], ns["vision_params"]
        # the layered groups: the projector (and only it) in the 5e-4 group
        proj_names = [n for n, _ in model.named_parameters() if 'vision_proj' in n]
        assert proj_names and all(n.startswith("vision_proj.") for n in proj_names)
        assert {id(p) for p in vision_params} == {id(p) for p in model.vision_proj.parameters()}
        assert [g["lr"] for g in optimizer.param_groups] == [1e-4, 5e-4]
        assert ns["scheduler"].get_last_lr() == [1e-4, 5e-4]
        tower_params = list(model.vision_tower.parameters())
        assert tower_params and not any(p.requires_grad for p in tower_params)

        ns["train_multimodal_model"](model, self.train_dataloader, optimizer, num_epochs=3)
        self.check_log(self.printed())

        # the frozen tower is untouched, the projector learned, and the loss went down
        assert not any(p.requires_grad or p.grad is not None for p in tower_params)
        for k, v in model.vision_tower.state_dict().items():
            assert torch.equal(v, self.tower_before[k]), k
        assert any(not torch.equal(v, self.proj_before[k]) for k, v in model.vision_proj.state_dict().items())
        assert all(p.grad is not None for p in vision_params)
        loss_after = _mean_loss(model, self.train_dataloader)
        assert loss_after < self.loss_before - 1e-3, (self.loss_before, loss_after)

    @staticmethod
    def check_log(out: str) -> None:
        """One batch-0 line and one summary per epoch, no aux loss (dense model), a lower average loss at the end."""
        batch_lines = re.findall(r"^Epoch (\d), Batch 0: Loss=([\d.]+), Aux_Loss=([\d.]+)$", out, re.M)
        epoch_lines = re.findall(r"^Epoch (\d) completed: Avg_Loss=([\d.]+), Avg_Aux_Loss=([\d.]+)$", out, re.M)
        assert [e for e, _, _ in batch_lines] == ["0", "1", "2"] and [e for e, _, _ in epoch_lines] == ["0", "1", "2"]
        assert all(float(aux) == 0.0 for _, _, aux in batch_lines + epoch_lines)  # dense model: no MoE aux loss
        avg = [float(loss) for _, loss, _ in epoch_lines]
        assert all(math.isfinite(x) for x in avg) and avg[2] < avg[0]


# ----------------------------------------------------------------------------------------------------- the tests
EXAMPLES = [Example1, Example2, Example3, Example4, Example5]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda example: example.file.removesuffix(".py"))
def test_seed_example(example, workdir, capsys, caplog, request):
    """The seed example file runs unmodified in the prepared working directory and does what its class's docstring
    says (the class's `check`)."""
    case = example(request)
    names = case.given()
    with case.context():
        namespace = run_seed_example(case.file, names)
    case.check(namespace)


def test_every_seed_example_file_runs_and_none_is_collected(request):
    """Every file in tests/seed_examples/ is run by test_seed_example, and none matches pytest's python_files
    patterns, so pytest never imports one (which would run a whole example at collection)."""
    files = sorted(path.name for path in SEED_EXAMPLES.iterdir() if path.suffix == ".py")
    assert files == sorted(example.file for example in EXAMPLES)
    patterns = request.config.getini("python_files")
    assert patterns and not [name for name in files if any(fnmatch(name, pattern) for pattern in patterns)]
