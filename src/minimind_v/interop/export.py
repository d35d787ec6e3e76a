"""Hugging Face folders: this project's format, the merged export, the self-contained remote-code export, and
`convert` between them and original `.pth` checkpoints.

- `save_hf_folder`: model (safetensors + config; the tower referenced by path), tokenizer, image processor.
- `export_merged`: LoRA adapters folded into the weights; a Hugging Face backbone is written whole into
  `<out>/language_model/` (a plain transformers model folder) and the VLM refers to it, so the folder stands alone.
- `export_remote_code`: the same plus the vision tower's weights and the modeling code itself, so that
  `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works where only torch, transformers and
  pillow are installed (the way Hugging Face remote-code models travel); push it with `huggingface-cli upload`.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from .original import load_original, save_original
from ..models import MiniMindVLM, load_vlm
from ..models.processor import MiniMindVProcessor
from ..models.quantize import quantize_int8
from .model_card import write_model_card

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # minimind_v/
CONFIG_MODULE = "configuration_minimind_v"
MODELING_MODULE = "modeling_minimind_v"
# the modeling files, in dependency order; they land flat in the export folder
MODEL_FILES = ("norm.py", "rope.py", "attention.py", "mlp.py", "language_model.py", "projector.py", "lora.py",
               "quantize.py", "vision_tower.py", "efficientnet.py", "safe_loading.py", "vlm_base.py", "compat.py",
               "vlm.py", "backbone.py", "processor.py")
PROCESSOR_MODULE = "processor"


def save_hf_folder(model: MiniMindVLM, out: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> None:
    """model.save_pretrained + the tokenizer (copied through transformers, chat template included) + processor."""
    model.save_pretrained(out)
    if model.processor is not None:
        model.processor.save_pretrained(out)
    if tokenizer_dir is not None:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)


def export_merged(model, out: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> None:
    """A folder without adapters and without a reference outside itself."""
    exported = copy.deepcopy(model)
    exported.merge_lora()
    if exported.vision_tower is not None and hasattr(exported.vision_tower.encoder, "config"):
        exported.embed_vision_tower()  # a CLIP/SigLIP tower travels inside (EfficientNet comes with its package)
    exported.export_language_model(os.fspath(out), tokenizer_dir)  # a Hugging Face backbone travels inside
    save_hf_folder(exported, out, tokenizer_dir)


def export_remote_code(model: MiniMindVLM, out: str | os.PathLike,
                       tokenizer_dir: str | os.PathLike | None = None) -> None:
    """A self-contained folder: weights (tower included), config with auto_map, tokenizer, processor, code."""
    if model.vision_tower is None:
        raise ValueError("export needs a model with its vision tower (pass the tower folder)")
    exported = copy.deepcopy(model)
    exported.embed_vision_tower()
    exported.config.auto_map = {"AutoConfig": f"{CONFIG_MODULE}.MiniMindVConfig",
                                "AutoModelForCausalLM": f"{MODELING_MODULE}.MiniMindVLM",
                                "AutoModelForImageTextToText": f"{MODELING_MODULE}.MiniMindVLM"}
    save_hf_folder(exported, out, tokenizer_dir)
    if tokenizer_dir is not None:
        save_processor(exported, out, tokenizer_dir)
    write_modeling_code(Path(out))
    write_model_card(exported, Path(out), tokenizer_dir is not None)


def save_processor(model: MiniMindVLM, out: str | os.PathLike, tokenizer_dir: str | os.PathLike) -> None:
    """The processor (tokenizer + image processor + chat template) with an auto_map, so that
    `AutoProcessor.from_pretrained(out, trust_remote_code=True)` gives it."""
    processor = MiniMindVProcessor(model.processor, AutoTokenizer.from_pretrained(tokenizer_dir),
                                   image_placeholder=model.config.image_placeholder)
    processor.save_pretrained(out)
    path = Path(out) / "processor_config.json"
    settings = json.loads(path.read_text(encoding="utf-8"))
    settings["auto_map"] = {"AutoProcessor": f"{PROCESSOR_MODULE}.MiniMindVProcessor"}
    path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def write_modeling_code(out: Path) -> None:
    """Copy the package's modeling files flat into `out`, with imports rewritten to siblings."""
    (out / f"{CONFIG_MODULE}.py").write_text((PACKAGE_DIR / "config.py").read_text(encoding="utf-8"),
                                            encoding="utf-8")
    for name in MODEL_FILES:
        source = (PACKAGE_DIR / "models" / name).read_text(encoding="utf-8")
        (out / name).write_text(re.sub(r"from \.\.config import", f"from .{CONFIG_MODULE} import", source),
                                encoding="utf-8")
    (out / f"{MODELING_MODULE}.py").write_text(
        '"""MiniMind-V remote code: the classes transformers loads with trust_remote_code=True."""\n\n'
        "from .language_model import MiniMindForCausalLM, MiniMindModel  # noqa: F401\n"
        "from .vlm import MiniMindVLM  # noqa: F401\n", encoding="utf-8")


def convert(source: str | os.PathLike, target: str | os.PathLike, vision: str | None = None,
            tokenizer: str | None = None, remote_code: bool = False, int8: bool = False, **overrides: Any) -> str:
    """`.pth` -> folder (this project's, or the remote-code export), or folder -> `.pth`; `int8`: the folder written
    holds the decoder layers' weights as int8 (LoRA adapters folded in first). Returns what it did."""
    source, target = os.fspath(source), os.fspath(target)
    to_pth, from_folder = target.endswith((".pth", ".pt")), os.path.isdir(source)
    if int8 and to_pth:
        raise ValueError("--int8 writes a folder: the original .pth layout has no int8 weights")
    if from_folder:
        model, tokenizer = folder_source(source, vision, tokenizer, to_pth, remote_code)
    else:
        model = load_original(source, vision_model_path=vision, **overrides)
    if int8:
        quantize_for_folder(model)
    if from_folder and to_pth:
        model.merge_lora()
        save_original(model, target)
        return f"wrote original checkpoint {target} ({sum(p.numel() for p in model.parameters()):,} parameters)"
    if from_folder and not remote_code:
        export_merged(model, target, tokenizer)
        return (f"wrote merged folder {target} (LoRA adapters folded in; the language model included"
                + ("; the decoder layers' weights int8)" if int8 else ")"))
    if remote_code:
        export_remote_code(model, target, tokenizer)
    else:
        save_hf_folder(model, target, tokenizer)
    kind = "self-contained remote-code folder" if remote_code else "Hugging Face folder"
    return f"wrote {kind} {target} (MiniMind generation detected from {os.path.basename(source)})"


def folder_source(source: str, vision: str | None, tokenizer: str | None, to_pth: bool, remote_code: bool):
    """A model folder to convert -> (model, tokenizer folder or None); what the target cannot hold is refused."""
    vision_kw = {"vision_model_path": vision} if vision else ({"vision_model_path": None} if to_pth else {})
    model = load_vlm(source, **vision_kw)
    tokenizer = tokenizer or (source if os.path.isfile(os.path.join(source, "tokenizer_config.json")) else None)
    if not model.supports_original_layout and (to_pth or remote_code):
        raise ValueError(f"{source} is built on a Hugging Face language model ({model.config.llm_path}); the "
                         "original .pth layout and the remote-code export know only MiniMind: convert it to a "
                         "folder (the merged export) instead")
    if to_pth and model.config.int8_weights:
        raise ValueError(f"{source} holds int8 weights: the original .pth layout has none; convert the "
                         "full-precision folder it came from")
    return model, tokenizer


def quantize_for_folder(model) -> None:
    """The model, in place, as an int8 folder holds it: adapters folded in, decoder layers' weights int8."""
    if not model.supports_int8_checkpoints:
        raise ValueError("--int8: int8 folders hold MiniMind language models; a Hugging Face backbone quantizes "
                         "at load (chat/serve/eval --int8)")
    model.merge_lora()
    quantize_int8(model)


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Identical keys, dtypes and values."""
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
