"""Checks a checkpoint passes before (and right after) its weights are loaded, each failing with one line that
names the file:

    config.json          a JSON object that makes a valid MiniMindVConfig (no unknown keys, sizes >= 1, ...)
    *.safetensors        readable headers (a truncated, empty or garbage file fails here, before any allocation)
    shapes               the config's tensors, built on the meta device (no memory), against the headers' shapes:
                         a config that asks for absurd sizes fails here instead of allocating them
    values               after loading, every floating-point weight is finite (NaN weights answer nothing)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..config import MiniMindVConfig


def read_config(folder: str | os.PathLike) -> MiniMindVConfig:
    """The folder's config.json as a MiniMindVConfig; FileNotFoundError / ValueError naming the file."""
    path = os.path.join(os.fspath(folder), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.fspath(folder)} holds no model (no config.json)")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable JSON file ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    try:
        return MiniMindVConfig.from_pretrained(os.fspath(folder))
    except (TypeError, ValueError, OSError, ZeroDivisionError, OverflowError) as err:
        raise ValueError(f"{path} is not a valid model config: {err}") from None


def weight_files(folder: str | os.PathLike) -> list[str]:
    """The folder's safetensors files (one, or the shards of a split checkpoint)."""
    folder = os.fspath(folder)
    return sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".safetensors"))


def weight_shapes(files: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """key -> shape, from the safetensors headers only (nothing is read beyond them)."""
    shapes = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{path} is not a readable safetensors file ({err}); the checkpoint is damaged") \
                from None
    return shapes


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """safetensors.load_file with a one-line error naming a damaged file."""
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); the checkpoint is damaged") from None


def check_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], source: str) -> None:
    """ValueError when a tensor that both name has another shape in the checkpoint than the config asks for."""
    wrong = [f"{key}: {list(found[key])} in the file, {list(expected[key])} from config.json"
             for key in sorted(set(expected) & set(found)) if tuple(expected[key]) != tuple(found[key])]
    if wrong:
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise ValueError(f"{source}: config.json does not match the weights: {'; '.join(wrong[:3])}{more}")


def meta_shapes(module_factory, source: object) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes a module would have, built on the meta device (no memory is allocated)."""
    try:
        with torch.device("meta"):
            module = module_factory()
    except (RuntimeError, OverflowError, ValueError) as err:
        raise ValueError(f"{source}: config.json asks for a model that cannot be built ({err})") from None
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def check_finite(named: Iterable[tuple[str, torch.Tensor]], source: object) -> None:
    """ValueError naming the first tensors whose values are not all finite."""
    bad = [name for name, value in named if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        listed = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ValueError(f"{source}: {len(bad)} weight tensor(s) hold NaN or infinite values ({listed}); the "
                         "checkpoint is damaged or its training diverged")
