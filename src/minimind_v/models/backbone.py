"""Any Hugging Face causal language model as the VLM's language model, and LoRA adapters for either backbone.

    --llm PATH   a local folder `AutoModelForCausalLM` loads (Qwen3, SmolLM2, Llama, ...) or a single .gguf file
                 (dequantised on load; needs the `gguf` extra)

The backbone keeps its own tokenizer and chat template. When the tokenizer has no image placeholder token,
`<|image_pad|>` is added and the embedding grows to match; the new rows start at the mean of the old ones (the same
value on every load, so a checkpoint that did not train the embedding needs not store it). LoRA adapters go through
`peft` onto the attention and MLP projections named in the config (`lora_targets`).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

IMAGE_PAD = "<|image_pad|>"


def _location(path: str) -> tuple[str, dict]:
    """A folder, or a .gguf file -> (folder, from_pretrained keyword arguments)."""
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(path)), {"gguf_file": os.path.basename(path)}
    if os.path.isdir(path):
        return path, {}
    raise FileNotFoundError(f"language model {path!r} not found: pass a local Hugging Face model folder (with "
                            "config.json and weights) or a .gguf file; nothing is downloaded")


def _load(loader, path: str, **kwargs):
    folder, extra = _location(path)
    try:
        return loader.from_pretrained(folder, **extra, **kwargs)
    except ImportError as err:  # GGUF needs gguf (+ accelerate); a folder may need a model's optional package
        raise ValueError(f"loading {path} needs a package that is missing ({err}); for .gguf files install "
                         "minimind-v[gguf]") from err


@functools.lru_cache(maxsize=8)
def backbone_config(path: str):
    """The backbone's own (text) config; a ValueError when the folder is not a causal language model."""
    config = _load(AutoConfig, path).get_text_config()
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{path} is a {config.model_type!r} model, not a causal language model "
                         "(AutoModelForCausalLM cannot load it)")
    return config


def backbone_fields(path: str, tokenizer) -> dict:
    """The VLM config fields a backbone decides: widths, depth, context, vocabulary (grown for an added placeholder
    token), special token ids and the single-token placeholder. The one place they are derived."""
    text = backbone_config(path)
    return {"llm_path": os.path.abspath(path), "hidden_size": text.hidden_size,
            "num_hidden_layers": text.num_hidden_layers, "num_attention_heads": text.num_attention_heads,
            "num_key_value_heads": getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            "intermediate_size": getattr(text, "intermediate_size", None),
            "max_position_embeddings": getattr(text, "max_position_embeddings", 2048),
            "vocab_size": max(len(tokenizer), text.vocab_size),
            "tie_word_embeddings": bool(getattr(text, "tie_word_embeddings", False)),
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "image_special_token": IMAGE_PAD,
            "image_ids": [tokenizer.convert_tokens_to_ids(IMAGE_PAD)]}


def load_backbone(path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    model = _load(AutoModelForCausalLM, path, dtype=dtype)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and quantizer.quantization_config.quant_method == "gguf":
        # GGUF weights were dequantised into dense tensors on load: drop the marker so the export can save them
        quantizer.remove_quantization_config(model)
    return model


def load_backbone_tokenizer(path: str):
    """The backbone's tokenizer, with `<|image_pad|>` added when it has no such token and a pad token (its eos)
    when it has none."""
    backbone_config(path)  # a clear error first when `path` is no causal language model
    tokenizer = _load(AutoTokenizer, path)
    if IMAGE_PAD not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_PAD]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ValueError(f"{path}: the tokenizer has no chat template; use an instruct/chat model")
    return tokenizer


def resize_vocab(model: nn.Module, size: int) -> None:
    """Grow the input (and untied output) embedding to `size` rows; new rows = the mean of the old ones."""
    old = model.get_input_embeddings().weight.shape[0]
    if size == old:
        return
    if size < old:
        raise ValueError(f"the backbone has {old} embedding rows; the config asks for fewer ({size})")
    model.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        tables = {id(t): t for t in (model.get_input_embeddings(), model.get_output_embeddings()) if t is not None}
        for table in tables.values():
            table.weight[old:] = table.weight[:old].mean(0)  # [new, H] <- [H]


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    """The backbone's decoder layers (what the freeze strategies count)."""
    decoder = language_model.get_decoder() if hasattr(language_model, "get_decoder") else language_model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"cannot find the decoder layers of {type(language_model).__name__} (no `.layers`)")
    return layers


# ------------------------------------------------------------------------------------------------------------ LoRA


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
