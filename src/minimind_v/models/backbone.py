"""Any Hugging Face causal language model as the VLM's language model: loading it, and `HFBackboneVLM`.

    --llm PATH   a local folder `AutoModelForCausalLM` loads (Qwen3, SmolLM2, Llama, ...) or a single .gguf file
                 (dequantised on load; needs the `gguf` extra)

The backbone keeps its own tokenizer and chat template. When the tokenizer has no image placeholder token,
`<|image_pad|>` is added and the embedding grows to match; the new rows start at the mean of the old ones (the same
value on every load, so a checkpoint that did not train the embedding needs not store it).

    HFBackboneVLM: embed_tokens(input_ids) with image features over the placeholders -> the backbone's own forward
    (inputs_embeds) -> logits. Checkpoints hold the projector, the LoRA adapters and the `trained_llm_parts`; the
    rest is reloaded from `llm_path` (absolute, or relative to the checkpoint folder as the merged export writes it).
"""

from __future__ import annotations

import functools
import os

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationMixin
from transformers.cache_utils import Cache
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..config import MiniMindVConfig
from .language_model import MiniMindOutput, MiniMindPreTrainedModel, causal_lm_loss
from .lora import add_lora, is_lora_key
from .projector import build_projector
from .quantize import int8_weights
from .safe_loading import check_shapes, meta_shapes, read_config, read_weights, weight_shapes
from .vision_tower import load_image_processor
from .vlm_base import FROM_CONFIG, TOWER_PREFIX, VisionLanguageModel

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


class HFBackboneVLM(VisionLanguageModel, MiniMindPreTrainedModel, GenerationMixin):
    """The VLM on any local Hugging Face causal LM (`config.llm_path`), held as `language_model`."""

    def __init__(self, config: MiniMindVConfig, vision_model_path: str | None = FROM_CONFIG, *,
                 base_dir: str | None = None):
        """`base_dir`: the checkpoint folder a relative `llm_path` is relative to."""
        if not config.llm_path:
            raise ValueError("HFBackboneVLM needs config.llm_path (a local causal-LM folder or .gguf file)")
        super().__init__(config)
        path = config.llm_path if os.path.isabs(config.llm_path) or base_dir is None else \
            os.path.join(base_dir, config.llm_path)
        self.language_model = load_backbone(path)  # [B, L, H] embeddings in, logits out
        check_backbone(self.language_model, config, path)
        resize_vocab(self.language_model, config.vocab_size)
        self.vision_proj = build_projector(config)
        self.vision_proj.apply(self._init_weights)
        if config.lora_rank:
            add_lora(self.language_model, config)
        self._init_vision(config, vision_model_path)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    @property
    def supports_static_decode(self) -> bool:
        """Fixed-shape decode steps (CUDA graphs, compiled CPU steps) where the backbone attends to the whole cache
        under the 4-D mask it is given: SDPA or eager attention, no sliding window, no mixture of experts (whose
        routing is data-dependent)."""
        text = self.language_model.config.get_text_config()
        experts = any(getattr(text, name, None) for name in ("num_experts", "num_local_experts", "n_routed_experts"))
        window = getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True)
        attention = getattr(self.language_model.config, "_attn_implementation", None)
        return not experts and not window and attention in ("sdpa", "eager")

    def decoder_layers(self) -> nn.ModuleList:
        layers = getattr(self.language_model.get_decoder(), "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"cannot find the decoder layers of {type(self.language_model).__name__} (no `.layers`)")
        return layers

    def export_language_model(self, folder: str, tokenizer_dir: str | None = None) -> None:
        """The (merged) language model as a plain transformers folder `folder/language_model`, which the config then
        names relatively: the export stands alone."""
        self.language_model.save_pretrained(os.path.join(folder, "language_model"))
        if tokenizer_dir is not None:
            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(os.path.join(folder, "language_model"))
        self.config.llm_path = "language_model"  # relative: resolved against the folder it is loaded from
        self.config.trained_llm_parts = []

    def frozen_base_parameters(self) -> list[nn.Parameter]:
        """The base model's frozen weights that no checkpoint holds."""
        return [param for name, param in self.named_parameters()
                if name.startswith("language_model.") and not param.requires_grad and not self.saves(name)]

    def saves(self, key: str) -> bool:
        """Projector, LoRA adapters and `trained_llm_parts`; the rest is the base model at `llm_path`."""
        if key.startswith(TOWER_PREFIX):
            return self.config.vision_config is not None
        return (key.startswith("vision_proj.") or is_lora_key(key) or
                any(key.startswith(part) for part in self.config.trained_llm_parts))

    def forward(self, input_ids: torch.LongTensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, past_key_values: Cache | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                labels: torch.LongTensor | None = None, position_ids: torch.LongTensor | None = None,
                inputs_embeds: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                **kwargs) -> MiniMindOutput:
        """As MiniMindVLM.forward; the backbone's own forward runs on the merged embeddings."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_features, past_key_values)
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                                  logits_to_keep=logits_to_keep, **kwargs)
        loss = causal_lm_loss(out.logits, labels) if labels is not None else None
        return MiniMindOutput(loss=loss, logits=out.logits, past_key_values=out.past_key_values,
                              aux_loss=out.logits.new_zeros((), dtype=torch.float32))

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: dict | None = None, **kwargs) -> None:
        """config.json (with the base model's path), generation_config.json, model.safetensors (trained parts; or
        `state_dict`, the same keys gathered from elsewhere)."""
        if int8_weights(self):
            raise ValueError("a Hugging Face backbone with int8 layers cannot be saved (its checkpoints hold trained "
                             "parts in full precision): save it unquantized and pass --int8 when loading")
        os.makedirs(save_directory, exist_ok=True)
        self.config.save_pretrained(save_directory)
        self.generation_config.save_pretrained(save_directory)
        saved = self.checkpoint_state_dict() if state_dict is None else state_dict
        state = {k: v.detach().contiguous() for k, v in saved.items()}
        save_file(state, os.path.join(save_directory, "model.safetensors"), metadata={"format": "pt"})
        if self.config.vision_config is not None and self.processor is not None:
            self.processor.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args,
                        vision_model_path: str | None = FROM_CONFIG, **kwargs) -> "HFBackboneVLM":
        """The base model from `llm_path`, then the checkpoint's trained parts, strictly."""
        if args or kwargs:
            raise TypeError(f"HFBackboneVLM.from_pretrained takes a folder and vision_model_path only, not "
                            f"{list(kwargs) or args}; move the model with .to(device, dtype) afterwards")
        folder = os.fspath(pretrained_model_name_or_path)
        config = read_config(folder)
        weights = os.path.join(folder, "model.safetensors")
        projector = meta_shapes(lambda: build_projector(config), folder)  # before the base model is loaded
        check_shapes({"vision_proj." + k: v for k, v in projector.items()}, weight_shapes([weights]), folder)
        model = cls(config, vision_model_path=None, base_dir=folder)
        model.load_checkpoint_state(read_weights(weights), folder)
        if config.vision_config is not None:
            model.vision_tower.processor = load_image_processor(folder)
        else:
            model._attach_tower_folder(config.vision_tower_path if vision_model_path == FROM_CONFIG
                                       else vision_model_path, folder)
        return model


def check_backbone(language_model: nn.Module, config: MiniMindVConfig, path: str) -> None:
    """The base model must still be the one the config was made for."""
    text = language_model.config.get_text_config()
    if (text.hidden_size, text.num_hidden_layers) != (config.hidden_size, config.num_hidden_layers):
        raise ValueError(f"the language model at {path} is {text.hidden_size} wide with {text.num_hidden_layers} "
                         f"layers, but this checkpoint was made for {config.hidden_size} x "
                         f"{config.num_hidden_layers}: is llm_path still the base model it was trained from?")
