"""MiniMind-V: image splicing, presets, Hugging Face save/load/generate, errors."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from helpers import save_clip, save_siglip, tiny_config
from minimind_v import PRESETS, MiniMindVConfig, MiniMindVLM
from minimind_v.models.vlm_base import merge_image_features

IMG = 34  # placeholder id of the tiny configs ('@')


def vlm(tower_dir, seed=0, **overrides):
    torch.manual_seed(seed)
    return MiniMindVLM(tiny_config(**overrides), vision_model_path=tower_dir).eval()


def prompt(*parts):
    """prompt(5, 'img', 6, 7) -> [[5, 34 x 16, 6, 7]]."""
    ids = []
    for part in parts:
        ids += [IMG] * 16 if part == "img" else [part]
    return torch.tensor([ids])


def naive_merge(embeds, input_ids, features):
    out, image, filled = embeds.clone(), 0, 0
    for b in range(input_ids.shape[0]):
        for t in range(input_ids.shape[1]):
            if input_ids[b, t] == IMG:
                out[b, t] = features[image, filled]
                filled += 1
                if filled == features.shape[1]:
                    image, filled = image + 1, 0
    return out


def test_masked_splice_equals_naive_reference():
    torch.manual_seed(0)
    ids = torch.cat([prompt(1, "img", 2, "img", 3), prompt(4, 5, 6, "img", *range(7, 23))])
    embeds, features = torch.randn(2, 35, 8, requires_grad=True), torch.randn(3, 16, 8, requires_grad=True)
    merged, expected = merge_image_features(embeds, ids, features, IMG), naive_merge(embeds, ids, features)
    torch.testing.assert_close(merged, expected)
    weights = torch.randn(2, 35, 8)  # gradients reach the features and the text embeddings as the loop's do
    for got, want in zip(torch.autograd.grad((merged * weights).sum(), (embeds, features)),
                         torch.autograd.grad((expected * weights).sum(), (embeds, features))):
        torch.testing.assert_close(got, want)
    assert torch.equal(merge_image_features(embeds, torch.ones_like(ids), features[:0], IMG), embeds)  # no images


def test_forward_with_images_equals_reference_embeddings(clip_dir):
    model = vlm(clip_dir)
    ids = torch.cat([prompt(1, "img", 2, "img", 3), prompt(4, 5, 6, "img", *range(7, 23))])
    pixels = torch.randn(3, 3, 32, 32)  # three images in reading order: two in row 0, one in row 1
    features = model.vision_proj(model.vision_tower(pixels))
    embeds = naive_merge(model.model.embed_tokens(ids), ids, features)
    expected = model(inputs_embeds=embeds).logits
    torch.testing.assert_close(model(ids, pixel_values=pixels).logits, expected, atol=1e-5, rtol=1e-4)
    # the same with pixel_values [B, N, 3, H, W] when every row has one image
    one_each = torch.cat([prompt(1, "img", 2), prompt(3, "img", 4)])
    stacked = pixels[:2].unsqueeze(1)
    torch.testing.assert_close(model(one_each, pixel_values=stacked).logits,
                               model(one_each, pixel_values=pixels[:2]).logits)
    torch.testing.assert_close(model(one_each, pixel_values=stacked.unsqueeze(2)).logits,
                               model(one_each, pixel_values=pixels[:2]).logits)


def test_placeholder_count_mismatch_is_a_clear_error(clip_dir):
    model = vlm(clip_dir)
    truncated = prompt(1, "img")[:, :10]  # truncation cut the run: 9 placeholders for 16 features
    with pytest.raises(ValueError, match=r"9 image placeholder tokens \(id 34\).*1 image\(s\) give 16 features"):
        model(truncated, pixel_values=torch.randn(1, 1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"16 image placeholder tokens.*2 image\(s\) give 32 features"):
        model(prompt(1, "img", 2), pixel_values=torch.randn(1, 2, 3, 32, 32))
    with pytest.raises(ValueError, match="pixel_values must be"):
        model(prompt(1, "img"), pixel_values=torch.randn(1, 1, 1, 32, 32))


def test_images_without_a_tower_and_mismatched_towers(tmp_path, clip_dir):
    model = MiniMindVLM(tiny_config())
    assert model.vision_encoder is None and model.processor is None
    with pytest.raises(ValueError, match="no vision tower"):
        model(prompt(1, "img"), pixel_values=torch.randn(1, 1, 3, 32, 32))
    with pytest.raises(ValueError, match="32 wide but config.ve_hidden_size is 64"):
        MiniMindVLM(tiny_config(ve_hidden_size=64), vision_model_path=clip_dir)
    with pytest.raises(ValueError, match="16 tokens per image but .* is 196"):
        MiniMindVLM(tiny_config(image_ids=[34] * 196), vision_model_path=clip_dir)


def test_seed_attribute_names(clip_dir):
    model = vlm(clip_dir)
    assert model.params is model.config
    assert model.vision_encoder is model.vision_tower and model.multi_modal_projector is model.vision_proj
    assert model.processor is model.vision_tower.processor
    tower, processor = MiniMindVLM.get_vision_model(clip_dir)
    assert tower.num_tokens == 16 and processor is tower.processor
    assert MiniMindVLM.get_vision_model("no/such/folder") == (None, None)


def preset_case(name, tmp_path_factory):
    """The preset's structure (MoE, q/k norm, projector, image tokens, tower kind) at a tiny width."""
    config = MiniMindVConfig.from_name(name)
    shrink = dict(vocab_size=300, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                  intermediate_size=96, ve_hidden_size=32, n_routed_experts=min(config.n_routed_experts, 4),
                  num_experts_per_token=min(config.num_experts_per_token, 2))
    folder = tmp_path_factory.mktemp(name)
    if config.vision_tower_kind == "siglip":  # 64 tokens: 64 px, patch 8
        tower = save_siglip(folder, image_size=64, patch=8)
    else:  # 196 tokens: 224 px, patch 16
        tower = save_clip(folder, image_size=224, patch=16)
    return MiniMindVConfig.from_name(name, **shrink), tower


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_output_shapes_per_preset(name, tmp_path_factory):
    config, tower = preset_case(name, tmp_path_factory)
    torch.manual_seed(0)
    model = MiniMindVLM(config, vision_model_path=tower).train()
    size = 64 if config.vision_tower_kind == "siglip" else 224
    run = [config.image_token_id] * config.image_token_len
    ids = torch.tensor([[1, 5] + run + [6, 7], [1, 8] + run + [9, 2]])
    out = model(ids, pixel_values=torch.randn(2, 1, 3, size, size), labels=ids)
    assert out.logits.shape == (2, ids.shape[1], 300)
    assert out.hidden_states.shape == (2, ids.shape[1], 64)
    assert torch.isfinite(out.loss) and (out.aux_loss > 0) == (config.use_moe and config.aux_loss_alpha > 0)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_save_load_round_trip_gives_identical_logits(tmp_path, kind, clip_dir, siglip_dir):
    tower = clip_dir if kind == "clip" else siglip_dir
    model = vlm(tower, use_moe=kind == "siglip", projector_type="mlp" if kind == "siglip" else "linear",
                qk_norm=kind == "siglip")
    ids, pixels = prompt(1, 2, "img", 3), torch.randn(1, 1, 3, 32, 32)
    model.save_pretrained(tmp_path / "m")
    saved = load_file(tmp_path / "m" / "model.safetensors")
    assert not any(k.startswith("vision_tower.") for k in saved)  # the frozen tower is not duplicated
    assert any(k.startswith("vision_proj.") for k in saved)
    again = MiniMindVLM.from_pretrained(tmp_path / "m")
    assert again.config.vision_tower_path == tower
    torch.testing.assert_close(again(ids, pixel_values=pixels).logits, model(ids, pixel_values=pixels).logits,
                               atol=0, rtol=0)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(auto) is MiniMindVLM
    torch.testing.assert_close(auto(ids, pixel_values=pixels).logits, model(ids, pixel_values=pixels).logits)


def test_loading_is_strict(tmp_path, clip_dir):
    vlm(clip_dir).save_pretrained(tmp_path / "m")
    weights_file = tmp_path / "m" / "model.safetensors"
    weights = load_file(weights_file)
    save_file({**weights, "model.layers.0.mlp.extra.weight": torch.zeros(2)}, weights_file,
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected keys: \['model.layers.0.mlp.extra.weight'\]"):
        MiniMindVLM.from_pretrained(tmp_path / "m")
    del weights["model.norm.weight"]
    save_file(weights, weights_file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing keys: \['model.norm.weight'\]"):
        MiniMindVLM.from_pretrained(tmp_path / "m")


def test_tower_folder_moved_or_overridden(tmp_path, clip_dir):
    config = tiny_config(vision_tower_path=str(tmp_path / "gone"))
    MiniMindVLM(config, vision_model_path=None).save_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="vision tower folder"):
        MiniMindVLM.from_pretrained(tmp_path / "m")
    assert MiniMindVLM.from_pretrained(tmp_path / "m", vision_model_path=None).vision_tower is None
    assert MiniMindVLM.from_pretrained(tmp_path / "m", vision_model_path=clip_dir).vision_tower is not None


def test_generate_is_deterministic_image_conditioned_and_matches_a_cached_loop(clip_dir):
    model = vlm(clip_dir, initializer_range=0.2)  # a wider init, so random weights produce varied tokens
    ids = prompt(1, 5, "img", 6)
    image_a, image_b = torch.randn(1, 1, 3, 32, 32), torch.randn(1, 1, 3, 32, 32)
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    first = model.generate(ids, pixel_values=image_a, **kwargs)
    assert torch.equal(first, model.generate(ids, pixel_values=image_a, **kwargs))
    assert not torch.equal(first, model.generate(ids, pixel_values=image_b, **kwargs))
    # a hand-written greedy loop: image at prefill only, then one token at a time on the cache
    out = model(ids, pixel_values=image_a, use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    for _ in range(7):
        out = model(torch.tensor([[tokens[-1]]]), pixel_values=image_a, past_key_values=out.past_key_values,
                    use_cache=True)  # pixel_values after prefill are ignored
        tokens.append(int(out.logits[0, -1].argmax()))
    assert first[0, ids.shape[1]:].tolist() == tokens
    sampled = model.generate(ids, pixel_values=image_a, max_new_tokens=4, do_sample=True, top_p=0.9, pad_token_id=0)
    assert sampled.shape[1] <= ids.shape[1] + 4


def test_padded_image_batch_equals_each_sample_alone(clip_dir):
    model = vlm(clip_dir)
    a, b = prompt(1, 2, 3, "img", 4), prompt(5, "img")
    pad = torch.zeros(1, 3, dtype=torch.long)
    ids = torch.cat([a, torch.cat([pad, b], 1)])
    mask = (ids != 0).long()
    pixels = torch.randn(2, 1, 3, 32, 32)
    batch = model(ids, pixel_values=pixels, attention_mask=mask).logits
    torch.testing.assert_close(batch[0], model(a, pixel_values=pixels[:1]).logits[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batch[1, 3:], model(b, pixel_values=pixels[1:]).logits[0], atol=1e-5, rtol=1e-4)


def test_precomputed_image_features_equal_pixels(clip_dir):
    model = vlm(clip_dir)
    ids, pixels = prompt(1, "img", 2), torch.randn(1, 1, 3, 32, 32)
    features = model.vision_tower(pixels[0])  # [1, 16, 32]
    torch.testing.assert_close(model(ids, image_features=features).logits, model(ids, pixel_values=pixels).logits)
    greedy = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(model.generate(ids, image_features=features, **greedy),
                       model.generate(ids, pixel_values=pixels, **greedy))
