# Seed usage document, example 2 (large MoE config), verbatim. Run by tests/test_seed_examples.py under
# `torch.device("meta")` (about 3.8B parameters, never allocated), with VLLMconfig and MiniMindVLM defined first.
# ruff: noqa: F821  -- the names above come from the runner

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
