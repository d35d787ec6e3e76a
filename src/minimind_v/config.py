"""One typed config for the MiniMind language model and the MiniMind-V VLM.

`MiniMindVConfig` is a `transformers.PreTrainedConfig` (a strict dataclass in transformers 5): every field below has a
type, derived values are computed in `_derive()` and nowhere else, and an unknown or misspelled key raises a
`ValueError` that suggests the closest known name. The field names are the seeds' (models/compat.py exports the
seeds' `VLLMconfig` and `get_model_configs`).

Presets: `MiniMindVConfig.from_name("minimind2-v", num_hidden_layers=4)`.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import field, fields
from typing import Any

from transformers import PretrainedConfig
from transformers.generation import GenerationConfig

IMAGE_MARKER = "<image>"  # where an image goes in a prompt; it becomes the image's placeholder run
# ChatML, one line per turn: "<|im_start|>{role}\n{content}<|im_end|>\n"; "<|im_start|>assistant\n" when
# add_generation_prompt. No system prompt is injected. A turn's content is text, or transformers' content parts
# ({"type": "text", "text": ...}, {"type": "image"} -> IMAGE_MARKER). (transformers renders with trim_blocks /
# lstrip_blocks; the newlines here all sit after text or an expression, never right after a block tag, so they stay.)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IGNORE_INDEX = -100  # the label of a position that carries no loss (the Hugging Face convention)
PROJECTOR_TYPES = ("linear", "mlp", "cross_attn")
VISION_TOWER_KINDS = ("auto", "clip", "siglip", "efficientnet")

# Keys that transformers itself passes through `__init__(**kwargs)` (loading, saving, generation, remote code).
_HF_PASSTHROUGH_KEYS = {
    "name_or_path", "_name_or_path", "output_attentions", "attn_implementation", "experts_implementation",
    "torch_dtype", "num_labels", "_commit_hash", "per_layer_config", "auto_map", "model_type", "use_return_dict",
    "_attn_implementation_internal", "_experts_implementation_internal",
}


def _default_image_ids() -> list[int]:
    return [34] * 196


def _default_lora_targets() -> list[str]:
    return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class MiniMindVConfig(PretrainedConfig):
    """Configuration of MiniMind (text) and MiniMind-V (vision-language) models."""

    model_type = "minimind-v"
    keys_to_ignore_at_inference = ["past_key_values"]

    # --- language model ---
    vocab_size: int = 6400
    hidden_size: int = 512
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None  # None: as many as attention heads (no GQA)
    num_hidden_layers: int = 8
    intermediate_size: int | None = None  # None: 8/3 * hidden_size rounded up to a multiple of 64
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    dropout: float = 0.0
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    rope_theta: float = 1e6
    inference_rope_scaling: bool = False  # YaRN extrapolation for long inference
    yarn_factor: float = 16.0
    yarn_original_max_position_embeddings: int = 2048
    qk_norm: bool = False  # per-head RMSNorm on queries and keys before RoPE (minimind-3v)
    flash_attn: bool = True  # use scaled_dot_product_attention (FlashAttention on GPU)
    use_cache: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0
    # --- mixture of experts ---
    use_moe: bool = False
    num_experts_per_token: int = 2
    n_routed_experts: int = 4
    n_shared_experts: int = 1
    aux_loss_alpha: float = 0.01
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1 (when k > 1)
    moe_renorm_top1: bool = False  # also renormalise when k == 1 (minimind-3v routes this way)
    seq_aux: bool = True  # sequence-level load-balancing loss instead of token-level
    # --- vision ---
    image_special_token: str = "@" * 196  # the placeholder text that stands for one image in a prompt
    image_ids: list[int] = field(default_factory=_default_image_ids)  # its token ids
    image_token_len: int | None = None  # visual tokens per image; None: len(image_ids)
    ve_hidden_size: int = 768  # width of the vision tower's features
    projector_type: str = "linear"  # linear | mlp (one output per tower token) | cross_attn (learned queries)
    projector_layers: int = 2  # cross_attn: cross-attention blocks
    projector_heads: int = 8  # cross_attn: attention heads (must divide hidden_size)
    vision_tokens: int | None = None  # tokens per image from the tower; None: see tower_tokens
    vision_tower_path: str | None = None  # local Hugging Face folder of the frozen vision tower
    vision_tower_kind: str = "auto"
    vision_config: dict | None = None  # the tower's own HF config when its weights travel inside the checkpoint
    # --- language model from Hugging Face (models/backbone.py) and LoRA ---
    llm_path: str | None = None  # a local causal-LM folder or .gguf as the language model; None: MiniMind
    trained_llm_parts: list[str] = field(default_factory=list)  # state-dict prefixes trained away from llm_path
    lora_rank: int = 0  # > 0: LoRA adapters of this rank on the language model's lora_targets
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=_default_lora_targets)
    # --- inference ---
    int8_weights: bool = False  # the decoder layers' linear weights held as int8 + a scale per row (models/quantize.py)

    def __post_init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - _HF_PASSTHROUGH_KEYS - set(GenerationConfig._get_default_generation_params())
        if unknown:
            raise ValueError(_unknown_keys_message(sorted(unknown)))
        kwargs.pop("model_type", None)
        self._derive()
        super().__post_init__(**kwargs)

    def _check_types(self) -> None:
        """Reject a wrongly typed value with its field name (before any arithmetic on it)."""
        for f in fields(MiniMindVConfig):
            if f.name not in _OWN_FIELDS:
                continue
            value, kinds = getattr(self, f.name), _TYPE_CHECKS.get(str(f.type))
            if kinds is not None and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))):
                raise ValueError(f"config field {f.name!r} must be {f.type}, got {value!r}")

    def _derive(self) -> None:
        """Fill every derived field and check consistency. The only place derived values are computed."""
        self._check_types()
        self._check_sizes(_SIZE_FIELDS)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                                 f"{self.num_attention_heads}; set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.intermediate_size is None:
            self.intermediate_size = 64 * ((int(self.hidden_size * 8 / 3) + 63) // 64)
        if self.use_moe and not 1 <= self.num_experts_per_token <= self.n_routed_experts:
            raise ValueError(f"num_experts_per_token {self.num_experts_per_token} must be in "
                             f"[1, n_routed_experts={self.n_routed_experts}]")
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type {self.projector_type!r} is not one of {PROJECTOR_TYPES}")
        if self.vision_tower_kind not in VISION_TOWER_KINDS:
            raise ValueError(f"vision_tower_kind {self.vision_tower_kind!r} is not one of {VISION_TOWER_KINDS}")
        self.image_ids = [int(i) for i in self.image_ids]
        if not self.image_ids or len(set(self.image_ids)) != 1:
            raise ValueError("image_ids must be a non-empty run of one placeholder token id, e.g. [34] * 196")
        if self.image_token_len is None:
            self.image_token_len = len(self.image_ids)
        if self.projector_type == "cross_attn":
            if self.projector_layers < 1 or self.hidden_size % self.projector_heads:
                raise ValueError(f"cross_attn projector: projector_layers must be >= 1 and projector_heads "
                                 f"({self.projector_heads}) must divide hidden_size ({self.hidden_size})")
        elif self.vision_tokens is not None and self.vision_tokens != self.image_token_len:
            raise ValueError(f"the {self.projector_type} projector makes one visual token per tower token, so "
                             f"vision_tokens ({self.vision_tokens}) must equal image_token_len "
                             f"({self.image_token_len}); use projector_type='cross_attn' to resample")
        if self.lora_rank < 0 or (self.lora_rank and not self.lora_targets):
            raise ValueError(f"lora_rank must be >= 0 (got {self.lora_rank}) and LoRA needs lora_targets")
        if self.int8_weights and (self.llm_path or self.lora_rank):
            raise ValueError("int8_weights: int8 checkpoints hold MiniMind language models without LoRA adapters "
                             "(a Hugging Face backbone quantizes at load: --int8)")

    def _check_sizes(self, names: tuple[str, ...]) -> None:
        """Sizes and counts are at least 1 (None where a field may be derived); anything else is an error."""
        for name in names:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"config field {name!r} must be at least 1, got {value}")

    @property
    def tower_tokens(self) -> int | None:
        """Tokens per image the vision tower must give: the placeholder run for the per-token projectors;
        `vision_tokens` for cross_attn (None: whatever the tower gives; EfficientNet-Lite0 then gives 49)."""
        if self.vision_tokens is not None:
            return self.vision_tokens
        return None if self.projector_type == "cross_attn" else self.image_token_len

    @property
    def image_placeholder(self) -> str:
        """The text that stands for one image: image_special_token, repeated when it is a single token."""
        return self.image_special_token * (self.image_token_len // len(self.image_ids))

    @property
    def image_token_id(self) -> int:
        """The id of the placeholder token that image features replace."""
        return self.image_ids[0]

    @property
    def num_experts(self) -> int:
        return self.n_routed_experts if self.use_moe else 0

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "MiniMindVConfig":
        """A named preset (see `PRESETS`) with keyword overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


_TYPE_CHECKS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "int | None": (int, type(None)),
                "str | None": (str, type(None)), "list[int]": (list, tuple),
                "list[str]": (list, tuple)}


def _unknown_keys_message(keys: list[str]) -> str:
    known = [f.name for f in fields(MiniMindVConfig)]
    parts = []
    for key in keys:
        close = difflib.get_close_matches(key, known, n=1)
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"unknown MiniMindVConfig key(s): {', '.join(parts)}"


_MINIMIND2_V = dict(vocab_size=6400, hidden_size=512, num_attention_heads=8, num_key_value_heads=2,
                    num_hidden_layers=8, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5,
                    image_special_token="@" * 196, image_ids=[34] * 196, ve_hidden_size=768,
                    projector_type="linear", vision_tower_kind="clip")
_MINIMIND_3V = dict(vocab_size=6400, hidden_size=768, num_attention_heads=8, num_key_value_heads=4,
                    num_hidden_layers=8, intermediate_size=2432, max_position_embeddings=32768, rope_theta=1e6,
                    rms_norm_eps=1e-6, qk_norm=True, image_special_token="<|image_pad|>", image_ids=[12],
                    image_token_len=64, ve_hidden_size=768, projector_type="mlp", vision_tower_kind="siglip",
                    num_experts_per_token=1, n_shared_experts=0, moe_renorm_top1=True, aux_loss_alpha=5e-4)

_OWN_FIELDS = set(MiniMindVConfig.__annotations__)
_SIZE_FIELDS = ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
                "intermediate_size", "head_dim", "max_position_embeddings", "num_experts_per_token",
                "n_routed_experts", "ve_hidden_size", "image_token_len", "vision_tokens", "projector_layers",
                "projector_heads")

PRESETS: dict[str, dict[str, Any]] = {
    # the seeds' presets (`get_model_configs`)
    "tiny": dict(vocab_size=10000, hidden_size=256, num_attention_heads=4, num_hidden_layers=6,
                 intermediate_size=512, max_position_embeddings=1024),
    "small": dict(vocab_size=30000, hidden_size=768, num_attention_heads=12, num_hidden_layers=12,
                  intermediate_size=3072, max_position_embeddings=2048),
    "medium": dict(vocab_size=50000, hidden_size=1024, num_attention_heads=16, num_key_value_heads=8,
                   num_hidden_layers=24, intermediate_size=4096, max_position_embeddings=4096),
    "large_moe": dict(vocab_size=100000, hidden_size=1536, num_attention_heads=24, num_key_value_heads=12,
                      num_hidden_layers=32, use_moe=True, num_experts_per_token=2, n_routed_experts=16,
                      n_shared_experts=2, aux_loss_alpha=0.01, max_position_embeddings=8192),
    # upstream MiniMind-V's real sizes
    "minimind2-v": _MINIMIND2_V,  # 26M: CLIP ViT-B/16, 196 tokens, linear projector
    "minimind2-v-104m": {**_MINIMIND2_V, "hidden_size": 768, "num_hidden_layers": 16},
    "minimind2-v-moe": {**_MINIMIND2_V, "use_moe": True, "num_experts_per_token": 2, "n_routed_experts": 4,
                        "n_shared_experts": 1},
    "minimind-3v": _MINIMIND_3V,  # SigLIP B/32-256, 64 tokens, LayerNorm+MLP projector, q/k norm
    "minimind-3v-moe": {**_MINIMIND_3V, "use_moe": True, "n_routed_experts": 4},
}


def parse_overrides(items: list[str]) -> dict[str, object]:
    """['hidden_size=64', 'use_moe=true'] -> {'hidden_size': 64, 'use_moe': True} (JSON values, else strings)."""
    overrides: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return overrides
