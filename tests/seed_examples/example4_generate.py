# Seed usage document, example 4 (autoregressive sampling with the KV cache), verbatim. Run by
# tests/test_seed_examples.py in a prepared working directory (cat.jpg), which defines `tokenizer`, `model` (the
# example-1 model), torch, Image and MiniMindVLM first.
# ruff: noqa: F821  -- the names above come from the runner

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
