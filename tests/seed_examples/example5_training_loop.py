# Seed usage document, example 5 (training loop, layered learning rates), verbatim except the Aux_Loss log line,
# whose f-string is invalid Python in the seed (see the CORRECTED comment). Run by tests/test_seed_examples.py,
# which defines `model` (a small CLIP VLM) and torch first, then calls train_multimodal_model itself.
# ruff: noqa: F821  -- the names above come from the runner

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
