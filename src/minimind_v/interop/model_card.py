"""The model card (README.md) of a self-contained export: what the model is, and how to use it with transformers
alone (AutoModelForCausalLM / AutoProcessor with trust_remote_code, the image-text-to-text pipeline)."""

from __future__ import annotations

from pathlib import Path

CARD = """---
library_name: transformers
pipeline_tag: image-text-to-text
tags:
- minimind-v
- vision-language
---

# {name}

A MiniMind-V vision-language model: a frozen {tower} vision tower whose patch features pass through a `{projector}`
projector and replace a run of {tokens} placeholder tokens in the prompt of a MiniMind language model
({hidden} wide, {layers} layers, {heads} attention heads / {kv_heads} key-value heads, vocabulary {vocab}{moe};
{parameters:,} parameters in all). Exported by minimind-v; it needs only torch, transformers and pillow.

## Use

```python
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)
{processor_usage}
```
{pipeline_usage}
## Limits

A small model trained for what its data shows; answers about other images are guesses. Greedy decoding
(`do_sample=False`) gives the answers it was evaluated with.
"""

PROCESSOR_USAGE = """processor = AutoProcessor.from_pretrained("{name}", trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is in the picture?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[Image.open("picture.png")], text=prompt)
out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))"""

PIPELINE_USAGE = """
or as a pipeline:

```python
from transformers import pipeline

chat = pipeline("image-text-to-text", model="{name}", trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image", "image": "picture.png"}},
                                         {{"type": "text", "text": "What is in the picture?"}}]}}]
print(chat(text=messages, max_new_tokens=64, return_full_text=False)[0]["generated_text"])
```
"""

NO_PROCESSOR = """# exported without a tokenizer: add one (and a processor) before use
pixel_values = model.image2tensor(Image.open("picture.png"), model.processor).unsqueeze(0)"""


def write_model_card(model, out: Path, has_processor: bool) -> None:
    """README.md in `out`, describing `model` (its config) and how to load it."""
    config, name = model.config, out.name
    text = CARD.format(
        name=name, tower=config.vision_config.get("model_type", "vision") if config.vision_config else "vision",
        projector=config.projector_type, tokens=config.image_token_len, hidden=config.hidden_size,
        layers=config.num_hidden_layers, heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
        vocab=config.vocab_size, moe=f", {config.n_routed_experts} experts" if config.use_moe else "",
        parameters=sum(p.numel() for p in model.parameters()),
        processor_usage=PROCESSOR_USAGE.format(name=name) if has_processor else NO_PROCESSOR,
        pipeline_usage=PIPELINE_USAGE.format(name=name) if has_processor else "")
    (out / "README.md").write_text(text, encoding="utf-8")
