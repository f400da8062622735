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
    config = load_config(overrides=["model.kind=sd3", "model.pretrained=p", "train.steps=123", "jumps.self_grids=[2,4]",
                                    "lora.target_modules=[to_q]", "validation.prompts=[a red circle]"])
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


def test_family_defaults_feed_every_config_of_the_family(tmp_path):
    """A hand-written Flux config without the preset gets Flux's dynamic shift and clipping; the file and the
    overrides still win over the family, and the saved config records the resolved values."""
    hand_written = tmp_path / "flux.yaml"
    hand_written.write_text("model:\n  kind: flux\n  pretrained: some/flux\ntrain:\n  steps: 10\n")
    config = load_config(hand_written)
    assert config.jumps.alt_shift == "dynamic" and config.jumps.shift_range == (2.5, 4.5)
    assert config.optim.grad_clip == 10.0 and config.eval.select_shift == "dynamic"
    assert load_config(hand_written, ["optim.grad_clip=3"]).optim.grad_clip == 3.0
    sd3 = load_config(None, ["model.kind=sd3", "model.pretrained=p"])
    assert (sd3.model.guidance_scale, sd3.jumps.alt_shift, sd3.optim.grad_clip) == (3.5, 3.0, 2.0)
    builtin = load_config(None, [])
    assert (builtin.jumps.alt_shift, builtin.optim.grad_clip, builtin.eval.select_shift) == (1.0, 1.0, 1.0)
    save_config(config, tmp_path / "resolved.yaml")
    assert "dynamic" in (tmp_path / "resolved.yaml").read_text()


def test_the_families_read_their_shifts_and_guidance_from_the_same_table():
    pytest.importorskip("diffusers")
    from shortcutfm.family_defaults import FAMILY_DEFAULTS
    from shortcutfm.models.diffusers import get_family

    for kind, defaults in FAMILY_DEFAULTS.items():
        family = get_family(kind)
        assert family.jump_sampling().alt_shift == defaults["jumps"]["alt_shift"]
        assert family.sampling_shift == defaults["eval"]["select_shift"]
        if "guidance_scale" in defaults.get("model", {}):
            assert family.guidance.scale == defaults["model"]["guidance_scale"]


@pytest.mark.parametrize("overrides, field", [
    (["model.kind=flux", "model.pretrained=p", "model.guidance_scale=3.5"], "model.guidance_scale"),
    (["model.kind=sd3", "model.pretrained=p", "model.width=128"], "model.width"),
    (["model.kind=sd3", "model.pretrained=p", "train.teacher=runs/t"], "train.teacher"),
    (["model.kind=sd3", "model.pretrained=p", "data.holdout_fraction=0.5"], "data.holdout_fraction"),
    (["model.kind=sd3", "model.pretrained=p", "model.label_dropout=0.2"], "model.label_dropout"),
    (["model.kind=sd3", "model.pretrained=p", "train.mode=pretrain", "lora.rank=8"], "lora.rank"),
    (["lora.rank=8"], "lora.rank"),
    (["model.pretrained=black-forest-labs/FLUX.1-dev"], "model.pretrained"),
    (["validation.prompts=[a cat]"], "validation.prompts"),
    (["model.kind=mlp", "model.channels=32"], "model.channels"),
    (["eval.select_shift=dynamic"], "eval.select_shift"),
    (["train.mode=pretrain", "train.teacher=runs/t"], "train.teacher"),
])
def test_fields_without_effect_are_refused_by_name(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


def test_fields_with_effect_pass_the_cross_section_check():
    load_config(None, ["model.kind=sd3", "model.pretrained=p", "train.mode=pretrain", "model.label_dropout=0.2"])
    load_config(None, ["model.kind=convnet", "model.channels=32"])
    load_config(None, ["model.kind=flux", "model.pretrained=p", "lora.rank=8", "validation.prompts=[a cat]"])
