"""LoRA adapters on the language model's projections, through peft: add, fold into the weights, recognise.

    y = W x + (alpha / r) * B A x      A [r, in], B [out, r]; B = 0 at first, so the model is unchanged until it trains

Works on either language model: MiniMind and the Hugging Face backbones name their projections alike (`q_proj`, ...,
`down_proj`), which is what `config.lora_targets` lists.
"""

from __future__ import annotations

from torch import nn


def add_lora(module: nn.Module, config) -> None:
    """Wrap the projections named in `config.lora_targets` inside `module` with LoRA adapters (B = 0: the model's
    output is unchanged until they train)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as err:
        raise ValueError("LoRA needs peft: pip install 'minimind-v[lora]'") from err
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_targets))
    try:
        inject_adapter_in_model(lora, module)
    except ValueError as err:  # none of the targets exists in this backbone
        raise ValueError(f"LoRA targets {config.lora_targets} do not match the backbone's modules: {err}") from err


def merge_lora(module: nn.Module) -> int:
    """Fold every LoRA adapter into its base weight and put the plain layer back; returns how many were merged."""
    from peft.tuners.lora import LoraLayer

    wrapped = [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in wrapped:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, child, layer.get_base_layer())
    return len(wrapped)


def is_lora_key(name: str) -> bool:
    return ".lora_" in name
