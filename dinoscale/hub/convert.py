"""Finding the backbone in a checkpoint and converting it to the official DINOv2 layout.

The official layout is that of :class:`~dinoscale.models.vit.DinoVisionTransformer`. Understood inputs:

* the official DINOv2 ``.pth`` (also with the training code's chunked ``blocks.<chunk>.<i>.`` names);
* a timm ``vit_*_dinov2`` state dict (``reg_token``, patch-only ``pos_embed``, packed SwiGLU ``fc1/fc2``,
  optionally split ``q/k/v`` projections; the plain models have the official names but no ``mask_token``);
* a Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` state dict (saved or in-memory names);
* a dinoscale (or DINOv2) training checkpoint: wrapper keys ``model``/``teacher``/``state_dict``, prefixes
  such as ``module.``, ``_orig_mod.``, ``backbone.``, ``teacher.backbone.`` (the teacher is preferred when a
  student is present too).

The layout is detected from the keys. Every converter is a pure function from a state dict to the official
layout; keys it does not know are passed through, so they show up as "unexpected" when loading.

DINOv3 backbones (``dinoscale.models.vit_dinov3``, whose names are the official DINOv3 ``.pth`` layout) have
their own detection and converters, used when loading into a DINOv3 model: :func:`convert_to_dinov3` reads the
official layout, Hugging Face ``DINOv3ViTModel`` (the Hub files' ``layer.<i>.`` names and the in-memory
``model.layer.<i>.`` names of transformers >= 5) and timm ``vit_*_patch16_dinov3`` (``reg_token``,
``gamma_1/2``, ``q_bias``/``v_bias``, SwiGLU ``fc1_g/fc1_x/fc2``); :func:`dinov3_to_hf` writes the Hugging
Face layout back.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping

import torch

from dinoscale.hub.io import WeightsLoadError
from dinoscale.parallel import strip_wrapper_prefixes

logger = logging.getLogger(__name__)

# Keys that mark the root of a backbone in the official/timm and in the Hugging Face layouts.
_BACKBONE_MARKERS = (
    "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.weight",  # Hugging Face Dinov2Model
    "embeddings.patch_embeddings.weight",  # Hugging Face DINOv3ViTModel
)


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


def is_square(n: int) -> bool:
    """Whether ``n`` position slots form a square patch grid."""
    return n > 0 and math.isqrt(n) ** 2 == n


# DINOv2's training code with block_chunks > 0 names blocks ``blocks.<chunk>.<global index>.``.
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")
_TIMM_SPLIT_QKV = re.compile(r"(blocks\.\d+\.attn)\.(q|k|v)(?:_proj)?\.(weight|bias)")
_TIMM_QV_BIAS = re.compile(r"(blocks\.\d+\.attn)\.(q|v)_bias")


def _is_packed_swiglu(state_dict: Mapping[str, torch.Tensor], mlp: str) -> bool:
    """timm packs SwiGLU's two input projections into ``fc1`` (twice as wide as ``fc2``'s input)."""
    fc1, fc2 = state_dict.get(f"{mlp}.fc1.weight"), state_dict.get(f"{mlp}.fc2.weight")
    return fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``"huggingface"``, ``"timm"`` or ``"dinov2"`` (the official layout), from key names and shapes.

    The official names without ``mask_token`` (and without the training code's chunked block names) are timm's:
    the layout also decides the position-embedding interpolation (``dinoscale.hub.loading``).
    """
    keys = state_dict.keys()
    if any(k.startswith(("embeddings.", "encoder.layer.", "layernorm.")) for k in keys):
        return "huggingface"
    if "reg_token" in keys:
        return "timm"
    pos_embed = state_dict.get("pos_embed")
    if pos_embed is not None and pos_embed.ndim == 3 and is_square(pos_embed.shape[1]):
        return "timm"  # no class slot: timm's no_embed_class variant
    for key in keys:
        if _TIMM_SPLIT_QKV.fullmatch(key) or _TIMM_QV_BIAS.fullmatch(key):
            return "timm"
        m = re.fullmatch(r"(blocks\.\d+\.mlp)\.fc1\.weight", key)
        if m and _is_packed_swiglu(state_dict, m.group(1)):
            return "timm"
    if pos_embed is not None and "mask_token" not in keys and not any(_CHUNKED_BLOCK.match(k) for k in keys):
        # The official names without a mask token: timm's vit_*_dinov2 (timm's ViT has no masked-image
        # training). The official release, DINOv2's training checkpoints and dinoscale's all hold the mask token.
        return "timm"
    return "dinov2"


def dinov2_filter_fn(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official layout: flatten the training code's chunked ``blocks.<chunk>.<i>.`` names to ``blocks.<i>.``."""
    # In a chunked model the inner index is already the global block index (chunks are padded with Identity).
    return {_CHUNKED_BLOCK.sub(r"blocks.\1.", k): v for k, v in state_dict.items()}


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
        elif key == "pos_embed" and value.ndim == 3 and is_square(value.shape[1]):
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


# ---------------------------------------------------------------------------------------------------- DINOv3


def detect_dinov3_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``"huggingface"``, ``"timm"`` or ``"dinov3"`` (the official DINOv3 layout) of a DINOv3 backbone.

    Hugging Face's names start with ``embeddings.`` / ``layer.``; timm's have ``reg_token``, ``gamma_1`` or
    ``q_bias``; the official files always hold ``mask_token`` and ``rope_embed.periods`` (timm saves neither).
    """
    keys = state_dict.keys()
    if any(k.startswith(("embeddings.", "layer.", "model.layer.")) for k in keys):
        return "huggingface"
    timm_marks = (".gamma_1", ".attn.q_bias", ".mlp.fc1_g.weight")
    if "reg_token" in keys or any(k.endswith(timm_marks) for k in keys):
        return "timm"
    if "rope_embed.periods" in keys or "mask_token" in keys or "storage_tokens" in keys:
        return "dinov3"
    return "timm"


_TIMM_V3_RENAMES = [
    (r"reg_token", "storage_tokens"),
    (r"blocks\.(\d+)\.gamma_1", r"blocks.\1.ls1.gamma"),
    (r"blocks\.(\d+)\.gamma_2", r"blocks.\1.ls2.gamma"),
    (r"blocks\.(\d+)\.mlp\.fc1_g\.(weight|bias)", r"blocks.\1.mlp.w1.\2"),
    (r"blocks\.(\d+)\.mlp\.fc1_x\.(weight|bias)", r"blocks.\1.mlp.w2.\2"),
]
_TIMM_V3_QKV_BIAS = re.compile(r"(blocks\.\d+\.attn)\.(q|k|v)_bias")


def _qkv_bias(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[q; k; v]`` biases, zeros for an absent part (DINOv3's key bias is zero: timm and HF do not save it)."""
    like = next(iter(parts.values()))
    return torch.cat([parts.get(name, torch.zeros_like(like)) for name in ("q", "k", "v")])


def timm_to_dinov3(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ``vit_*_patch16_dinov3`` layout -> official DINOv3 layout.

    ``reg_token`` -> ``storage_tokens``; ``gamma_1/2`` -> ``ls1/ls2.gamma``; ``q_bias``/``v_bias`` -> ``qkv.bias``
    with a zero key bias; SwiGLU ``fc1_g``/``fc1_x``/``fc2`` -> ``w1``/``w2``/``w3``; RoPE buffers and a
    classifier ``head`` are dropped.
    """
    out, biases = {}, {}
    swiglu_blocks = {m.group(1) for k in state_dict if (m := re.fullmatch(r"(blocks\.\d+)\.mlp\.fc1_g\.weight", k))}
    for key, value in state_dict.items():
        if key.startswith("rope."):
            continue  # fixed function of the architecture, not saved by timm anyway
        if key.startswith("head."):
            logger.warning("ignoring classifier weights %s (not part of the backbone)", key)
            continue
        if m := _TIMM_V3_QKV_BIAS.fullmatch(key):
            biases.setdefault(m.group(1), {})[m.group(2)] = value
            continue
        m = re.fullmatch(r"(blocks\.\d+)\.mlp\.fc2\.(weight|bias)", key)
        if m and m.group(1) in swiglu_blocks:
            out[f"{m.group(1)}.mlp.w3.{m.group(2)}"] = value
            continue
        for pattern, replacement in _TIMM_V3_RENAMES:
            if re.fullmatch(pattern, key):
                key = re.sub(pattern, replacement, key)
                break
        out[key] = value
    for attn, parts in biases.items():
        out[f"{attn}.qkv.bias"] = _qkv_bias(parts)
    return out


_HF_V3_LAYER = re.compile(r"(?:model\.)?layer\.(\d+)\.(.+)")
_HF_V3_IN_LAYER = [
    (r"(norm1|norm2)\.(weight|bias)", r"\1.\2"),
    (r"attention\.o_proj\.(weight|bias)", r"attn.proj.\1"),
    (r"layer_scale1\.lambda1", "ls1.gamma"),
    (r"layer_scale2\.lambda1", "ls2.gamma"),
    (r"mlp\.gate_proj\.(weight|bias)", r"mlp.w1.\1"),
]
_HF_V3_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "storage_tokens",
    "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}


def hf_to_dinov3(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ``DINOv3ViTModel`` layout -> official DINOv3 layout.

    ``q/k/v_proj`` are fused into ``qkv`` (an absent key bias is zero); the gated MLP's ``gate/up/down_proj``
    become ``w1/w2/w3``, the plain MLP's ``up/down_proj`` become ``fc1/fc2``; ``embeddings.mask_token``
    ``(1, 1, D)`` becomes ``mask_token`` ``(1, D)``; an empty ``register_tokens`` (no storage tokens) is dropped.
    """
    out, qkv_weights, qkv_biases = {}, {}, {}
    gate = re.compile(r"(?:model\.)?layer\.(\d+)\.mlp\.gate_proj\.weight")
    gated = {m.group(1) for k in state_dict if (m := gate.fullmatch(k))}
    for key, value in state_dict.items():
        if key == "embeddings.mask_token":
            out["mask_token"] = value.reshape(1, value.shape[-1])
            continue
        if key == "embeddings.register_tokens" and value.numel() == 0:
            continue
        if key in _HF_V3_TOP:
            out[_HF_V3_TOP[key]] = value
            continue
        m = _HF_V3_LAYER.fullmatch(key)
        if m is None:
            out[key] = value  # unknown: reported as unexpected
            continue
        layer, rest = m.groups()
        if q := re.fullmatch(r"attention\.(q|k|v)_proj\.(weight|bias)", rest):
            (qkv_weights if q.group(2) == "weight" else qkv_biases).setdefault(layer, {})[q.group(1)] = value
            continue
        if u := re.fullmatch(r"mlp\.(up|down)_proj\.(weight|bias)", rest):
            name = {("up", True): "w2", ("down", True): "w3", ("up", False): "fc1", ("down", False): "fc2"}
            out[f"blocks.{layer}.mlp.{name[(u.group(1), layer in gated)]}.{u.group(2)}"] = value
            continue
        for pattern, replacement in _HF_V3_IN_LAYER:
            if re.fullmatch(pattern, rest):
                out[f"blocks.{layer}.{re.sub(pattern, replacement, rest)}"] = value
                break
        else:
            out[key] = value
    for layer, parts in qkv_weights.items():
        out[f"blocks.{layer}.attn.qkv.weight"] = _fuse_qkv(parts, f"layer.{layer}.attention weight")
    for layer, parts in qkv_biases.items():
        out[f"blocks.{layer}.attn.qkv.bias"] = _qkv_bias(parts)
    return out


def dinov3_to_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official DINOv3 layout -> Hugging Face ``DINOv3ViTModel`` layout, with the Hub files' ``layer.<i>.`` names.

    A masked key bias (``qkv.bias_mask`` present) is not written (``key_bias=False``); ``rope_embed.periods``,
    ``bias_mask`` and the training-only ``local_cls_norm`` are dropped. Untied ``cls_norm`` has no Hugging Face
    counterpart: WeightsLoadError.
    """
    if any(k.startswith("cls_norm.") for k in state_dict):
        raise WeightsLoadError("Hugging Face's DINOv3ViTModel has no separate cls_norm (untie_cls_and_patch_norms)")
    top = {ours: hf for hf, ours in _HF_V3_TOP.items()}
    out = {}
    for key, value in state_dict.items():
        if key == "mask_token":
            out["embeddings.mask_token"] = value.reshape(1, 1, value.shape[-1])
        elif key in top:
            out[top[key]] = value
        elif key == "rope_embed.periods" or key.endswith(".bias_mask") or key.startswith("local_cls_norm."):
            continue
        elif m := re.fullmatch(r"blocks\.(\d+)\.(.+)", key):
            layer, rest = m.groups()
            prefix = f"layer.{layer}."
            if rest == "attn.qkv.weight":
                for name, part in zip("qkv", value.chunk(3)):
                    out[f"{prefix}attention.{name}_proj.weight"] = part
            elif rest == "attn.qkv.bias":
                masked = f"blocks.{layer}.attn.qkv.bias_mask" in state_dict
                for name, part in zip("qkv", value.chunk(3)):
                    if not (masked and name == "k"):
                        out[f"{prefix}attention.{name}_proj.bias"] = part
            else:
                renames = [
                    (r"(norm1|norm2)\.(weight|bias)", r"\1.\2"),
                    (r"attn\.proj\.(weight|bias)", r"attention.o_proj.\1"),
                    (r"ls1\.gamma", "layer_scale1.lambda1"),
                    (r"ls2\.gamma", "layer_scale2.lambda1"),
                    (r"mlp\.w1\.(weight|bias)", r"mlp.gate_proj.\1"),
                    (r"mlp\.(?:w2|fc1)\.(weight|bias)", r"mlp.up_proj.\1"),
                    (r"mlp\.(?:w3|fc2)\.(weight|bias)", r"mlp.down_proj.\1"),
                ]
                for pattern, replacement in renames:
                    if re.fullmatch(pattern, rest):
                        out[prefix + re.sub(pattern, replacement, rest)] = value
                        break
                else:
                    raise WeightsLoadError(f"no Hugging Face name for {key}")
        else:
            raise WeightsLoadError(f"no Hugging Face name for {key}")
    if "embeddings.register_tokens" not in out and "cls_token" in state_dict:
        cls = state_dict["cls_token"]
        out["embeddings.register_tokens"] = cls.new_zeros(1, 0, cls.shape[-1])  # HF keeps an empty one
    return out


_DINOV3_CONVERTERS = {"dinov3": dict, "timm": timm_to_dinov3, "huggingface": hf_to_dinov3}


def convert_to_dinov3(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Detect the layout of a DINOv3 backbone state dict and convert it; returns ``(state_dict, layout)``."""
    layout = detect_dinov3_layout(state_dict)
    return _DINOV3_CONVERTERS[layout](state_dict), layout
