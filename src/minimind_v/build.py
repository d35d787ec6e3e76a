"""The one place a model and its tokenizer are assembled, for every command (training, inference, benchmarks).

    tokenizer_fields(tokenizer)              the config fields a tokenizer decides: vocabulary, special ids, placeholder
    new_model(preset, tokenizer, ...)        a fresh VLM from a preset, sized to its tokenizer (or to an --llm backbone)
    load_model(path, tokenizer, vision)      a folder of this project (or an export), or an original .pth
    preset_model(preset, vision, overrides)  a fresh VLM from a preset alone (its own vocabulary size)
    training_model(args)                     what a training run starts from: --from-weight, or new; LoRA added
    load_for_inference(path, ...)            load_model, then on the device in the dtype policy's dtype, eval mode
"""

from __future__ import annotations

import os

import torch

from .config import MiniMindVConfig
from .data.tokenizer import IMAGE_PAD_TOKEN, image_placeholder_config, load_tokenizer
from .device import compute_dtype, pick_device
from .models import build_vlm, load_vlm
from .models.quantize import int8_weights, quantize_int8


def tokenizer_fields(tokenizer) -> dict:
    """Vocabulary size, bos/eos/pad ids and, when the tokenizer has `<|image_pad|>`, the image placeholder."""
    fields = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if IMAGE_PAD_TOKEN in tokenizer.get_vocab():
        fields.update(image_placeholder_config(tokenizer))
    return fields


def new_model(preset: str, tokenizer: str | None = None, llm: str | None = None, vision: str | None = None,
              overrides: dict | None = None, seed: int | None = None):
    """-> (model, tokenizer): a fresh VLM from `preset` + `overrides` sized to the tokenizer (a folder, or the
    shipped one), or on the local Hugging Face causal LM `llm`, whose own tokenizer it takes."""
    from .models.backbone import backbone_fields, load_backbone_tokenizer

    if llm and tokenizer:
        raise ValueError("--llm brings its own tokenizer; leave out --tokenizer")
    if llm:
        tok = load_backbone_tokenizer(llm)
        fields = {**backbone_fields(llm, tok), "image_token_len": MiniMindVConfig.from_name(preset).image_token_len}
    else:
        tok = load_tokenizer(tokenizer)
        fields = tokenizer_fields(tok)
    config = MiniMindVConfig.from_name(preset, **{**fields, **(overrides or {})})
    if seed is not None:
        torch.manual_seed(seed)
    return build_vlm(config, vision_model_path=vision), tok


def preset_model(preset: str, vision: str | None = None, overrides: dict | None = None, seed: int = 0):
    """A fresh VLM from `preset` + `overrides` alone (no tokenizer: the preset's vocabulary), seeded."""
    torch.manual_seed(seed)
    return build_vlm(MiniMindVConfig.from_name(preset, **(overrides or {})), vision_model_path=vision)


def load_model(path: str, tokenizer: str | None = None, vision: str | None = None, **overrides):
    """-> (model, tokenizer). A folder brings its own tokenizer and tower (unless `tokenizer` / `vision` name others);
    an original `.pth` needs `tokenizer` (the original tokenizer folder) and `vision` (its tower folder), and
    `overrides` for the config fields such a file cannot tell (as for `convert --set`)."""
    from .interop.original import load_original

    if not os.path.exists(path):
        raise FileNotFoundError(f"model not found: {path}")
    if os.path.isdir(path):
        return load_vlm(path, **({"vision_model_path": vision} if vision else {})), load_tokenizer(tokenizer or path)
    if tokenizer is None:
        raise ValueError(f"{path} is an original checkpoint: pass --tokenizer with its tokenizer folder (and "
                         "--vision with its vision tower folder for images)")
    return load_original(path, vision_model_path=vision, **overrides), load_tokenizer(tokenizer)


def training_model(args):
    """-> (model, tokenizer) a run starts from (TrainArgs fields): the --from-weight folder, or a new model from
    --preset / --set / --tokenizer / --llm / --vision; LoRA adapters of --lora-rank added when it has none."""
    if args.from_weight:
        if args.llm:
            raise ValueError("--llm starts a new model; a --from-weight folder already names its language model")
        model = load_vlm(args.from_weight, **({"vision_model_path": args.vision} if args.vision else {}))
        if model.config.int8_weights:
            raise ValueError(f"{args.from_weight} holds int8 weights, which only answer: train from the "
                             "full-precision folder it was converted from")
        tokenizer = load_tokenizer(args.tokenizer or args.from_weight)
    else:
        model, tokenizer = new_model(args.preset, args.tokenizer, args.llm, args.vision, args.overrides)
    if args.lora_rank and args.lora_rank != model.config.lora_rank:
        model.enable_lora(args.lora_rank)
    return model, tokenizer


def training_tokenizer(args):
    """The tokenizer a training run uses, without building its model (for evaluation during the run)."""
    if args.llm:
        from .models.backbone import load_backbone_tokenizer

        return load_backbone_tokenizer(args.llm)
    return load_tokenizer(args.tokenizer or args.from_weight)


def load_for_inference(path: str, tokenizer: str | None = None, vision: str | None = None, device: str = "auto",
                       dtype: str = "auto", int8: bool = False, **overrides):
    """-> (model in eval mode on `device` in the policy's dtype, tokenizer): `load_model`, then `for_inference`."""
    model, tok = load_model(path, tokenizer, vision, **overrides)
    return for_inference(model, device, dtype, int8), tok


def for_inference(model, device: str = "auto", dtype: str = "auto", int8: bool = False):
    """The model on `device`, cast to the dtype policy's compute dtype (bf16 on GPUs that have it), in eval mode;
    `int8`: its decoder layers' weights int8 (models/quantize.py; an int8 folder already is)."""
    target = pick_device(device)
    model = model.to(target, compute_dtype(target, dtype)).eval()
    if int8:
        quantize_int8(model)
    return model


def describe(model) -> str:
    """'26.2M parameters on cuda:0 in bfloat16' (', 23.6M of them int8' when quantized)."""
    quantized = int8_weights(model)
    params = sum(p.numel() for p in model.parameters()) + quantized
    dtype = next(model.parameters()).dtype
    return (f"{params / 1e6:.1f}M parameters on {model.device} in {str(dtype).replace('torch.', '')}"
            + (f", {quantized / 1e6:.1f}M of them int8" if quantized else ""))
