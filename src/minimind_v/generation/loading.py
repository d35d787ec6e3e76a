"""Load a model for inference from a folder of this project (or an exported one) or an original `.pth`."""

from __future__ import annotations

import os

from ..device import compute_dtype, pick_device


def load_for_inference(path: str, tokenizer: str | None = None, vision: str | None = None, device: str = "auto",
                       dtype: str = "auto", **overrides):
    """-> (model in eval mode on `device`, tokenizer). A folder brings its own tokenizer and tower (unless
    `tokenizer` / `vision` name others); an original `.pth` needs `tokenizer` (the original tokenizer folder) and `vision` (its tower folder).
    `overrides`: config fields an original checkpoint cannot tell (as for `convert --set`). On a GPU the weights are
    cast to the compute dtype of the dtype policy (bf16 where supported)."""
    from ..data.tokenizer import load_tokenizer
    from ..interop.original import load_original
    from ..models.vlm import load_vlm

    if not os.path.exists(path):
        raise FileNotFoundError(f"model not found: {path}")
    if os.path.isdir(path):
        model = load_vlm(path, **({"vision_model_path": vision} if vision else {}))
        tok = load_tokenizer(tokenizer or path)
    else:
        if tokenizer is None:
            raise ValueError(f"{path} is an original checkpoint: pass --tokenizer with its tokenizer folder (and "
                             "--vision with its vision tower folder for images)")
        model, tok = load_original(path, vision_model_path=vision, **overrides), load_tokenizer(tokenizer)
    target = pick_device(device)
    model = model.to(target, compute_dtype(target, dtype)).eval()
    return model, tok


def describe(model) -> str:
    """'26.2M parameters on cuda:0 in torch.bfloat16'."""
    params = sum(p.numel() for p in model.parameters())
    dtype = next(model.parameters()).dtype
    return f"{params / 1e6:.1f}M parameters on {model.device} in {str(dtype).replace('torch.', '')}"
