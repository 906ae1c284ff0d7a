"""Named DINOv2 backbones and a loader for released or trained weights in any common layout.

``load_state_dict_any(model, obj_or_path)`` reads a checkpoint (file, directory, URL or in-memory dict),
finds the backbone inside it, converts it to the official DINOv2 layout (the layout of
:class:`~dinoscale.models.vit.DinoVisionTransformer`) and loads it strictly. Understood inputs:

* the official DINOv2 ``.pth`` (also with the training code's chunked ``blocks.<chunk>.<i>.`` names);
* a timm ``vit_*_dinov2`` state dict (``reg_token``, patch-only ``pos_embed``, packed SwiGLU ``fc1/fc2``,
  optionally split ``q/k/v`` projections);
* a Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (``.safetensors``, ``.bin`` or a
  ``save_pretrained`` directory, sharded or not);
* a dinoscale (or DINOv2) training checkpoint: wrapper keys ``model``/``teacher``/``state_dict``, prefixes
  such as ``module.``, ``_orig_mod.``, ``backbone.``, ``teacher.backbone.`` (the teacher is preferred when a
  student is present too), or a ``torch.distributed.checkpoint`` directory (read without a process group).

The layout is detected from the keys. Every converter is a pure function from a state dict to the official
layout; keys it does not know are passed through, so they show up as "unexpected" in the error.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch

from dinoscale.models.factory import build_backbone
from dinoscale.parallel import strip_wrapper_prefixes
from dinoscale.models.vit import DinoVisionTransformer, resample_pos_embed

logger = logging.getLogger(__name__)

DINOV2_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"

# Keys that mark the root of a backbone in the official/timm and in the Hugging Face layouts.
_BACKBONE_MARKERS = ("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight")
_MAX_LISTED = 12


class WeightsLoadError(ValueError):
    """Weights could not be read, or do not match the model (detected layout and mismatches in the message)."""


# --------------------------------------------------------------------------------------------- reading


def _looks_like_safetensors(path: Path) -> bool:
    # A safetensors file starts with a little-endian u64 header length followed by a JSON object.
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 0


def _zip_problem(path: Path) -> str | None:
    """Why a torch.save (zip) file cannot be opened, if the zip structure itself is broken."""
    import zipfile

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        return f"the zip archive is truncated or corrupt (no central directory; {path.stat().st_size} bytes)"
    if magic == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            return f"the zip archive is corrupt ({e})"
        if bad is not None:
            return f"the zip archive is corrupt (bad CRC in member {bad})"
    return None


def _torch_load(path: Path, weights_only: bool):
    import pickle

    problem = _zip_problem(path)
    if problem is not None:
        raise WeightsLoadError(f"could not read checkpoint file {path}: {problem}")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as e:
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"
        if not is_zip:  # not torch.save's format: a legacy pickle or garbage; the weights_only hint would mislead
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            reason = f"not a torch.save zip archive nor a safetensors file, and unpickling failed ({first_line})"
        else:
            reason = str(e) + (" (if you trust this file, pass weights_only=False)" if weights_only else "")
        raise WeightsLoadError(f"could not read checkpoint file {path} ({path.stat().st_size} bytes): {reason}") from e


def _read_file(path: Path, weights_only: bool):
    try:
        if path.suffix == ".safetensors" or _looks_like_safetensors(path):
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return _torch_load(path, weights_only)
    except WeightsLoadError:
        raise
    except Exception as e:  # truncated pickle, bad header, ... -- name the file and the reason
        size = path.stat().st_size
        raise WeightsLoadError(
            f"could not read checkpoint file {path} ({size} bytes): {type(e).__name__}: {e}"
        ) from e


def _read_dcp(path: Path, weights_only: bool) -> dict:
    """Read a torch.distributed.checkpoint directory in this process (no process group needed)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "consolidated.pth"
        try:
            dcp_to_torch_save(str(path), str(target))
        except Exception as e:
            raise WeightsLoadError(
                f"could not read distributed checkpoint {path}: {type(e).__name__}: {e}"
            ) from e
        return _read_file(target, weights_only)


def _read_hf_directory(path: Path, weights_only: bool) -> dict | None:
    """State dict of a ``save_pretrained`` directory (single file or sharded with an index), else None."""
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return _read_file(path / single, weights_only)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            try:
                weight_map = json.loads((path / index).read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise WeightsLoadError(f"could not read shard index {path / index}: {e}") from e
            state_dict = {}
            for shard in sorted(set(weight_map.values())):
                state_dict.update(_read_file(path / shard, weights_only))
            return state_dict
    return None


def _read_url(url: str, weights_only: bool):
    if urlparse(url).path.endswith(".safetensors"):
        # load_state_dict_from_url only unpickles; download into the same torch hub cache and read here.
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        if not cached.is_file():
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(cached), progress=True)
        return _read_file(cached, weights_only)
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=weights_only)
    except Exception as e:
        raise WeightsLoadError(f"could not load weights from {url}: {type(e).__name__}: {e}") from e


def read_checkpoint(path_or_url: str | os.PathLike, weights_only: bool = True):
    """Read a checkpoint file, directory (HF ``save_pretrained`` or torch.distributed.checkpoint) or URL."""
    source = str(path_or_url)
    if source.startswith(("http://", "https://")):
        return _read_url(source, weights_only)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        if (path / ".metadata").is_file():
            return _read_dcp(path, weights_only)
        state_dict = _read_hf_directory(path, weights_only)
        if state_dict is None:
            listing = sorted(p.name for p in path.iterdir())[:_MAX_LISTED]
            raise WeightsLoadError(
                f"directory {path} is neither a torch.distributed.checkpoint (no .metadata) nor a "
                f"save_pretrained directory (no model.safetensors / pytorch_model.bin); it contains {listing}"
            )
        return state_dict
    return _read_file(path, weights_only)


# --------------------------------------------------------------------------------------------- unwrapping


def flatten_state_dict(obj: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested dicts -> one flat dict with '.'-joined keys; only tensor values are kept."""
    flat = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_state_dict(value, name + "."))
        elif isinstance(value, torch.Tensor):
            if hasattr(value, "full_tensor"):  # a DTensor handed over in memory: gather it
                value = value.full_tensor()
            flat[name] = value
    return flat


def strip_wrapper_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ``module.``, ``_orig_mod.`` and FSDP/checkpoint-wrapper components anywhere in the keys."""
    out = {}
    for key, value in state_dict.items():
        new_key = strip_wrapper_prefixes(key)
        if new_key in out:
            raise WeightsLoadError(f"keys collide after removing wrapper prefixes: {new_key!r}")
        out[new_key] = value
    return out


def select_backbone(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Find the backbone inside a (training) checkpoint and strip its prefix.

    The backbone root is where a patch-embedding key (``patch_embed.proj.weight`` or the Hugging Face
    ``embeddings.patch_embeddings.projection.weight``) sits; e.g. ``teacher.backbone.``. With several
    roots (student and teacher), the one under ``teacher`` wins. Returns ``(sub_state_dict, prefix)``.
    """
    prefixes = set()
    for key in state_dict:
        for marker in _BACKBONE_MARKERS:
            if key == marker or key.endswith("." + marker):
                prefixes.add(key[: len(key) - len(marker)])
    if not prefixes:
        return dict(state_dict), ""  # nothing recognisable: let the layout check report the keys
    if len(prefixes) > 1:
        teacher = {p for p in prefixes if "teacher" in p.split(".")}
        if len(teacher) == 1:
            prefixes = teacher
        else:
            raise WeightsLoadError(f"checkpoint holds several backbones {sorted(prefixes)}; cannot tell which to load")
    (prefix,) = prefixes
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}, prefix


# --------------------------------------------------------------------------------------------- layouts


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


_TIMM_SPLIT_QKV = re.compile(r"(blocks\.\d+\.attn)\.(q|k|v)(?:_proj)?\.(weight|bias)")
_TIMM_QV_BIAS = re.compile(r"(blocks\.\d+\.attn)\.(q|v)_bias")


def _is_packed_swiglu(state_dict: Mapping[str, torch.Tensor], mlp: str) -> bool:
    """timm packs SwiGLU's two input projections into ``fc1`` (twice as wide as ``fc2``'s input)."""
    fc1, fc2 = state_dict.get(f"{mlp}.fc1.weight"), state_dict.get(f"{mlp}.fc2.weight")
    return fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``"huggingface"``, ``"timm"`` or ``"dinov2"`` (the official layout), from key names and shapes."""
    keys = state_dict.keys()
    if any(k.startswith(("embeddings.", "encoder.layer.", "layernorm.")) for k in keys):
        return "huggingface"
    if "reg_token" in keys:
        return "timm"
    pos_embed = state_dict.get("pos_embed")
    if pos_embed is not None and pos_embed.ndim == 3 and _is_square(pos_embed.shape[1]):
        return "timm"  # no class slot: timm's no_embed_class variant
    for key in keys:
        if _TIMM_SPLIT_QKV.fullmatch(key) or _TIMM_QV_BIAS.fullmatch(key):
            return "timm"
        m = re.fullmatch(r"(blocks\.\d+\.mlp)\.fc1\.weight", key)
        if m and _is_packed_swiglu(state_dict, m.group(1)):
            return "timm"
    return "dinov2"


def dinov2_filter_fn(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official layout: flatten the training code's chunked ``blocks.<chunk>.<i>.`` names to ``blocks.<i>.``."""
    # In a chunked model the inner index is already the global block index (chunks are padded with Identity).
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state_dict.items()}


def _fuse_qkv(parts: dict[str, torch.Tensor], where: str) -> torch.Tensor:
    missing = [name for name in ("q", "k", "v") if name not in parts]
    if missing:
        raise WeightsLoadError(f"{where}: found only {sorted(parts)} of the q/k/v projections")
    return torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)


def timm_to_dinov2(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ``vit_*_dinov2`` layout -> official layout.

    timm's register models fold the class position embedding into ``cls_token`` and keep a patch-only
    ``pos_embed``; a zero class slot reproduces the same sum. SwiGLU ``fc1/fc2`` (packed) become ``w12/w3``.
    Split ``q/k/v`` projections are fused into ``qkv``; a classifier ``head`` is dropped (not a backbone part).
    """
    out, qkv = {}, {}
    for key, value in state_dict.items():
        if key == "reg_token":
            out["register_tokens"] = value
        elif key == "pos_embed" and value.ndim == 3 and _is_square(value.shape[1]):
            out[key] = torch.cat([value.new_zeros(1, 1, value.shape[2]), value], dim=1)
        elif key.startswith("head."):
            logger.warning("ignoring classifier weights %s (not part of the backbone)", key)
        elif m := _TIMM_SPLIT_QKV.fullmatch(key):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        elif m := _TIMM_QV_BIAS.fullmatch(key):
            # BEiT/EVA style: no key bias (zeros keep the projection identical).
            qkv.setdefault((m.group(1), "bias"), {})[m.group(2)] = value
            qkv[(m.group(1), "bias")].setdefault("k", torch.zeros_like(value))
        else:
            out[key] = value
    for (prefix, kind), parts in qkv.items():
        out[f"{prefix}.qkv.{kind}"] = _fuse_qkv(parts, f"{prefix}.qkv.{kind}")
    for key in list(out):
        m = re.fullmatch(r"(blocks\.\d+\.mlp)\.fc1\.weight", key)
        if m and _is_packed_swiglu(out, m.group(1)):
            mlp = m.group(1)
            for old, new in (("fc1", "w12"), ("fc2", "w3")):
                for param in ("weight", "bias"):
                    if f"{mlp}.{old}.{param}" in out:
                        out[f"{mlp}.{new}.{param}"] = out.pop(f"{mlp}.{old}.{param}")
    return dinov2_filter_fn(out)


_HF_RENAMES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.mask_token", "mask_token"),
    (r"embeddings\.register_tokens", "register_tokens"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layer\.(\d+)\.(norm1|norm2)\.(weight|bias)", r"blocks.\1.\2.\3"),
    (r"encoder\.layer\.(\d+)\.attention\.(?:output\.dense|o_proj)\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.layer_scale1\.lambda1", r"blocks.\1.ls1.gamma"),
    (r"encoder\.layer\.(\d+)\.layer_scale2\.lambda1", r"blocks.\1.ls2.gamma"),
    (r"encoder\.layer\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"encoder\.layer\.(\d+)\.mlp\.weights_in\.(weight|bias)", r"blocks.\1.mlp.w12.\2"),
    (r"encoder\.layer\.(\d+)\.mlp\.(?:weights_out|down_proj)\.(weight|bias)", r"blocks.\1.mlp.w3.\2"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
]
_HF_QKV = re.compile(
    r"encoder\.layer\.(\d+)\.attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)"
)
_HF_GATE_UP = re.compile(r"encoder\.layer\.(\d+)\.mlp\.(gate|up)_proj\.(weight|bias)")


def hf_to_dinov2(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` layout -> official layout.

    Handles the saved names (``attention.attention.query``, ``mlp.weights_in``) and the in-memory names of
    transformers >= 5 (``attention.q_proj``, ``mlp.gate_proj/up_proj/down_proj``). Separate q/k/v are fused
    into ``qkv``; SwiGLU gate and up projections are packed into ``w12`` as ``[gate; up]``.
    """
    out, qkv, gate_up = {}, {}, {}
    short = {"query": "q", "key": "k", "value": "v"}
    for key, value in state_dict.items():
        if m := _HF_QKV.fullmatch(key):
            name = short.get(m.group(2)) or m.group(3)
            qkv.setdefault((m.group(1), m.group(4)), {})[name] = value
            continue
        if m := _HF_GATE_UP.fullmatch(key):
            gate_up.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        for pattern, replacement in _HF_RENAMES:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, replacement, key)] = value
                break
        else:
            out[key] = value  # unknown: reported as unexpected
    for (layer, kind), parts in qkv.items():
        out[f"blocks.{layer}.attn.qkv.{kind}"] = _fuse_qkv(parts, f"encoder.layer.{layer}.attention {kind}")
    for (layer, kind), parts in gate_up.items():
        if set(parts) != {"gate", "up"}:
            raise WeightsLoadError(f"encoder.layer.{layer}.mlp: found only {sorted(parts)} of gate_proj/up_proj")
        out[f"blocks.{layer}.mlp.w12.{kind}"] = torch.cat([parts["gate"], parts["up"]], dim=0)
    return out


_CONVERTERS = {"dinov2": dinov2_filter_fn, "timm": timm_to_dinov2, "huggingface": hf_to_dinov2}


def convert_to_dinov2(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Detect the layout of a backbone state dict and convert it; returns ``(state_dict, layout)``."""
    layout = detect_layout(state_dict)
    return _CONVERTERS[layout](state_dict), layout


# --------------------------------------------------------------------------------------------- loading


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"({len(items)}): {shown}{more}"


def _fit_to_model(state_dict: dict[str, torch.Tensor], model: DinoVisionTransformer) -> dict[str, torch.Tensor]:
    """Interpolate a position embedding of another grid size; supply the mask token if absent."""
    target = model.state_dict()
    pos_embed = state_dict.get("pos_embed")
    want = target["pos_embed"].shape
    if pos_embed is not None and pos_embed.ndim == 3 and pos_embed.shape != want and pos_embed.shape[2] == want[2]:
        if _is_square(pos_embed.shape[1] - 1) and _is_square(want[1] - 1):
            side = math.isqrt(want[1] - 1)
            # Resample the way the model itself would for an image of its img_size, so the loaded model at
            # img_size reproduces the checkpoint's model at that input size.
            state_dict["pos_embed"] = resample_pos_embed(
                pos_embed,
                (side, side),
                interpolate_offset=model.interpolate_offset,
                interpolate_antialias=model.interpolate_antialias,
            )
    if "mask_token" not in state_dict:
        # Released inference checkpoints may omit it; it only matters for masked-image training.
        state_dict["mask_token"] = target["mask_token"].detach().clone()
    return state_dict


def _describe(model: torch.nn.Module) -> str:
    if isinstance(model, DinoVisionTransformer):
        return (
            f"DinoVisionTransformer(embed_dim={model.embed_dim}, depth={model.n_blocks}, "
            f"num_heads={model.num_heads}, patch_size={model.patch_size}, "
            f"num_register_tokens={model.num_register_tokens})"
        )
    return type(model).__name__


def load_state_dict_any(
    model: torch.nn.Module, obj_or_path: Mapping | str | os.PathLike, *, weights_only: bool = True
) -> str:
    """Load backbone weights of any supported layout into ``model`` strictly; returns the detected layout.

    ``obj_or_path``: a state dict or checkpoint dict, a file (``.pth``/``.pt``/``.bin``/``.safetensors``), a
    directory (``save_pretrained`` or torch.distributed.checkpoint) or an ``http(s)://`` URL.
    ``weights_only`` is passed to ``torch.load``; set it False only for trusted pickles holding other objects.
    Raises :class:`WeightsLoadError` listing missing keys, unexpected keys and shape mismatches; on error the
    model is left untouched.
    """
    if isinstance(obj_or_path, Mapping):
        raw, source = obj_or_path, "the given state dict"
    else:
        raw, source = read_checkpoint(obj_or_path, weights_only=weights_only), str(obj_or_path)
    if not isinstance(raw, Mapping):
        raise WeightsLoadError(f"{source} holds a {type(raw).__name__}, not a state dict")
    flat = strip_wrapper_keys(flatten_state_dict(raw))
    if not flat:
        raise WeightsLoadError(f"{source} contains no tensors")
    backbone, prefix = select_backbone(flat)
    converted, layout = convert_to_dinov2(backbone)
    converted = _fit_to_model(converted, model)

    expected = model.state_dict()
    # Listed in model (resp. checkpoint) order, which reads better than an alphabetical blocks.1, blocks.10, ...
    missing = [k for k in expected if k not in converted]
    unexpected = [k for k in converted if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in converted and converted[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [
            f"cannot load {source} into {_describe(model)}: detected layout {layout!r}"
            + (f" under prefix {prefix!r}" if prefix else "")
        ]
        if missing:
            lines.append(f"  missing keys {_listing(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys {_listing(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches {_listing(mismatched)}")
        raise WeightsLoadError("\n".join(lines))
    model.load_state_dict(converted, strict=True)
    logger.info("loaded %s (layout %s%s)", source, layout, f", prefix {prefix!r}" if prefix else "")
    return layout


# --------------------------------------------------------------------------------------------- named models

_ARCHS = {"s": "vit_small", "b": "vit_base", "l": "vit_large", "g": "vit_giant2"}


def official_weights_url(name: str) -> str:
    """Download URL of the released DINOv2 backbone ``name`` (e.g. ``dinov2_vits14_reg``)."""
    m = re.fullmatch(r"dinov2_vit([sblg])14(_reg)?", name)
    if m is None:
        raise ValueError(f"no released DINOv2 weights named {name!r}")
    base = f"dinov2_vit{m.group(1)}14"
    full = base + ("_reg4" if m.group(2) else "")
    return f"{DINOV2_BASE_URL}/{base}/{full}_pretrain.pth"


def _make_dinov2(name: str, weights: str | os.PathLike | Mapping | None, kwargs: dict) -> DinoVisionTransformer:
    m = re.fullmatch(r"dinov2_vit([sblg])14(_reg)?", name)
    registers = m.group(2) is not None
    params = dict(
        img_size=518,
        patch_size=14,
        init_values=1.0,
        num_register_tokens=4 if registers else 0,
        # The register release resizes position embeddings to the exact grid with antialiasing; the original
        # release uses a scale factor with a +0.1 offset and no antialiasing.
        interpolate_antialias=registers,
        interpolate_offset=0.0 if registers else 0.1,
    )
    params.update(kwargs)
    model = build_backbone(_ARCHS[m.group(1)], **params)
    if weights is not None:
        if isinstance(weights, str) and weights == "official":
            weights = official_weights_url(name)
        load_state_dict_any(model, weights)
    return model


def dinov2_vits14(*, weights=None, **kwargs) -> DinoVisionTransformer:
    """DINOv2 ViT-S/14 (release hyper-parameters). ``weights``: path, URL, state dict, "official" or None."""
    return _make_dinov2("dinov2_vits14", weights, kwargs)


def dinov2_vitb14(*, weights=None, **kwargs) -> DinoVisionTransformer:
    """DINOv2 ViT-B/14 (release hyper-parameters). ``weights``: path, URL, state dict, "official" or None."""
    return _make_dinov2("dinov2_vitb14", weights, kwargs)


def dinov2_vitl14(*, weights=None, **kwargs) -> DinoVisionTransformer:
    """DINOv2 ViT-L/14 (release hyper-parameters). ``weights``: path, URL, state dict, "official" or None."""
    return _make_dinov2("dinov2_vitl14", weights, kwargs)


def dinov2_vitg14(*, weights=None, **kwargs) -> DinoVisionTransformer:
    """DINOv2 ViT-g/14 (SwiGLU; release hyper-parameters). ``weights``: path, URL, state dict, "official" or None."""
    return _make_dinov2("dinov2_vitg14", weights, kwargs)


def dinov2_vits14_reg(*, weights=None, **kwargs) -> DinoVisionTransformer:
    """DINOv2 ViT-S/14 with 4 registers. ``weights``: path, URL, state dict, "official" or None."""
    return _make_dinov2("dinov2_vits14_reg", weights, kwargs)


def dinov2_vitb14_reg(*, weights=None, **kwargs) -> DinoVisionTransformer:
    """DINOv2 ViT-B/14 with 4 registers. ``weights``: path, URL, state dict, "official" or None."""
    return _make_dinov2("dinov2_vitb14_reg", weights, kwargs)


def dinov2_vitl14_reg(*, weights=None, **kwargs) -> DinoVisionTransformer:
    """DINOv2 ViT-L/14 with 4 registers. ``weights``: path, URL, state dict, "official" or None."""
    return _make_dinov2("dinov2_vitl14_reg", weights, kwargs)


def dinov2_vitg14_reg(*, weights=None, **kwargs) -> DinoVisionTransformer:
    """DINOv2 ViT-g/14 with 4 registers. ``weights``: path, URL, state dict, "official" or None."""
    return _make_dinov2("dinov2_vitg14_reg", weights, kwargs)


MODELS = {
    fn.__name__: fn
    for fn in (
        dinov2_vits14,
        dinov2_vitb14,
        dinov2_vitl14,
        dinov2_vitg14,
        dinov2_vits14_reg,
        dinov2_vitb14_reg,
        dinov2_vitl14_reg,
        dinov2_vitg14_reg,
    )
}


def load(name: str, weights=None, **kwargs) -> DinoVisionTransformer:
    """Build the named backbone (see ``MODELS``) and optionally load ``weights`` into it."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {sorted(MODELS)}")
    return MODELS[name](weights=weights, **kwargs)
