"""Configs: OmegaConf YAML merged onto ``configs/default.yaml``, with validation.

``configs/default.yaml`` is the schema: every valid key is there, documented. A user config (and every
``key=value`` override) may only set keys that exist in it, with a value of a compatible type; anything else
is rejected with a message that names the key and the nearest valid one.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


class ConfigError(ValueError):
    """A config file or override is invalid (unknown key, wrong type, unreadable file)."""


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple, ListConfig)):
        return "list"
    if isinstance(value, (dict, DictConfig)):
        return "mapping"
    return type(value).__name__


# The type of each option whose default is null (so that `train.max_steps=abc` is caught like any other).
NULLABLE_TYPES = {
    "model.embed_dim": 1, "model.depth": 1, "model.num_heads": 1, "model.pretrained_weights": "",
    "train.build_shards_from": "", "train.max_steps": 1,
    "evaluation.knn_train_dataset": "", "evaluation.knn_test_dataset": "",
    "evaluation.knn_max_train_samples": 1, "evaluation.knn_max_test_samples": 1,
    "distillation.teacher": "", "distillation.teacher_weights": "",
    "gram.max_updates": 1, "crops.gram_crops_size": 1,
    "beit.tokenizer": "", "beit.tokenizer_input_size": 1, "beit.max_block_patches": 1,
}


# Options that take values of more than one type: their types (besides the default's).
MIXED_TYPES = {
    "compute.activation_checkpointing": ("bool", "str"),  # none | full | selective; true/false: the earlier form
}


def _compatible(default: Any, value: Any) -> bool:
    """Whether ``value`` may replace ``default``; null is accepted anywhere (``NULLABLE_TYPES`` types null defaults;
    a null default not listed there accepts anything)."""
    if default is None or value is None:
        return True
    d, v = _type_name(default), _type_name(value)
    if d == v:
        return True
    # An int where a float is expected is fine (lr=1 means 1.0); the reverse would silently truncate.
    return d == "float" and v == "int"


def _check(schema: DictConfig, user: DictConfig, prefix: str = "") -> None:
    for key in user.keys():
        path = f"{prefix}{key}"
        if key not in schema:
            valid = [str(k) for k in schema.keys()]
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{path}'{hint} (valid keys here: {', '.join(valid)})")
        default, value = schema[key], user[key]
        if isinstance(default, DictConfig) or isinstance(value, DictConfig):
            if isinstance(default, DictConfig) and isinstance(value, DictConfig):
                _check(default, value, prefix=f"{path}.")
                continue
            if value is None or default is None:
                continue
            raise ConfigError(
                f"config key '{path}' expects a {_type_name(default)}, got {_type_name(value)} ({value!r})"
            )
        # a Python-ism where a number or a path is expected: YAML's empty value is null
        hint = "; write null for no value" if value in ("None", "none") else ""
        if default is None:
            default = NULLABLE_TYPES.get(path)
            if default is not None and not _compatible(default, value):
                raise ConfigError(f"config key '{path}' expects a {_type_name(default)} or null, "
                                  f"got {_type_name(value)} ({value!r}){hint}")
            continue
        if not _compatible(default, value) and _type_name(value) not in MIXED_TYPES.get(path, ()):
            raise ConfigError(
                f"config key '{path}' expects a {_type_name(default)} (default {default!r}), "
                f"got {_type_name(value)} ({value!r}){hint}"
            )


def _load_yaml(path: Path) -> DictConfig:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # yaml errors come in many classes; the message is what matters
        raise ConfigError(f"cannot parse config file {path}: {exc}") from exc
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return cfg


def parse_overrides(overrides: Iterable[str]) -> DictConfig:
    """``["train.max_steps=10", "optim.base_lr=1e-3"]`` -> a DictConfig (values parsed as YAML)."""
    items = list(overrides)
    for item in items:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(items)
    except Exception as exc:
        raise ConfigError(f"cannot parse overrides {items}: {exc}") from exc


def load_config(config_path: str | Path | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Default config <- ``config_path`` <- ``overrides``; validated and resolved.

    ``config_path`` may name a file, or a config under ``configs/`` without its ``.yaml`` ending
    (``quickstart``, ``train/vitl14``).
    """
    schema = _load_yaml(DEFAULT_CONFIG)
    layers = []
    if config_path:
        path = Path(config_path)
        if not path.exists() and not path.suffix:
            candidate = CONFIG_DIR / f"{config_path}.yaml"
            path = candidate if candidate.exists() else path
        layers.append(_load_yaml(path))
    layers.append(parse_overrides(overrides))
    for layer in layers:
        _check(schema, layer)
    cfg = OmegaConf.merge(schema, *layers)
    try:
        OmegaConf.resolve(cfg)
    except Exception as exc:
        raise ConfigError(f"cannot resolve config interpolations: {exc}") from exc
    OmegaConf.set_struct(cfg, True)  # later typos in code (cfg.trian) fail loudly too
    return cfg


def save_config(cfg: DictConfig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg))
