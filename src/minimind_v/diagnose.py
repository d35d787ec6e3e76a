"""Model diagnosis, as the seeds' `diagnose_model_issues`: config, device, vision tower, parameters, a forward pass
with a NaN/Inf check, and memory use. `diagnose(model)` returns the report as a dict and prints it line by line."""

from __future__ import annotations

from typing import Callable

import torch

from .device import memory_report
from .models.mlp import MoEFeedForward
from .models.vlm_base import VisionLanguageModel


def sample_inputs(model: VisionLanguageModel, text_tokens: int = 8) -> dict[str, torch.Tensor]:
    """Random token ids around one image placeholder run (when the model has a tower) and matching pixel values."""
    config, device = model.config, model.device
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(3, config.vocab_size, (1, text_tokens), generator=generator)
    text[text == config.image_token_id] = 3
    if model.vision_tower is None:
        return {"input_ids": text.to(device)}
    size = model.processor.size
    height, width = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
    image_ids = torch.full((1, config.image_token_len), config.image_token_id)
    return {"input_ids": torch.cat([text, image_ids, text], dim=1).to(device),
            "pixel_values": torch.randn(1, 1, 3, height, width, generator=generator).to(device)}


def active_parameters(model: VisionLanguageModel) -> int:
    """Parameters used per token: routed experts count k / n of their weights (excludes the vision tower)."""
    total = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("vision_tower."))
    for layer in model.decoder_layers():
        if isinstance(getattr(layer, "mlp", None), MoEFeedForward):
            routed = sum(p.numel() for p in layer.mlp.experts.parameters())
            total -= routed - routed * model.config.num_experts_per_token // model.config.n_routed_experts
    return total


def diagnose(model: VisionLanguageModel, inputs: dict[str, torch.Tensor] | None = None,
             echo: Callable[[str], None] = print) -> dict[str, object]:
    config, device = model.config, model.device
    tower = model.vision_tower
    report: dict[str, object] = {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
                                 "vocab_size": config.vocab_size, "use_moe": config.use_moe, "device": str(device)}
    echo("=== MiniMind-V model diagnosis ===")
    echo(f"config: {config.hidden_size}d x {config.num_hidden_layers} layers, {config.num_attention_heads} heads "
         f"({config.num_key_value_heads} kv), vocab {config.vocab_size}, projector {config.projector_type}")
    echo(f"MoE: {'on, %d experts, top-%d' % (config.n_routed_experts, config.num_experts_per_token) if config.use_moe else 'off'}")
    echo(f"device: {device}, dtype: {model.dtype}")
    report["vision_tower_loaded"] = tower is not None
    if tower is not None:
        report["vision_tower_parameters"] = sum(p.numel() for p in tower.parameters())
        echo(f"vision tower: loaded from {config.vision_tower_path} ({report['vision_tower_parameters']:,} "
             f"parameters, {tower.num_tokens} tokens x {tower.hidden_size} per image, frozen)")
    else:
        echo("vision tower: NOT loaded (text only; give --vision DIR to take images)")
    params = list(model.parameters())
    report["total_parameters"] = sum(p.numel() for p in params)
    report["trainable_parameters"] = sum(p.numel() for p in params if p.requires_grad)
    report["frozen_parameters"] = report["total_parameters"] - report["trainable_parameters"]
    echo(f"parameters: {report['total_parameters']:,} total, {report['trainable_parameters']:,} trainable, "
         f"{report['frozen_parameters']:,} frozen")
    if config.use_moe:
        report["active_parameters"] = active_parameters(model)
        echo(f"active parameters per token (without the vision tower): {report['active_parameters']:,}")
    report.update(_forward_check(model, inputs if inputs is not None else sample_inputs(model), echo))
    report["memory"] = memory_report(device)
    echo(report["memory"])
    return report


def _forward_check(model: VisionLanguageModel, inputs: dict[str, torch.Tensor],
                   echo: Callable[[str], None]) -> dict[str, object]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    except (ValueError, RuntimeError, TypeError) as err:
        echo(f"forward pass: FAILED: {err}")
        return {"forward_ok": False, "forward_error": str(err)}
    finally:
        model.train(was_training)
    finite = bool(torch.isfinite(logits).all())
    echo(f"forward pass: ok, logits {list(logits.shape)}")
    echo("output values: ok (no NaN/Inf)" if finite else
         f"output values: BAD ({int(torch.isnan(logits).sum())} NaN, {int(torch.isinf(logits).sum())} Inf)")
    return {"forward_ok": True, "logits_shape": list(logits.shape), "finite": finite}
