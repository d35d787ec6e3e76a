"""The seed usage document's examples, run as written (only the import line changed).

Each test sets up what the example assumes in a fresh working directory (a `tokenizer`, the image files, and a
random CLIP ViT-B/16-shaped folder at ./models/clip-vit-base-patch16), pastes the example's code verbatim into the
test body, and then checks the results outside the pasted block. The one deliberate change to the seed's code is
the Aux_Loss log line of example 5, whose f-string format spec is invalid Python (see the comment there).
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import build_tokenizer, save_clip, tiny_config
from minimind_v import MiniMindVLM, VLLMconfig, get_model_configs  # noqa: F401  (the seed's names)

CLIP_REL = os.path.join("models", "clip-vit-base-patch16")


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


# ------------------------------------------------------------------------------------- example 1: basic inference
def test_example1_basic_inference(workdir, capsys):
    tokenizer = build_tokenizer()

    # ---- seed example 1, verbatim except the import line ----
    import torch
    from PIL import Image
    from minimind_v import MiniMindVLM, VLLMconfig

    # 1. 初始化模型配置
    config = VLLMconfig(
        # 基础语言模型配置
        vocab_size=50000,
        hidden_size=768,
        num_attention_heads=12,
        num_hidden_layers=12,
        intermediate_size=3072,
        max_position_embeddings=2048,

        # 多模态特定配置
        image_special_token='@' * 196,  # 图像占位符 (196个patch)
        image_ids=[34] * 196,           # 图像token的ID序列

        # 高级特性 (可选)
        use_moe=False,                  # 是否启用MoE
        flash_attn=True,                # Flash Attention加速
        dropout=0.1,
        rope_theta=10000.0
    )

    # 2. 加载模型
    model = MiniMindVLM(
        params=config,
        vision_model_path="./models/clip-vit-base-patch16"  # CLIP模型路径
    )

    # 3. 准备多模态输入
    text = "请描述这张图片中的内容："
    image = Image.open("example.jpg")

    # 4. 预处理
    # 假设已有tokenizer
    input_text = text + config.image_special_token  # 添加图像占位符
    input_ids = tokenizer(input_text, return_tensors='pt')['input_ids']

    # 图像预处理
    pixel_values = MiniMindVLM.image2tensor(image, model.processor)
    pixel_values = pixel_values.unsqueeze(0)  # 添加batch维度

    # 5. 模型推理
    with torch.no_grad():
        outputs = model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            use_cache=True,  # 启用KV缓存加速
            logits_to_keep=1  # 只保留最后一个token的logits
        )

    # 6. 获取预测结果
    logits = outputs.logits
    probabilities = torch.softmax(logits[0, -1, :], dim=-1)
    predicted_token_id = torch.argmax(probabilities).item()

    print(f"预测的下一个token ID: {predicted_token_id}")
    # ---- end of seed example 1 ----

    assert capsys.readouterr().out == f"预测的下一个token ID: {predicted_token_id}\n"
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

    # the image matters: in eval mode the same image gives the same logits, another image different ones
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


def test_example2_large_moe_config(workdir, capsys, caplog):
    caplog.set_level("WARNING")
    with torch.device("meta"):  # ~3.8B parameters: build without allocating them
        # ---- seed example 2, verbatim ----
        # 大规模MoE配置
        moe_config = VLLMconfig(
            # 基础配置
            vocab_size=100000,
            hidden_size=1024,
            num_attention_heads=16,
            num_key_value_heads=8,  # GQA: 减少KV头数
            num_hidden_layers=24,

            # MoE专家混合配置
            use_moe=True,
            num_experts_per_token=2,    # 每个token激活2个专家
            n_routed_experts=16,        # 总共16个专家
            n_shared_experts=2,         # 2个共享专家
            aux_loss_alpha=0.01,        # 负载均衡损失权重
            norm_topk_prob=True,        # 归一化专家权重

            # 性能优化
            flash_attn=True,
            use_cache=True,
            max_position_embeddings=4096
        )

        # 初始化MoE模型
        moe_model = MiniMindVLM(
            params=moe_config,
            vision_model_path="openai/clip-vit-large-patch14"
        )

        print(f"模型参数量: {sum(p.numel() for p in moe_model.parameters()):,}")
        print(f"激活参数量: {sum(p.numel() for p in moe_model.parameters() if p.requires_grad):,}")
        # ---- end of seed example 2 ----

    # not a local folder: a warning, no download, and a model without a vision tower
    assert moe_model.vision_encoder is None and moe_model.processor is None
    assert any("openai/clip-vit-large-patch14" in r.getMessage() and "not a local folder" in r.getMessage()
               for r in caplog.records)
    assert moe_config.head_dim == 64 and moe_config.num_key_value_heads == 8
    expected = _expected_moe_param_count(moe_config)
    assert expected == 3_831_318_528
    # the embedding and the LM head are one tensor
    assert moe_model.lm_head.weight is moe_model.model.embed_tokens.weight
    out = capsys.readouterr().out
    assert out == f"模型参数量: {expected:,}\n激活参数量: {expected:,}\n"
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
def test_example3_batch_inference(workdir, vlm):
    tokenizer = build_tokenizer()
    model = vlm  # the example-1 model, in eval mode so that the results are deterministic

    # ---- seed example 3, verbatim (docstring dropped) ----
    def batch_multimodal_inference(model, texts, images, batch_size=4):
        results = []

        for i in range(0, len(texts), batch_size):
            batch_texts = texts[i:i+batch_size]
            batch_images = images[i:i+batch_size]

            # 预处理批次
            input_ids_list = []
            pixel_values_list = []

            for text, image in zip(batch_texts, batch_images):
                # 文本处理
                input_text = text + model.params.image_special_token
                input_ids = tokenizer(input_text,
                                    return_tensors='pt',
                                    padding=True,
                                    truncation=True)['input_ids']
                input_ids_list.append(input_ids)

                # 图像处理
                pixel_values = MiniMindVLM.image2tensor(image, model.processor)
                pixel_values_list.append(pixel_values)

            # 批量张量
            batch_input_ids = torch.cat(input_ids_list, dim=0)
            batch_pixel_values = torch.stack(pixel_values_list, dim=0)

            # 批量推理
            with torch.no_grad():
                batch_outputs = model(
                    input_ids=batch_input_ids,
                    pixel_values=batch_pixel_values,
                    use_cache=False  # 批量推理时关闭缓存
                )

            # 处理输出
            batch_logits = batch_outputs.logits
            batch_predictions = torch.argmax(batch_logits[:, -1, :], dim=-1)

            results.extend(batch_predictions.cpu().tolist())

        return results

    # 使用示例
    texts = ["描述图片:", "这是什么:", "图片内容:"]
    images = [Image.open(f"image_{i}.jpg") for i in range(3)]

    predictions = batch_multimodal_inference(model, texts, images)
    # ---- end of seed example 3 ----

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
def test_example4_generate(workdir, vlm, capsys):
    tokenizer = build_tokenizer()
    model = vlm
    torch.manual_seed(0)

    # ---- seed example 4, verbatim ----
    def multimodal_generate(model, text_prompt, image, max_length=100,
                           temperature=1.0, top_k=50, top_p=0.9):
        model.eval()
        device = next(model.parameters()).device

        # 准备初始输入
        input_text = text_prompt + model.params.image_special_token
        input_ids = tokenizer(input_text, return_tensors='pt')['input_ids'].to(device)

        # 图像预处理
        pixel_values = MiniMindVLM.image2tensor(image, model.processor)
        pixel_values = pixel_values.unsqueeze(0).to(device)

        generated_tokens = []
        past_key_values = None

        with torch.no_grad():
            for step in range(max_length):
                # 当前输入 (第一步包含图像，后续步骤仅文本)
                current_pixel_values = pixel_values if step == 0 else None

                # 模型前向传播
                outputs = model(
                    input_ids=input_ids,
                    pixel_values=current_pixel_values,
                    past_key_values=past_key_values,
                    use_cache=True
                )

                # 获取下一个token的logits
                next_token_logits = outputs.logits[0, -1, :] / temperature

                # Top-K + Top-P 采样
                if top_k > 0:
                    top_k_logits, top_k_indices = torch.topk(next_token_logits, top_k)
                    next_token_logits = torch.full_like(next_token_logits, float('-inf'))
                    next_token_logits.scatter_(0, top_k_indices, top_k_logits)

                if top_p < 1.0:
                    sorted_logits, sorted_indices = torch.sort(next_token_logits, descending=True)
                    cumulative_probs = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
                    sorted_indices_to_remove = cumulative_probs > top_p
                    sorted_indices_to_remove[1:] = sorted_indices_to_remove[:-1].clone()
                    sorted_indices_to_remove[0] = 0
                    indices_to_remove = sorted_indices[sorted_indices_to_remove]
                    next_token_logits[indices_to_remove] = float('-inf')

                # 采样下一个token
                probs = torch.softmax(next_token_logits, dim=-1)
                next_token = torch.multinomial(probs, 1)

                # 检查结束条件
                if next_token.item() == tokenizer.eos_token_id:
                    break

                generated_tokens.append(next_token.item())

                # 准备下一步输入
                input_ids = next_token.unsqueeze(0)
                past_key_values = outputs.past_key_values

        # 解码生成的文本
        generated_text = tokenizer.decode(generated_tokens, skip_special_tokens=True)
        return generated_text

    # 使用示例
    image = Image.open("cat.jpg")
    prompt = "这张图片显示了"

    generated_description = multimodal_generate(
        model=model,
        text_prompt=prompt,
        image=image,
        max_length=50,
        temperature=0.7,
        top_k=40,
        top_p=0.9
    )

    print(f"生成的描述: {prompt}{generated_description}")
    # ---- end of seed example 4 ----

    assert isinstance(generated_description, str)
    assert capsys.readouterr().out == f"生成的描述: {prompt}{generated_description}\n"

    # the KV-cache path: greedy decoding with the cache (image at prefill only) == recomputing the whole sequence
    ids = tokenizer(prompt + model.params.image_special_token, return_tensors="pt")["input_ids"]
    pixels = MiniMindVLM.image2tensor(image, model.processor).unsqueeze(0)
    steps = 4
    with torch.no_grad():
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


def test_example5_training_loop(workdir, capsys):
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    small = VLLMconfig(vocab_size=300, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=2, intermediate_size=128)  # default 196 '@' placeholder, ve 768
    model = MiniMindVLM(params=small, vision_model_path="./models/clip-vit-base-patch16")
    train_dataloader = _train_batches(tokenizer, model.processor, small.image_special_token)
    padded = train_dataloader[2]["attention_mask"]
    assert (padded == 0).any() and (padded[:, 0] == 1).all()  # right padding in the last batch
    tower_before = {k: v.clone() for k, v in model.vision_tower.state_dict().items()}
    proj_before = {k: v.clone() for k, v in model.vision_proj.state_dict().items()}
    loss_before = _mean_loss(model, train_dataloader)

    # ---- seed example 5, verbatim except the Aux_Loss log line (see the comment there) ----
    def train_multimodal_model(model, train_dataloader, optimizer, num_epochs):
        model.train()
        device = next(model.parameters()).device

        for epoch in range(num_epochs):
            total_loss = 0
            total_aux_loss = 0

            for batch_idx, batch in enumerate(train_dataloader):
                # 获取批次数据
                input_ids = batch['input_ids'].to(device)
                attention_mask = batch['attention_mask'].to(device)
                pixel_values = batch['pixel_values'].to(device) if 'pixel_values' in batch else None
                labels = batch['labels'].to(device)

                # 前向传播
                outputs = model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    pixel_values=pixel_values,
                    labels=labels  # 传入labels会自动计算交叉熵损失
                )

                # 计算总损失
                main_loss = outputs.loss
                aux_loss = outputs.aux_loss if hasattr(outputs, 'aux_loss') else 0
                total_loss_value = main_loss + aux_loss

                # 反向传播
                optimizer.zero_grad()
                total_loss_value.backward()

                # 梯度裁剪 (可选)
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)

                optimizer.step()

                # 统计
                total_loss += main_loss.item()
                total_aux_loss += aux_loss if isinstance(aux_loss, float) else aux_loss.item()

                # 日志输出
                if batch_idx % 100 == 0:
                    # CORRECTED: the seed writes
                    #     f'Aux_Loss={aux_loss:.4f if isinstance(aux_loss, float) else aux_loss.item():.4f}'
                    # whose format spec ".4f if isinstance(...) else ...:.4f" is not a valid format specifier, so it
                    # raises "ValueError: Invalid format specifier" for any aux_loss (even a plain float) at
                    # batch 0, whatever the model. This is the only line changed from the seed.
                    print(f'Epoch {epoch}, Batch {batch_idx}: '
                          f'Loss={main_loss.item():.4f}, '
                          f'Aux_Loss={(aux_loss if isinstance(aux_loss, float) else aux_loss.item()):.4f}')

            avg_loss = total_loss / len(train_dataloader)
            avg_aux_loss = total_aux_loss / len(train_dataloader)
            print(f'Epoch {epoch} completed: Avg_Loss={avg_loss:.4f}, Avg_Aux_Loss={avg_aux_loss:.4f}')

    # 优化器配置示例
    from torch.optim import AdamW
    from torch.optim.lr_scheduler import CosineAnnealingLR

    # 分层学习率：视觉投影器使用更高学习率
    vision_params = []
    language_params = []

    for name, param in model.named_parameters():
        if 'vision_proj' in name:
            vision_params.append(param)
        else:
            language_params.append(param)

    optimizer = AdamW([
        {'params': language_params, 'lr': 1e-4, 'weight_decay': 0.01},
        {'params': vision_params, 'lr': 5e-4, 'weight_decay': 0.01}  # 视觉投影器使用更高学习率
    ])

    scheduler = CosineAnnealingLR(optimizer, T_max=1000, eta_min=1e-6)
    # ---- end of seed example 5 ----

    # the layered groups: the projector (and only it) in the 5e-4 group
    proj_names = [n for n, _ in model.named_parameters() if 'vision_proj' in n]
    assert proj_names and all(n.startswith("vision_proj.") for n in proj_names)
    assert {id(p) for p in vision_params} == {id(p) for p in model.vision_proj.parameters()}
    assert [g["lr"] for g in optimizer.param_groups] == [1e-4, 5e-4]
    assert scheduler.get_last_lr() == [1e-4, 5e-4]
    tower_params = list(model.vision_tower.parameters())
    assert tower_params and not any(p.requires_grad for p in tower_params)

    train_multimodal_model(model, train_dataloader, optimizer, num_epochs=3)

    out = capsys.readouterr().out
    batch_lines = re.findall(r"^Epoch (\d), Batch 0: Loss=([\d.]+), Aux_Loss=([\d.]+)$", out, re.M)
    epoch_lines = re.findall(r"^Epoch (\d) completed: Avg_Loss=([\d.]+), Avg_Aux_Loss=([\d.]+)$", out, re.M)
    assert [e for e, _, _ in batch_lines] == ["0", "1", "2"] and [e for e, _, _ in epoch_lines] == ["0", "1", "2"]
    assert all(float(aux) == 0.0 for _, _, aux in batch_lines + epoch_lines)  # dense model: no MoE aux loss
    avg = [float(loss) for _, loss, _ in epoch_lines]
    assert all(math.isfinite(x) for x in avg) and avg[2] < avg[0]

    # the frozen tower is untouched, the projector learned, and the loss went down
    assert not any(p.requires_grad or p.grad is not None for p in tower_params)
    for k, v in model.vision_tower.state_dict().items():
        assert torch.equal(v, tower_before[k]), k
    assert any(not torch.equal(v, proj_before[k]) for k, v in model.vision_proj.state_dict().items())
    assert all(p.grad is not None for p in vision_params)
    loss_after = _mean_loss(model, train_dataloader)
    assert loss_after < loss_before - 1e-3, (loss_before, loss_after)
