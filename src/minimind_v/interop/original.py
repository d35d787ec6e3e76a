"""Original MiniMind-V checkpoints (`.pth` state dicts) in and out.

Both generations are recognised from their keys and shapes:
- MiniMind2-V (the seeds' model): CLIP ViT-B/16, `'@' * 196`, projector `vision_proj.vision_proj.0.*` (Linear);
- minimind-3v: SigLIP B/32-256, 64 x `<|image_pad|>`, projector `vision_proj.mlp.{0,1,3}.*` (LayerNorm+MLP),
  per-head `self_attn.{q,k}_norm`;
dense or MoE (`mlp.gate.weight`, `mlp.experts.{e}.*`, MiniMind2-V also `mlp.shared_experts.{e}.*`), fp16 or fp32,
with or without the projector (the original LLM checkpoints `llm_512.pth` / `llm_768.pth` have none: the projector
then starts from its fresh initialisation, and the log says so). Everything else must match exactly: a missing or
unexpected key is an error that lists them. The key names are this project's own, so no renaming is needed.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import torch

from ..config import PRESETS, MiniMindVConfig
from ..models.safe_loading import check_finite
from ..models.vision_tower import load_vision_tower
from ..models.vlm import MiniMindVLM
from ..models.vlm_base import TOWER_PREFIX, key_mismatch_error

logger = logging.getLogger(__name__)

# config fields that the weights decide; everything else comes from the generation's preset (or overrides)
_FROM_WEIGHTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads", "head_dim",
                 "intermediate_size", "ve_hidden_size")
GENERATION_DEFAULTS: dict[int, dict[str, Any]] = {
    generation: {k: v for k, v in PRESETS[preset].items() if k not in _FROM_WEIGHTS}
    for generation, preset in ((2, "minimind2-v"), (3, "minimind-3v"))}
# config fields that decide tensor shapes: a given config must agree with the checkpoint on these
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "qk_norm", "use_moe", "n_routed_experts", "n_shared_experts",
                "projector_type", "ve_hidden_size")
_ORIGINAL_TOWER_PREFIX = "vision_encoder."


def read_original(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """torch.load (weights only) of an original state dict, with clear errors for anything else."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {os.fspath(path)!r} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for a bad file
        detail = str(err).strip().splitlines()[-1] if str(err).strip() else ""
        raise ValueError(f"{os.fspath(path)!r} is not a PyTorch state dict that loads with weights_only=True "
                         f"({type(err).__name__}{': ' + detail if detail else ''})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{os.fspath(path)!r} does not hold a state dict of tensors (got {type(state).__name__})")
    return {k: v for k, v in state.items() if not k.startswith(_ORIGINAL_TOWER_PREFIX)}


def detect_generation(state: dict[str, torch.Tensor]) -> int:
    if "model.embed_tokens.weight" not in state or "model.layers.0.self_attn.q_proj.weight" not in state:
        raise ValueError("not a MiniMind checkpoint: no model.embed_tokens.weight / model.layers.0.self_attn.q_proj")
    return 3 if "model.layers.0.self_attn.q_norm.weight" in state else 2


def detect_config(state: dict[str, torch.Tensor], **overrides: Any) -> MiniMindVConfig:
    """The config of an original checkpoint, from its shapes plus its generation's defaults and `overrides`."""
    generation = detect_generation(state)
    fields = {**GENERATION_DEFAULTS[generation], **overrides}
    vocab_size, hidden_size = state["model.embed_tokens.weight"].shape
    q_out = state["model.layers.0.self_attn.q_proj.weight"].shape[0]
    if generation == 3:
        head_dim = state["model.layers.0.self_attn.q_norm.weight"].shape[0]
        fields["num_attention_heads"] = overrides.get("num_attention_heads", q_out // head_dim)
    elif "num_attention_heads" not in overrides:
        logger.info("MiniMind2-V checkpoints do not record their head count: assuming %d heads, as every released "
                    "model has (pass num_attention_heads=... otherwise)", fields["num_attention_heads"])
    head_dim = q_out // fields["num_attention_heads"]
    fields.update(vocab_size=vocab_size, hidden_size=hidden_size, head_dim=head_dim,
                  num_hidden_layers=1 + max(int(k.split(".")[2]) for k in state if k.startswith("model.layers.")),
                  num_key_value_heads=state["model.layers.0.self_attn.k_proj.weight"].shape[0] // head_dim,
                  tie_word_embeddings="lm_head.weight" not in state or
                  torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]))
    fields.update(_detect_mlp(state))
    fields.update(_detect_projector(state))
    return MiniMindVConfig(**{**fields, **overrides})


def _detect_mlp(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    if "model.layers.0.mlp.gate.weight" not in state:
        return dict(use_moe=False, intermediate_size=state["model.layers.0.mlp.gate_proj.weight"].shape[0])
    shared = {m.group(1) for k in state if (m := re.match(r"model\.layers\.0\.mlp\.shared_experts\.(\d+)\.", k))}
    return dict(use_moe=True, n_routed_experts=state["model.layers.0.mlp.gate.weight"].shape[0],
                n_shared_experts=len(shared),
                intermediate_size=state["model.layers.0.mlp.experts.0.gate_proj.weight"].shape[0])


def _detect_projector(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    if "vision_proj.vision_proj.0.weight" in state:
        return dict(projector_type="linear", ve_hidden_size=state["vision_proj.vision_proj.0.weight"].shape[1])
    if "vision_proj.mlp.0.weight" in state:
        return dict(projector_type="mlp", ve_hidden_size=state["vision_proj.mlp.0.weight"].shape[0])
    return {}  # an LLM-only checkpoint: the generation's projector, fresh


def check_same_shapes(given: MiniMindVConfig, detected: MiniMindVConfig) -> None:
    differ = [f"{name}: config {getattr(given, name)!r} vs checkpoint {getattr(detected, name)!r}"
              for name in SHAPE_FIELDS if getattr(given, name) != getattr(detected, name)]
    if differ:
        raise ValueError("the given config does not match the checkpoint: " + "; ".join(differ))


def load_original(path: str | os.PathLike, vision_model_path: str | None = None,
                  config: MiniMindVConfig | None = None, **overrides: Any) -> MiniMindVLM:
    """Build the matching MiniMindVLM (fp32) and load an original `.pth` into it strictly."""
    state = read_original(path)
    tower = load_vision_tower(vision_model_path) if vision_model_path else None
    if tower is not None and not any(k.startswith("vision_proj.") for k in state):
        overrides.setdefault("ve_hidden_size", tower.hidden_size)  # LLM-only file: the projector fits the tower
    detected = detect_config(state, **overrides)
    if config is not None:
        check_same_shapes(config, detected)
    model = MiniMindVLM(config if config is not None else detected, vision_model_path=None)
    if tower is not None:
        model.attach_vision_tower(tower, vision_model_path)
    load_state_strict(model, state, source=os.fspath(path))
    return model.eval()


def load_state_strict(model: MiniMindVLM, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into the model (tower excluded): every key must be expected, every expected key present,
    every shape equal. Only a wholly absent projector is allowed (LLM-only checkpoints)."""
    own = model.state_dict_without_tower()
    state = dict(state)
    if model.config.tie_word_embeddings and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    if not any(k.startswith("vision_proj.") for k in state):
        logger.warning("%s has no projector weights (an LLM-only checkpoint): the %s projector starts from its "
                       "fresh initialisation", source, model.config.projector_type)
        state.update({k: v for k, v in own.items() if k.startswith("vision_proj.")})
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(state))
             if state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise key_mismatch_error(source, {"missing": missing, "unexpected": unexpected, "shape-mismatched": wrong})
    check_finite(state.items(), source)
    tower = {k: v for k, v in model.state_dict().items() if k.startswith(TOWER_PREFIX)}
    model.load_state_dict({**{k: v.to(own[k].dtype) for k, v in state.items()}, **tower}, strict=True)


def save_original(model: MiniMindVLM, path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> None:
    """Write the original layout: the same keys (tower left out), fp16 as the original trainer saves."""
    if model.config.projector_type not in ("linear", "mlp"):
        raise ValueError(f"the original .pth layout knows only the linear and mlp projectors, not "
                         f"{model.config.projector_type!r}; keep this model as a folder (save_pretrained)")
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict_without_tower().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # as a folder target is created
    torch.save(state, path)
