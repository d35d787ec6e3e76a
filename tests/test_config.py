import pytest

from minimind_v import PRESETS, MiniMindVConfig, VLLMconfig, get_model_configs


def test_derived_fields_computed_once():
    config = MiniMindVConfig(hidden_size=512, num_attention_heads=8)
    assert config.head_dim == 64
    assert config.intermediate_size == 1408  # 8/3 * 512 rounded up to a multiple of 64
    assert config.num_key_value_heads == 8
    assert config.image_token_len == 196 and config.image_token_id == 34


def test_explicit_values_win_over_derivation():
    config = MiniMindVConfig(hidden_size=128, num_attention_heads=8, head_dim=32, intermediate_size=448,
                             image_ids=[12], image_token_len=64)
    assert (config.head_dim, config.intermediate_size, config.image_token_len) == (32, 448, 64)


@pytest.mark.parametrize("bad, match", [
    (dict(hiden_size=64), "did you mean 'hidden_size'"),
    (dict(num_experts_per_tok=2), "num_experts_per_token"),
    (dict(hidden_size="big"), "'hidden_size' must be int"),
    (dict(use_moe=1), "'use_moe' must be bool"),
    (dict(hidden_size=384, num_attention_heads=6, num_key_value_heads=4), "multiple of num_key_value_heads"),
    (dict(hidden_size=100, num_attention_heads=8), "not divisible"),
    (dict(projector_type="qformer"), "projector_type"),
    (dict(image_ids=[1, 2]), "one placeholder token id"),
    (dict(use_moe=True, n_routed_experts=2, num_experts_per_token=3), "num_experts_per_token"),
])
def test_bad_config_is_a_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        MiniMindVConfig(**bad)


def test_seed_alias_and_presets():
    assert VLLMconfig is MiniMindVConfig
    configs = get_model_configs()
    assert sorted(configs) == ["large_moe", "medium", "small", "tiny"]
    assert configs["tiny"].hidden_size == 256 and configs["medium"].num_key_value_heads == 8
    assert configs["large_moe"].use_moe and configs["large_moe"].n_routed_experts == 16
    v2 = MiniMindVConfig.from_name("minimind2-v")
    assert (v2.hidden_size, v2.num_hidden_layers, v2.image_token_len, v2.projector_type) == (512, 8, 196, "linear")
    assert MiniMindVConfig.from_name("minimind2-v-104m").hidden_size == 768
    v3 = MiniMindVConfig.from_name("minimind-3v", num_hidden_layers=2)
    assert (v3.num_hidden_layers, v3.image_token_len, v3.qk_norm, v3.projector_type) == (2, 64, True, "mlp")
    assert MiniMindVConfig.from_name("minimind-3v-moe").use_moe
    with pytest.raises(ValueError, match="unknown preset"):
        MiniMindVConfig.from_name("gpt5")
    assert {"tiny", "small", "medium", "large_moe", "minimind2-v", "minimind2-v-104m", "minimind-3v",
            "minimind-3v-moe"} <= set(PRESETS)


def test_save_and_reload_round_trip(tmp_path):
    config = MiniMindVConfig.from_name("minimind-3v-moe", num_hidden_layers=2, vision_tower_path="/x/siglip")
    config.save_pretrained(tmp_path)
    again = MiniMindVConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()


def test_unknown_key_in_a_saved_config_is_an_error(tmp_path):
    import json

    MiniMindVConfig().save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["hidden_sizee"] = 3
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="hidden_sizee"):
        MiniMindVConfig.from_pretrained(tmp_path)
