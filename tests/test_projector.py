"""The cross_attn projector: shapes, gradient flow, batch ≡ one image at a time, image conditioning through the VLM,
a strict save/load round trip, and its config checks."""

import pytest
import torch
from PIL import Image

from helpers import tiny_config
from minimind_v import MiniMindVConfig, MiniMindVLM
from minimind_v.models.projector import CrossAttnProjector


def test_resamples_any_number_of_tokens_to_the_queries():
    torch.manual_seed(0)
    projector = CrossAttnProjector(ve_hidden_size=24, hidden_size=32, num_queries=5, num_layers=2, num_heads=4)
    for tokens in (1, 7, 49):
        assert projector(torch.randn(3, tokens, 24)).shape == (3, 5, 32)


def test_every_part_gets_gradient_and_images_stay_separate():
    torch.manual_seed(0)
    projector = CrossAttnProjector(24, 32, num_queries=4, num_layers=2, num_heads=4)
    features = torch.randn(3, 9, 24)
    projector(features).pow(2).sum().backward()
    for name, p in projector.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        batched = projector(features)
        alone = torch.cat([projector(features[i:i + 1]) for i in range(3)])
        torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
        changed = features.clone()
        changed[1] = torch.randn(9, 24)  # (a constant shift would vanish in the input LayerNorm)
        out = projector(changed)
    torch.testing.assert_close(out[0], batched[0])  # only the changed image's tokens move
    assert not torch.allclose(out[1], batched[1], atol=1e-3)


def test_vlm_with_cross_attn_projector_is_image_conditioned_and_round_trips(clip_dir, tmp_path):
    torch.manual_seed(0)
    config = tiny_config(projector_type="cross_attn", image_special_token="@" * 6, image_ids=[34] * 6,
                         projector_layers=2, projector_heads=4)
    model = MiniMindVLM(config, vision_model_path=clip_dir).eval()  # the tiny tower gives 16 tokens -> 6 queries
    ids = torch.tensor([[5, 6] + [34] * 6 + [7, 8]])
    pixels = [model.image2tensor(Image.new("RGB", (32, 32), c), model.processor)[None] for c in ("red", "blue")]
    with torch.no_grad():
        red, blue = (model(input_ids=ids, pixel_values=p).logits for p in pixels)
    assert red.shape == (1, 10, config.vocab_size) and not torch.allclose(red, blue, atol=1e-4)
    model.save_pretrained(tmp_path / "m")
    again = MiniMindVLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, pixel_values=pixels[0]).logits, red)
    assert any(k.startswith("vision_proj.queries") for k in again.state_dict())


def test_config_checks():
    with pytest.raises(ValueError, match="must divide hidden_size"):
        tiny_config(projector_type="cross_attn", projector_heads=5)
    with pytest.raises(ValueError, match="use projector_type='cross_attn' to resample"):
        tiny_config(projector_type="mlp", vision_tokens=49)
    assert MiniMindVConfig.from_name("minimind2-v").tower_tokens == 196
    assert tiny_config(projector_type="cross_attn", projector_heads=4).tower_tokens is None
    assert tiny_config(projector_type="cross_attn", projector_heads=4, vision_tokens=49).tower_tokens == 49


def test_tower_token_count_is_checked_when_it_must_match(clip_dir):
    with pytest.raises(ValueError, match="gives 16 tokens per image but vision_tokens is 9"):
        MiniMindVLM(tiny_config(projector_type="cross_attn", projector_heads=4, vision_tokens=9),
                    vision_model_path=clip_dir)
    with pytest.raises(ValueError, match="placeholder run"):
        MiniMindVLM(tiny_config(image_special_token="@" * 6, image_ids=[34] * 6), vision_model_path=clip_dir)


def test_original_pth_layout_refuses_cross_attn(clip_dir, tmp_path):
    from minimind_v.interop.original import save_original

    model = MiniMindVLM(tiny_config(projector_type="cross_attn", projector_heads=4), vision_model_path=clip_dir)
    with pytest.raises(ValueError, match="knows only the linear and mlp projectors"):
        save_original(model, tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()


def test_the_training_loop_trains_a_cross_attn_model(workspace, tmp_path):
    import json

    from minimind_v.training.trainer import Trainer
    from helpers import MODEL, args_for

    overrides = dict(MODEL, projector_type="cross_attn", projector_heads=4, image_special_token="@" * 4,
                     image_ids=[34] * 4)
    out = tmp_path / "xattn"
    Trainer(args_for(workspace, "sft", out, overrides=overrides, epochs=4, freeze=0, feature_cache=None)).run()
    losses = [r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]
    assert sum(losses[-3:]) < 0.6 * sum(losses[:3])
    assert MiniMindVLM.from_pretrained(out / "model").config.projector_type == "cross_attn"
