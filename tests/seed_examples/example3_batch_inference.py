# Seed usage document, example 3 (batch inference), verbatim except that the function's docstring is dropped.
# Run by tests/test_seed_examples.py in a prepared working directory (image_0..2.jpg), which defines `tokenizer`,
# `model` (the example-1 model, in eval mode), torch, Image and MiniMindVLM first.
# ruff: noqa: F821  -- the names above come from the runner

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
