"""The Python API: ``dinoscale.pretrain`` (a training run in the calling process) and ``dinoscale.embed`` (CLS
features of images).

Both are thin: ``pretrain`` loads the config as the command line does (``dinoscale.config.load_config``) and runs
``dinoscale.train.loop.train`` inside the process set-up the command line uses
(``dinoscale.train.cli.training_process``); ``embed`` resolves a backbone with
``dinoscale.eval.backbones.load_backbone`` and runs ``dinoscale.eval.extract.extract_features`` with the evaluation
transform. Errors are exceptions (``ConfigError``, ``ValueError``, ...), never an exit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from dinoscale import hub
from dinoscale.config import ConfigError, load_config
from dinoscale.data.open import open_dataset
from dinoscale.data.transforms.decode import load_rgb
from dinoscale.device import resolve_device
from dinoscale.eval.backbones import load_backbone
from dinoscale.eval.extract import extract_features
from dinoscale.eval.transforms import eval_transform
from dinoscale.train.cli import training_process
from dinoscale.train.loop import train

__all__ = ["PretrainResult", "embed", "pretrain"]

# embed's crop side when neither the call nor a run's config gives one: DINO/DINOv2's evaluation size
DEFAULT_IMAGE_SIZE = 224


# ---------------------------------------------------------------------------------------------------- pretrain
@dataclass(frozen=True)
class PretrainResult:
    """What :func:`pretrain` returns."""

    status: str  # "finished", or "preempted": stopped by a signal (SIGTERM, SIGUSR1/2) after a checkpoint
    step: int  # optimizer steps done, this call and the runs it resumed together
    output_dir: Path  # train.output_dir
    knn: dict[str, float] | None  # {"teacher": top-1 %, "random_init": top-1 %} of the final kNN; None if not run
    metrics_path: Path  # output_dir / "metrics.jsonl": every logged step and event
    backbone_path: Path | None  # the exported backbone (DINOv2 layout, .safetensors; the teacher's, or the
    # student's for a method without a teacher); None unless finished


def _yaml_value(key: str, value: Any) -> str:
    """``value`` as the YAML text of a ``key=value`` override (JSON is YAML: strings stay strings)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config value of '{key}' must be a string, number, bool, None or a list of them, "
                          f"got {value!r}") from exc


def _dotlist(values: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``{"train": {"max_steps": 20}, "optim.base_lr": 1e-3}`` -> ``["train.max_steps=20", "optim.base_lr=0.001"]``."""
    items = []
    for key, value in values.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"config keys must be non-empty strings, got {key!r}")
        if isinstance(value, Mapping):
            items += _dotlist(value, f"{prefix}{key}.")
        else:
            items.append(f"{prefix}{key}={_yaml_value(prefix + key, value)}")
    return items


def resolve_config(config: str | os.PathLike | Mapping | DictConfig | None = None,
                   overrides: Mapping[str, Any] | None = None) -> DictConfig:
    """The validated config :func:`pretrain` runs: ``configs/default.yaml`` <- ``config`` <- ``overrides``.

    ``config``: a YAML path, a config name under ``configs/`` (``"quickstart"``), a mapping / OmegaConf config
    (nested, or with dotted keys; an OmegaConf config's interpolations are resolved within it) or None (the
    defaults). ``overrides``: ``{"train.max_steps": 20}``, values as
    Python values. Unknown keys and wrong types raise :class:`~dinoscale.config.ConfigError`, as on the command line.
    """
    if overrides is not None and not isinstance(overrides, Mapping):
        raise TypeError("overrides must be a mapping such as {'train.max_steps': 20}, "
                        f"got {type(overrides).__name__}")
    path, layers = None, []
    if isinstance(config, DictConfig):
        try:
            layers = _dotlist(OmegaConf.to_container(config, resolve=True))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"cannot resolve the config's interpolations: {exc}") from exc
    elif isinstance(config, Mapping):
        layers = _dotlist(config)
    elif isinstance(config, (str, os.PathLike)):
        path = config
    elif config is not None:
        raise TypeError(f"config must be a path, a config name, a mapping or None, got {type(config).__name__}")
    return load_config(path, layers + _dotlist(overrides or {}))


def pretrain(config: str | os.PathLike | Mapping | DictConfig | None = None, *,
             overrides: Mapping[str, Any] | None = None) -> PretrainResult:
    """Train in this process, as ``tools/train.py --config CONFIG key=value ...`` does, and return the result.

    ``dinoscale.pretrain("quickstart", overrides={"train.max_steps": 20, "train.output_dir": "runs/a"})``.
    ``config`` and ``overrides`` as in :func:`resolve_config`. Calling it again with the same output directory
    resumes from its latest checkpoint (``{"train.resume": False}`` starts over). Under ``torchrun`` every process
    calls it and they train together (the process group is made from torchrun's variables, and destroyed at the
    end unless it existed before). SIGTERM/SIGUSR1/SIGUSR2 make the run checkpoint and return ``"preempted"``;
    the previous signal handlers are restored on return. Log lines go to the ``dinoscale`` logger (configure
    ``logging`` to see INFO ones); the progress lines go to stdout.
    """
    cfg = resolve_config(config, overrides)
    with training_process() as stop:
        result = train(cfg, stop_requested=stop)
    output_dir = Path(result.output_dir)
    backbone = None
    if result.status == "finished":
        exported = [output_dir / "export" / f"{name}_backbone.safetensors" for name in ("teacher", "student")]
        backbone = next((path for path in exported if path.is_file()), None)
    return PretrainResult(status=result.status, step=result.step, output_dir=output_dir,
                          knn=dict(result.knn) or None, metrics_path=output_dir / "metrics.jsonl",
                          backbone_path=backbone)


# ---------------------------------------------------------------------------------------------------- embed
class _ImageList(Dataset):
    """A list of images (PIL, ``(C, H, W)`` tensors or arrays) or image file paths, as a dataset."""

    def __init__(self, items: Sequence[Any]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        item = self.items[index]
        return load_rgb(item) if isinstance(item, (str, os.PathLike)) else item


def _run_config_for(path: Path) -> Path | None:
    """The ``config.yaml`` of the training run that holds ``path`` (a run dir, its export or a checkpoint)."""
    for folder in (path, *list(path.parents)[:3]):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def _backbone(model: nn.Module | str | os.PathLike, weights: str | os.PathLike | None) -> tuple[nn.Module, int]:
    """The backbone ``embed`` runs, and the image size its training run evaluated at (else the default)."""
    if isinstance(model, nn.Module):
        if weights is not None:
            raise ValueError("weights= goes with a hub name; load them into the module yourself "
                             "(dinoscale.hub.load_state_dict_any)")
        return model, DEFAULT_IMAGE_SIZE
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be an nn.Module, a hub name, a run directory or a weights path, "
                        f"got {type(model).__name__}")
    name = os.fspath(model)
    if name in hub.MODELS and not Path(name).exists():
        return load_backbone(name, "official" if weights is None else os.fspath(weights)), DEFAULT_IMAGE_SIZE
    if weights is not None:
        raise ValueError(f"weights= goes with a hub name ({', '.join(hub.MODELS)}), not with {name!r}")
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(f"{name!r} is neither a hub name ({', '.join(hub.MODELS)}) nor an existing run "
                                "directory or weights path")
    config = _run_config_for(path)
    if config is None:
        raise ValueError(f"{path} is not inside a training run (no config.yaml beside it), so its architecture is "
                         "unknown: build the module (dinoscale.hub.load(NAME, weights=PATH) or "
                         "dinoscale.eval.backbones.load_backbone) and pass it, or pass a hub name with weights=PATH")
    image_size = load_config(config).evaluation.knn_image_size
    if path.is_dir() and (path / "config.yaml").is_file():
        return load_backbone(weights=str(path)), image_size  # the run's export, else its newest checkpoint
    return load_backbone(config=str(config), weights=str(path)), image_size


def _images(data: Any, transform: Callable) -> tuple[Dataset, Callable | None]:
    """``data`` as a dataset (see :func:`embed`), and the transform the extraction applies to its images (None
    when the dataset applies it itself)."""
    if isinstance(data, torch.Tensor):
        if data.ndim != 4:
            raise ValueError(f"a tensor batch must have shape [N, C, H, W], got {tuple(data.shape)}")
        return _ImageList(list(data)), transform
    if isinstance(data, (str, os.PathLike)):
        if Path(data).is_file():
            raise ValueError(f"{os.fspath(data)} is one image file: pass a list, [path]")
        return open_dataset(os.fspath(data), transform=transform), None
    if isinstance(data, Image.Image):
        raise ValueError("data is one PIL image: pass a list, [image]")
    if isinstance(data, Dataset):
        return data, transform
    if isinstance(data, Sequence):
        if len(data) == 0:
            raise ValueError("data is an empty list: nothing to embed")
        return _ImageList(data), transform
    raise TypeError("data must be a [N, C, H, W] tensor, a list of PIL images / image paths, a folder of images, "
                    f"a dataset spec or a torch Dataset, got {type(data).__name__}")


def embed(model: nn.Module | str | os.PathLike, data: Any, *, weights: str | os.PathLike | None = None,
          batch_size: int = 64, image_size: int | None = None, device: str | torch.device | None = None,
          autocast_dtype: Any = None, num_workers: int = 0, progress: bool = False) -> torch.Tensor:
    """CLS features of images: a float32 CPU tensor [N, D], one row per image, in input order.

    The features are the backbone's normalised CLS token (``x_norm_clstoken``; ``model(x)`` for a module without
    ``forward_features``), computed on the evaluation transform of each image: the shorter side resized to
    ``image_size * 256 / 224``, the central ``image_size`` square (rounded to the patch size), ImageNet
    normalisation.

    Args:
        model: the backbone: an ``nn.Module``; a hub name (``"dinov2_vits14"``: its released weights, or
            ``weights=PATH``); a training run directory (its exported teacher, else its newest checkpoint); or a
            weights file / checkpoint inside a run directory (the run's config gives the architecture).
        data: a ``[N, C, H, W]`` tensor of images (uint8, or float in [0, 1]: not normalised); a list of PIL
            images, image tensors or image paths; a folder of images (recursive, sorted paths: the order of
            ``ImageFolderDataset(folder).samples``) or any other ``train.dataset`` form (``"fashion-mnist:test"``,
            shards); a torch Dataset of such images (alone or as ``(image, label)``).
        weights: with a hub name: a path, URL or ``"official"`` (the default).
        image_size: the crop side; None: the ``evaluation.knn_image_size`` of the model's training run, else 224.
        device: where to run; None: a module's own device, else CUDA when there is one.
        autocast_dtype: None: bf16 where the hardware has fast bf16 matmuls (as the evaluation tools do); ``"fp32"``
            for full precision.
        batch_size, num_workers, progress: of the extraction loop.

    An image that cannot be read raises (the rows would no longer match the inputs).
    Under ``torchrun``, every process embeds a slice and every process returns all the rows.
    """
    backbone, run_image_size = _backbone(model, weights)
    patch_size = getattr(backbone, "patch_size", 1)
    transform = eval_transform(image_size or run_image_size, patch_size if isinstance(patch_size, int) else 1)
    dataset, transform = _images(data, transform)
    if device is None and not isinstance(model, nn.Module):
        device = "auto"
    out = extract_features(backbone, dataset, batch_size=batch_size, num_workers=num_workers,
                           device=None if device is None else resolve_device(str(device)),
                           autocast_dtype=autocast_dtype, transform=transform, progress=progress)
    if out["num_skipped"]:
        first = "; ".join(f"#{index}: {error}" for index, error in out["skipped"][:3])
        raise ValueError(f"{out['num_skipped']} of the images could not be read ({first})")
    return out["cls"]
