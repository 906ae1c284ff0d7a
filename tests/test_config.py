from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dinoscale.config import CONFIG_DIR, ConfigError, load_config, save_config


@pytest.mark.parametrize("path", sorted(str(p) for p in CONFIG_DIR.rglob("*.yaml")))
def test_every_shipped_config_is_valid(path):
    cfg = load_config(path, ["train.output_dir=/tmp/x", "train.max_steps=7"])
    assert cfg.train.output_dir == "/tmp/x" and cfg.train.max_steps == 7


def test_named_config_and_overrides_win():
    cfg = load_config("quickstart", ["optim.base_lr=0.5", "model.depth=2"])
    assert cfg.model.patch_size == 7 and cfg.model.img_size == 28  # from quickstart.yaml
    assert cfg.optim.base_lr == 0.5 and cfg.model.depth == 2  # overrides last


def test_unknown_key_names_key_and_nearest():
    with pytest.raises(ConfigError, match=r"'train\.max_step'.*did you mean 'train\.max_steps'"):
        load_config(None, ["train.max_step=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*'train'"):
        load_config(None, ["trian.seed=1"])


def test_unknown_key_in_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  base_rl: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.base_rl.*optim\.base_lr"):
        load_config(bad)


@pytest.mark.parametrize(
    "override, expected",
    [("optim.base_lr=abc", "expects a float"), ("optim.epochs=1.5", "expects a int"),
     ("train.resume=maybe", "expects a bool"), ("crops.global_crops_scale=0.3", "expects a list"),
     ("model=3", "expects a mapping")],
)
def test_wrong_types_rejected(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


def test_int_for_float_is_accepted_and_null_allowed():
    cfg = load_config(None, ["optim.base_lr=1", "train.max_steps=null"])
    assert cfg.optim.base_lr == 1 and cfg.train.max_steps is None


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.max_steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("quickstart")
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


def test_struct_mode_catches_typos_in_code():
    cfg = load_config(None)
    with pytest.raises(Exception):
        _ = cfg.train.max_stepz


@pytest.mark.parametrize("override, expected", [
    ("train.max_steps=abc", "train.max_steps' expects a int or null"),
    ("evaluation.knn_max_train_samples=None", "expects a int or null, got str .'None'.; write null for no value"),
    ("model.pretrained_weights=3", "model.pretrained_weights' expects a str or null"),
])
def test_options_with_null_defaults_are_typed(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config("quickstart", [override])
    assert load_config("quickstart", ["train.max_steps=7"]).train.max_steps == 7
    assert load_config("quickstart", ["train.autocast=none"]).train.autocast == "none"  # a real string option


def test_every_null_default_has_a_declared_type():
    from omegaconf import OmegaConf

    from dinoscale.config import CONFIG_DIR, NULLABLE_TYPES

    def null_keys(node, prefix=""):
        for key, value in node.items():
            if OmegaConf.is_dict(value):
                yield from null_keys(value, f"{prefix}{key}.")
            elif value is None:
                yield f"{prefix}{key}"

    assert set(null_keys(OmegaConf.load(CONFIG_DIR / "default.yaml"))) == set(NULLABLE_TYPES)


def test_activation_checkpointing_takes_a_mode_or_the_earlier_boolean():
    assert load_config(None).compute.activation_checkpointing == "none"
    for value, expected in (("selective", "selective"), ("full", "full"), ("true", True), ("false", False)):
        assert load_config(None, [f"compute.activation_checkpointing={value}"]).compute.activation_checkpointing \
            == expected
    with pytest.raises(ConfigError, match="compute.activation_checkpointing"):
        load_config(None, ["compute.activation_checkpointing=[1]"])


def test_async_checkpoint_is_a_bool_and_on_by_default():
    assert load_config(None).train.async_checkpoint is True
    assert load_config(None, ["train.async_checkpoint=false"]).train.async_checkpoint is False
    with pytest.raises(ConfigError, match="train.async_checkpoint"):
        load_config(None, ["train.async_checkpoint=later"])
