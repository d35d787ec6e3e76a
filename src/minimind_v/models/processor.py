"""The processor: the tokenizer and the vision tower's image processor as one transformers `ProcessorMixin`, so
`AutoProcessor`, `processor.apply_chat_template` (text or content parts) and `pipeline("image-text-to-text")` work
on an exported folder.

    processor(images=[image], text="<|im_start|>user\\n<image>\\nwhat is this?<|im_end|>\\n<|im_start|>assistant\\n")
    -> input_ids [B, L] (each `<image>` grown to the image's placeholder run), attention_mask [B, L],
       pixel_values [num_images, 3, H, W] (images in reading order)
"""

from __future__ import annotations

from transformers import BatchFeature, ProcessorMixin
from transformers.image_utils import load_image

from ..config import CHAT_TEMPLATE, IMAGE_MARKER


class MiniMindVProcessor(ProcessorMixin):
    """Tokenizer + image processor; `image_placeholder` is the text that stands for one image (the config's
    `image_special_token`, repeated to `image_token_len` tokens when it is one token)."""

    def __init__(self, image_processor=None, tokenizer=None, image_placeholder: str = "", chat_template=None,
                 **kwargs):
        self.image_placeholder = image_placeholder
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)

    def __call__(self, images=None, text=None, return_tensors: str = "pt", **kwargs) -> BatchFeature:
        """Prompts with `<image>` markers (one per image, images in reading order across the batch) -> model inputs,
        left-padded for generation."""
        texts = [text] if isinstance(text, str) else list(text or [])
        flat = _flatten(images)
        markers = sum(t.count(IMAGE_MARKER) for t in texts)
        if markers != len(flat):
            raise ValueError(f"the text has {markers} {IMAGE_MARKER} marker(s) but {len(flat)} image(s) were given")
        data = dict(self.tokenizer([t.replace(IMAGE_MARKER, self.image_placeholder) for t in texts], padding=True,
                                   padding_side="left", add_special_tokens=False, return_tensors=return_tensors))
        if flat:
            images = [load_image(image) if isinstance(image, str) else image for image in flat]  # paths too
            data["pixel_values"] = self.image_processor(images=[image.convert("RGB") for image in images],
                                                        return_tensors=return_tensors)["pixel_values"]
        return BatchFeature(data, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


def _flatten(images) -> list:
    """None, one image, a list of images or a list of lists (one per prompt) -> the images in order."""
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        return [images]
    return [image for item in images for image in _flatten(item)]
