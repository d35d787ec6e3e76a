# Seed usage document, example 1 (basic inference), verbatim except the import line, which imports from
# minimind_v. Run by tests/test_seed_examples.py in a prepared working directory
# (./models/clip-vit-base-patch16, example.jpg), which defines `tokenizer` first.
# ruff: noqa: F821  -- the names above come from the runner

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
