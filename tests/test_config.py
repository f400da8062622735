"""Typed config: strict keys and types, YAML files, overrides, round trip through config.yaml."""

import pytest

from shortcutfm.config import Config, ConfigError, load_config, save_config
from shortcutfm.workflows import PRESETS_DIR, resolve_config_path


def test_defaults_follow_method_md():
    config = Config()
    assert config.jumps.teacher_prob == 0.4 and config.jumps.teacher_grid == 32
    assert config.jumps.self_grids == (2, 4, 8, 16) and config.jumps.shift_range == (2.5, 4.5)
    assert config.ema.fast_decay == 0.99 and config.ema.slow_decay == 0.999 and config.jumps.flow_fraction == 0.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("jumps.teacher_prb=0.5", "did you mean jumps.teacher_prob"),
        ("nonsense.x=1", "unknown config key 'nonsense'"),
        ("optim.lr=fast", "optim.lr: expected a number"),
        ("train.steps=1.5", "train.steps: expected an integer"),
        ("model.gradient_checkpointing=maybe", "expected true or false"),
        ("jumps.shift_range=[1]", "jumps.shift_range: expected a list of 2"),
        ("jumps.flow_fraction=1.5", "jumps.flow_fraction must be in [0, 1]"),
        ("optim.schedule=linear", "optim.schedule"),
        ("train.mode=finetune", "train.mode"),
        ("train.steps", "section.field=value"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert message in str(info.value)


def test_yaml_quirks_are_read_as_meant():
    config = load_config(overrides=["optim.lr=2e-5", "train.mixed_precision=no", "jumps.alt_shift=dynamic"])
    assert config.optim.lr == 2e-5 and config.train.mixed_precision == "no" and config.jumps.alt_shift == "dynamic"
    assert load_config(overrides=["model.guidance_scale=null"]).model.guidance_scale is None


def test_round_trip_through_yaml(tmp_path):
    config = load_config(overrides=["train.steps=123", "jumps.self_grids=[2,4]", "lora.target_modules=[to_q]"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
def test_every_preset_loads(preset):
    load_config(resolve_config_path(preset))


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listing)
