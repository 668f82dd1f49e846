"""TheWorldConfig: round trip through our config.json, upstream config.json, validation errors."""

import json

import pytest
from transformers import Gemma3Config as HFGemma3Config

from theworld_jax.config import (ConfigError, Gemma3Config, ProjectionMode, TheWorldConfig, VaeInputRange,
                                 WanVAEConfig)


def test_round_trip_through_json(tmp_path):
    config = TheWorldConfig(gemma_model_name="/models/gemma", cosmos_model_name="/models/vae",
                            world_projection_mode="channel", projection_architecture="linear",
                            freeze_gemma_language=False, world_attention="bidirectional",
                            vae_image_size=(256, 384), sow_token_id=262145, eow_token_id=262146)
    raw = json.loads(json.dumps(config.to_dict()))
    assert raw["model_type"] == "theworld_jax"
    assert TheWorldConfig.from_dict(raw) == config
    config.to_json_file(str(tmp_path / "config.json"))
    assert TheWorldConfig.from_json_file(str(tmp_path)) == config


def test_defaults_follow_design():
    config = TheWorldConfig()
    assert (config.world_projection_mode, config.projection_architecture, config.world_attention,
            config.vae_input_range, config.vae_image_size) == ("spatial", "mlp", "causal", "minus_one_one",
                                                               (512, 512))
    assert config.enable_world and config.freeze_gemma_vision and config.freeze_gemma_language
    assert config.freeze_cosmos_vae and config.sow_token_id is None and config.eow_token_id is None


def upstream_raw(**theworld_fields):
    """What upstream's TheWorldConfig(Gemma3Config).save_pretrained writes."""
    raw = HFGemma3Config().to_dict()
    raw.update(model_type="the_world", architectures=["TheWorld"], **theworld_fields)
    return raw


def test_from_upstream_dict_reads_its_fields_and_sets_zero_255(tmp_path):
    raw = upstream_raw(gemma_model_name="google/gemma-3-4b-it", cosmos_model_name="nvidia/cosmos",
                       enable_world=True, world_projection_mode="channel",
                       projection_architecture="mlp_no_final_gelu", freeze_gemma_vision=False,
                       freeze_gemma_language=True, freeze_cosmos_vae=True)
    config = TheWorldConfig.from_upstream_dict(raw)
    assert config.vae_input_range == "zero_255"
    assert (config.cosmos_model_name, config.world_projection_mode, config.projection_architecture,
            config.freeze_gemma_vision) == ("nvidia/cosmos", "channel", "mlp_no_final_gelu", False)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert TheWorldConfig.from_json_file(str(tmp_path / "config.json")) == config


def test_older_upstream_config_gets_defaults():
    config = TheWorldConfig.from_upstream_dict(upstream_raw(cosmos_model_name="nvidia/cosmos",
                                                            enable_world=False))
    assert not config.enable_world
    assert (config.world_projection_mode, config.projection_architecture) == ("spatial", "mlp")


def test_model_type_mixups_are_errors():
    with pytest.raises(ConfigError, match="from_upstream_dict"):
        TheWorldConfig.from_dict(upstream_raw())
    with pytest.raises(ConfigError, match="expected 'the_world'"):
        TheWorldConfig.from_upstream_dict(TheWorldConfig().to_dict())
    with pytest.raises(ConfigError, match="model_type is 'gemma3'"):
        TheWorldConfig.from_dict({"model_type": "gemma3"})


def test_unknown_field_is_named():
    raw = TheWorldConfig().to_dict()
    raw["world_projection_modes"] = "spatial"
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['world_projection_modes'\]"):
        TheWorldConfig.from_dict(raw)


@pytest.mark.parametrize("field,value,message", [
    ("world_projection_mode", "pixel", r"world_projection_mode='pixel' is not supported; expected one of"),
    ("projection_architecture", "mlp3", r"projection_architecture='mlp3' is not supported"),
    ("world_attention", "full", r"world_attention='full'"),
    ("vae_input_range", "zero_one", r"vae_input_range='zero_one'"),
    ("vae_image_size", (512,), "vae_image_size must be"),
    ("vae_image_size", (512, 0), "vae_image_size must be"),
    ("enable_world", "yes", "enable_world must be true or false"),
    ("sow_token_id", 5, "must be set together"),
])
def test_bad_values_are_rejected(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TheWorldConfig(**{field: value})


def test_upstream_bad_mode_is_rejected():
    with pytest.raises(ConfigError, match="world_projection_mode='pixel'"):
        TheWorldConfig.from_upstream_dict(upstream_raw(world_projection_mode="pixel"))


def test_same_sow_and_eow_is_rejected():
    with pytest.raises(ConfigError, match="must differ"):
        TheWorldConfig(sow_token_id=7, eow_token_id=7)



@pytest.mark.parametrize("config_class", [TheWorldConfig, Gemma3Config, WanVAEConfig])
def test_broken_config_json_is_one_line_naming_the_file(tmp_path, config_class):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "theworld_jax",\n "enable_world": tru}')
    with pytest.raises(ConfigError) as err:
        config_class.from_json_file(str(tmp_path))
    assert str(err.value) == f"{path}: not valid JSON: Expecting value (line 2, column 18)"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=rf"^{path}: expected a JSON object"):
        config_class.from_json_file(str(path))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        config_class.from_json_file(str(tmp_path / "missing.json"))


def test_bad_field_error_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "theworld_jax", "world_attention": "full"}))
    with pytest.raises(ConfigError) as err:
        TheWorldConfig.from_json_file(str(path))
    assert str(err.value) == f"{path}: world_attention='full' is not supported; expected one of " \
                             "['causal', 'bidirectional']"


def test_modes_are_enums_equal_to_their_strings():
    config = TheWorldConfig(world_projection_mode="channel", vae_input_range="zero_255")
    assert config.world_projection_mode is ProjectionMode.CHANNEL and config.world_projection_mode == "channel"
    assert config.vae_input_range is VaeInputRange.ZERO_255
    assert json.loads(json.dumps(config.to_dict()))["world_projection_mode"] == "channel"
