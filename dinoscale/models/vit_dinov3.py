"""Vision Transformer backbone with the DINOv3 architecture and parameter layout.

Parameter and buffer names equal those of the released DINOv3 ``.pth`` files, so an official state dict loads
with ``strict=True``::

    cls_token (1, 1, D)   storage_tokens (1, R, D)   mask_token (1, D)   rope_embed.periods (D_head / 4,)
    patch_embed.proj.{weight,bias}
    blocks.<i>.norm1.{weight,bias}   blocks.<i>.attn.qkv.{weight,bias,bias_mask}   blocks.<i>.attn.proj.{weight,bias}
    blocks.<i>.ls1.gamma   blocks.<i>.norm2.{weight,bias}   blocks.<i>.ls2.gamma
    blocks.<i>.mlp.fc1/fc2.{weight,bias} (MLP)  or  blocks.<i>.mlp.w1/w2/w3.{weight,bias} (SwiGLU)
    norm.{weight,bias}   [cls_norm.{weight,bias}]   [local_cls_norm.{weight,bias}]

Differences from the DINOv2 ViT (``dinoscale.models.vit``): no learned position embedding but 2-D rotary
position embeddings (RoPE) on the patch tokens only, so any image size divisible by the patch works without
interpolation; storage (register) tokens; a qkv projection whose key bias is held at zero (``bias_mask``);
SwiGLU with separate ``w1``/``w2`` and the hidden width rounded up to ``align_to``; optional separate norms for
the class/storage tokens (``cls_norm``) and for the local crops' class tokens in training (``local_cls_norm``).

Token layout: ``[cls, storage_1..storage_R, patch_1..patch_N]``. No distribution code lives here: FSDP wraps
``self.blocks[i]`` from outside. Multi-crop lists travel packed through the blocks as in ``vit.py``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dinoscale.models.attention import Attention, RopeSinCos, scaled_linear
from dinoscale.models.vit import (
    CropShapes,
    DropPath,
    LayerScale,
    Mlp,
    PatchEmbed,
    _gamma,
    block_indices,
    crop_masks,
    drop_path_rates,
    pack_crops,
    unpack_crops,
)

# ffn_layer -> the multiple the SwiGLU hidden width is rounded up to (None: the GELU MLP). DINOv3's names.
DINOV3_FFN_LAYERS = {"mlp": None, "swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}
# norm_layer -> LayerNorm eps. DINOv3's names: the releases use "layernormbf16" (eps 1e-5).
DINOV3_NORM_LAYERS = {"layernorm": 1e-6, "layernormbf16": 1e-5}
ROPE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NORMALIZE_COORDS = ("min", "max", "separate")
_TOKEN_PARAMS = ("cls_token", "storage_tokens", "mask_token")


class RopePositionEmbedding(nn.Module):
    """Axial 2-D RoPE angles for a ``H x W`` patch grid, no learned weights.

    Patch ``(i, j)`` sits at ``c = 2 * ((i + 0.5) / n_h, (j + 0.5) / n_w) - 1`` in ``[-1, 1]^2`` where
    ``(n_h, n_w)`` is ``(H, W)`` ("separate"), ``min(H, W)`` twice ("min") or ``max(H, W)`` twice ("max").
    The ``D_head / 4`` periods are ``base ** (4 k / D_head)``, or, with ``min_period``/``max_period``,
    ``min_period * (max_period / min_period) ** (k / (D_head / 4 - 1))``. Angles: ``2 pi c_axis / period_k``,
    laid out ``[h-angles, w-angles]`` and tiled twice to ``D_head``; ``forward`` returns their ``(sin, cos)``.

    In training mode only, the coordinates are augmented: ``shift_coords`` adds one uniform draw in
    ``[-shift, shift]`` per axis, ``jitter_coords`` multiplies each axis by a log-uniform draw in
    ``[1/jitter, jitter]``, ``rescale_coords`` multiplies both axes by one log-uniform draw in
    ``[1/rescale, rescale]``. Draws use torch's global generator.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        base: float | None = 100.0,
        min_period: float | None = None,
        max_period: float | None = None,
        normalize_coords: str = "separate",
        shift_coords: float | None = None,
        jitter_coords: float | None = None,
        rescale_coords: float | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if embed_dim % (4 * num_heads) != 0:
            raise ValueError(f"RoPE needs embed_dim ({embed_dim}) divisible by 4 * num_heads ({4 * num_heads})")
        has_periods = (min_period is not None, max_period is not None)
        if (base is None and has_periods != (True, True)) or (base is not None and any(has_periods)):
            raise ValueError("give RoPE either a base or both min_period and max_period")
        if normalize_coords not in NORMALIZE_COORDS:
            raise ValueError(f"normalize_coords must be one of {NORMALIZE_COORDS}, got {normalize_coords!r}")
        for name, value in (("jitter_coords", jitter_coords), ("rescale_coords", rescale_coords)):
            if value is not None and value < 1:
                raise ValueError(f"{name} is a factor >= 1, got {value}")
        self.head_dim = embed_dim // num_heads
        self.base, self.min_period, self.max_period = base, min_period, max_period
        self.normalize_coords = normalize_coords
        self.shift_coords, self.jitter_coords, self.rescale_coords = shift_coords, jitter_coords, rescale_coords
        self.dtype = dtype
        # Persistent: the official checkpoints hold it.
        self.register_buffer("periods", torch.empty(self.head_dim // 4, dtype=dtype))
        self.reset_parameters()

    def extra_repr(self) -> str:
        period = f"base={self.base}" if self.base is not None else f"periods=[{self.min_period}, {self.max_period}]"
        augment = f"shift={self.shift_coords}, jitter={self.jitter_coords}, rescale={self.rescale_coords}"
        return f"head_dim={self.head_dim}, {period}, normalize_coords={self.normalize_coords!r}, {augment}"

    @torch.no_grad()
    def reset_parameters(self) -> None:
        n = self.head_dim // 4
        k = torch.arange(n, dtype=torch.float64, device=self.periods.device)
        if self.base is not None:
            periods = self.base ** (4 * k / self.head_dim)
        else:
            ratio = self.max_period / self.min_period
            periods = self.min_period * ratio ** (k / max(n - 1, 1))
        self.periods.copy_(periods.to(self.dtype))

    def _coords(self, H: int, W: int) -> torch.Tensor:
        """Patch centres ``(H*W, 2)`` in ``[-1, 1]``, row-major, ``(y, x)``; augmented in training mode."""
        dd = {"device": self.periods.device, "dtype": self.dtype}
        if self.normalize_coords == "separate":
            n_h, n_w = H, W
        else:
            n_h = n_w = (min if self.normalize_coords == "min" else max)(H, W)
        ys = torch.arange(0.5, H, **dd) / n_h
        xs = torch.arange(0.5, W, **dd) / n_w
        coords = 2.0 * torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1) - 1.0
        if self.training:
            if self.shift_coords is not None:
                coords = coords + torch.empty(2, **dd).uniform_(-self.shift_coords, self.shift_coords)
            if self.jitter_coords is not None:
                log_j = math.log(self.jitter_coords)
                coords = coords * torch.empty(2, **dd).uniform_(-log_j, log_j).exp()
            if self.rescale_coords is not None:
                log_r = math.log(self.rescale_coords)
                coords = coords * torch.empty(1, **dd).uniform_(-log_r, log_r).exp()
        return coords

    def forward(self, H: int, W: int) -> RopeSinCos:
        """``(sin, cos)``, each ``(H*W, head_dim)`` in the RoPE dtype, for a grid of ``H x W`` patches."""
        coords = self._coords(H, W)
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]  # (HW, 2, head_dim / 4)
        angles = angles.flatten(1, 2).tile(2)  # (HW, head_dim)
        return torch.sin(angles), torch.cos(angles)


def swiglu_hidden_features(hidden_features: int, align_to: int) -> int:
    """DINOv3's SwiGLU width: ``int(hidden * 2 / 3)`` rounded up to a multiple of ``align_to``."""
    d = int(hidden_features * 2 / 3)
    return d + (-d % align_to)


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward with DINOv3's names: ``w3(silu(w1(x)) * w2(x))`` (``vit.py``'s packs ``w1;w2`` as
    ``w12``; the official DINOv3 checkpoints keep them apart)."""

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True, align_to: int = 8) -> None:
        super().__init__()
        hidden = swiglu_hidden_features(hidden_features, align_to)
        self.w1 = nn.Linear(in_features, hidden, bias=bias)
        self.w2 = nn.Linear(in_features, hidden, bias=bias)
        self.w3 = nn.Linear(hidden, in_features, bias=bias)

    def forward(self, x: torch.Tensor, out_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``out_scale``: a per-channel factor on the output (LayerScale), folded into ``w3``."""
        return scaled_linear(self.w3, F.silu(self.w1(x)) * self.w2(x), out_scale)


def _norm(norm_layer: str, dim: int) -> nn.LayerNorm:
    if norm_layer not in DINOV3_NORM_LAYERS:
        raise ValueError(f"unknown norm_layer {norm_layer!r}; expected one of {sorted(DINOV3_NORM_LAYERS)}")
    return nn.LayerNorm(dim, eps=DINOV3_NORM_LAYERS[norm_layer])


class Dinov3Block(nn.Module):
    """Pre-norm block ``x + ls1(attn(norm1(x), rope))``, then ``x + ls2(ffn(norm2(x)))``; LayerScale folded into
    the branch's last linear layer as in ``vit.Block``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop_path: float = 0.0,
        init_values: float | None = None,
        ffn_layer: str = "mlp",
        norm_layer: str = "layernorm",
        mask_k_bias: bool = False,
        attn_backend: str | None = None,
    ) -> None:
        super().__init__()
        if ffn_layer not in DINOV3_FFN_LAYERS:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r}; expected one of {sorted(DINOV3_FFN_LAYERS)}")
        self.norm1 = _norm(norm_layer, dim)
        self.attn = Attention(
            dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, attn_backend=attn_backend, mask_k_bias=mask_k_bias
        )
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = _norm(norm_layer, dim)
        hidden = int(dim * ffn_ratio)
        align_to = DINOV3_FFN_LAYERS[ffn_layer]
        if align_to is None:
            self.mlp = Mlp(dim, hidden, bias=ffn_bias)
        else:
            self.mlp = SwiGLUFFN(dim, hidden, bias=ffn_bias, align_to=align_to)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(
        self,
        x: torch.Tensor | Sequence[torch.Tensor],
        crop_shapes: CropShapes | None = None,
        rope: RopeSinCos | Sequence[RopeSinCos] | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """``(B, N, D)`` with one ``(sin, cos)``; packed crops with ``crop_shapes`` and one pair per crop; or a
        list of ``(B_i, N_i, D)`` with one pair per crop (returns a list)."""
        if isinstance(x, (list, tuple)):
            packed, shapes = pack_crops(x)
            return unpack_crops(self.forward(packed, shapes, rope), shapes)
        attn = self.attn(self.norm1(x), crop_shapes, out_scale=_gamma(self.ls1), rope=rope)
        x = x + self.drop_path1(attn, crop_shapes)
        return x + self.drop_path2(self.mlp(self.norm2(x), out_scale=_gamma(self.ls2)), crop_shapes)


class DinoV3VisionTransformer(nn.Module):
    """ViT with the DINOv3 release's architecture and parameter layout (see the module docstring).

    Args use the official names:
        img_size: nominal image side (only recorded: RoPE works at every size divisible by ``patch_size``).
        patch_size, in_chans, embed_dim, depth, num_heads: the usual sizes.
        pos_embed_rope_base / pos_embed_rope_min_period / pos_embed_rope_max_period: the RoPE periods
            (``base`` or both periods; see :class:`RopePositionEmbedding`).
        pos_embed_rope_normalize_coords: ``"separate"``, ``"min"`` or ``"max"``.
        pos_embed_rope_shift_coords / _jitter_coords / _rescale_coords: training-time coordinate augmentations.
        pos_embed_rope_dtype: ``"fp32"`` (every release), ``"bf16"`` (the official class default) or ``"fp16"``.
        ffn_ratio: FFN hidden width / ``embed_dim`` before the SwiGLU rounding.
        qkv_bias, proj_bias, ffn_bias: biases of the qkv projection, the attention output, the FFN.
        drop_path_rate: stochastic depth; the same rate in every block (``drop_path_uniform``, as DINOv3), else
            rising linearly from 0.
        layerscale_init: LayerScale init value (1e-5 in the releases); None: no LayerScale.
        norm_layer: ``"layernorm"`` (eps 1e-6) or ``"layernormbf16"`` (eps 1e-5, the releases).
        ffn_layer: ``"mlp"``, ``"swiglu"`` (hidden rounded to 8), ``"swiglu32"``, ``"swiglu64"``, ``"swiglu128"``.
        n_storage_tokens: storage (register) tokens.
        mask_k_bias: keep the key bias at zero (``attn.qkv.bias_mask``).
        untie_cls_and_patch_norms: class and storage tokens get their own final norm ``cls_norm``.
        untie_global_and_local_cls_norm: in training, the class and storage tokens of the *second* batch of a
            list (the local crops) get ``local_cls_norm``; never used in eval.
        attn_backend: see ``dinoscale.models.attention``.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        pos_embed_rope_base: float | None = 100.0,
        pos_embed_rope_min_period: float | None = None,
        pos_embed_rope_max_period: float | None = None,
        pos_embed_rope_normalize_coords: str = "separate",
        pos_embed_rope_shift_coords: float | None = None,
        pos_embed_rope_jitter_coords: float | None = None,
        pos_embed_rope_rescale_coords: float | None = None,
        pos_embed_rope_dtype: str = "fp32",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        ffn_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = True,
        layerscale_init: float | None = None,
        norm_layer: str = "layernorm",
        ffn_layer: str = "mlp",
        n_storage_tokens: int = 0,
        mask_k_bias: bool = False,
        untie_cls_and_patch_norms: bool = False,
        untie_global_and_local_cls_norm: bool = False,
        attn_backend: str | None = None,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if n_storage_tokens < 0:
            raise ValueError(f"n_storage_tokens must be >= 0, got {n_storage_tokens}")
        if pos_embed_rope_dtype not in ROPE_DTYPES:
            raise ValueError(f"pos_embed_rope_dtype must be one of {sorted(ROPE_DTYPES)}, got {pos_embed_rope_dtype!r}")
        if ffn_layer not in DINOV3_FFN_LAYERS:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r}; expected one of {sorted(DINOV3_FFN_LAYERS)}")
        self.embed_dim = self.num_features = embed_dim
        self.patch_size = patch_size
        self.n_blocks = depth
        self.num_heads = num_heads
        self.n_storage_tokens = n_storage_tokens
        self.untie_cls_and_patch_norms = untie_cls_and_patch_norms
        self.untie_global_and_local_cls_norm = untie_global_and_local_cls_norm

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if n_storage_tokens > 0:
            self.storage_tokens = nn.Parameter(torch.zeros(1, n_storage_tokens, embed_dim))
        else:
            self.storage_tokens = None
        self.rope_embed = RopePositionEmbedding(
            embed_dim,
            num_heads,
            base=pos_embed_rope_base,
            min_period=pos_embed_rope_min_period,
            max_period=pos_embed_rope_max_period,
            normalize_coords=pos_embed_rope_normalize_coords,
            shift_coords=pos_embed_rope_shift_coords,
            jitter_coords=pos_embed_rope_jitter_coords,
            rescale_coords=pos_embed_rope_rescale_coords,
            dtype=ROPE_DTYPES[pos_embed_rope_dtype],
        )
        dpr = drop_path_rates(drop_path_rate, depth, uniform=drop_path_uniform)
        self.blocks = nn.ModuleList(
            [
                Dinov3Block(
                    dim=embed_dim,
                    num_heads=num_heads,
                    ffn_ratio=ffn_ratio,
                    qkv_bias=qkv_bias,
                    proj_bias=proj_bias,
                    ffn_bias=ffn_bias,
                    drop_path=dpr[i],
                    init_values=layerscale_init,
                    ffn_layer=ffn_layer,
                    norm_layer=norm_layer,
                    mask_k_bias=mask_k_bias,
                    attn_backend=attn_backend,
                )
                for i in range(depth)
            ]
        )
        # With untied norms, ``norm`` is the patch tokens' norm only.
        self.norm = _norm(norm_layer, embed_dim)
        self.cls_norm = _norm(norm_layer, embed_dim) if untie_cls_and_patch_norms else None
        self.local_cls_norm = _norm(norm_layer, embed_dim) if untie_global_and_local_cls_norm else None
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()

    @property
    def num_register_tokens(self) -> int:
        """``n_storage_tokens`` under the DINOv2 model's name (read by the attention-map and export tools)."""
        return self.n_storage_tokens

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer; callable after ``to_empty()`` on a meta-device model."""
        self.rope_embed.reset_parameters()
        nn.init.normal_(self.cls_token, std=0.02)
        if self.storage_tokens is not None:
            nn.init.normal_(self.storage_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)
        self.patch_embed.proj.reset_parameters()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
                if hasattr(m, "reset_bias_mask"):
                    m.reset_bias_mask()
            elif isinstance(m, (nn.LayerNorm, LayerScale)):
                m.reset_parameters()

    # ------------------------------------------------------------------ optimizer metadata

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW must not decay: the learned tokens and every 1-d parameter (biases, norms, LayerScale)."""
        return {name for name, p in self.named_parameters() if name in _TOKEN_PARAMS or p.ndim <= 1}

    def layer_id(self, name: str) -> int:
        """Depth of parameter ``name`` for layer-wise lr decay: 0 for the patch embedding and the tokens,
        ``i + 1`` for ``blocks.i``, ``n_blocks + 1`` for the final norms."""
        root, _, rest = name.partition(".")
        if root in ("patch_embed", "rope_embed") or root in _TOKEN_PARAMS:
            return 0
        if root == "blocks":
            return int(rest.partition(".")[0]) + 1
        return self.n_blocks + 1

    # ------------------------------------------------------------------ tokens

    def prepare_tokens_with_masks(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> tokens ``(B, 1 + R + N, D)``; ``masks`` (bool ``(B, N)``, True = masked)
        replaces the masked patch embeddings by ``mask_token``. No position embedding: RoPE acts in attention."""
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        B = x.shape[0]
        x = self.patch_embed(x)
        if masks is not None:
            if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool:
                raise TypeError(f"masks must be a bool tensor, got {getattr(masks, 'dtype', type(masks))}")
            if tuple(masks.shape) != tuple(x.shape[:2]):
                raise ValueError(f"masks must have shape (B, N)={tuple(x.shape[:2])}, got {tuple(masks.shape)}")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        prefix = [self.cls_token.expand(B, -1, -1).to(x.dtype)]
        if self.storage_tokens is not None:
            prefix.append(self.storage_tokens.expand(B, -1, -1).to(x.dtype))
        return torch.cat((*prefix, x), dim=1)

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        H, W = x.shape[-2:]
        return H // self.patch_size, W // self.patch_size

    def _ropes(self, grids: Sequence[tuple[int, int]]):
        """One ``(sin, cos)`` per grid for each block: computed once in eval; drawn anew for every block in
        training, where the coordinate augmentations are random (as the official model does)."""
        if not self.training:
            ropes = [self.rope_embed(H=h, W=w) for h, w in grids]
            return [ropes] * len(self.blocks)
        return [[self.rope_embed(H=h, W=w) for h, w in grids] for _ in self.blocks]

    def _normed(self, x: torch.Tensor, crop_index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(cls and storage tokens), norm(patch tokens))`` with the norm each part uses."""
        k = 1 + self.n_storage_tokens
        if self.local_cls_norm is not None and self.training and crop_index == 1:
            cls_norm = self.local_cls_norm  # the local crops (second batch of a list), training only
        elif self.cls_norm is not None:
            cls_norm = self.cls_norm
        else:
            cls_norm = self.norm
        return cls_norm(x[:, :k]), self.norm(x[:, k:])

    def _output_dict(self, x: torch.Tensor, masks: torch.Tensor | None, crop_index: int = 0) -> dict:
        cls_storage, patches = self._normed(x, crop_index)
        storage = cls_storage[:, 1:]
        return {
            "x_norm_clstoken": cls_storage[:, 0],
            "x_storage_tokens": storage,
            "x_norm_regtokens": storage,  # the DINOv2 model's name for the same tokens
            "x_norm_patchtokens": patches,
            "x_prenorm": x,
            "masks": masks,
        }

    # ------------------------------------------------------------------ forward

    def forward_features_list(
        self, x_list: Sequence[torch.Tensor], masks_list: Sequence[torch.Tensor | None] | None = None
    ) -> list[dict]:
        """One pass through the blocks for several batches of different resolutions; one dict per batch."""
        masks_list = crop_masks(x_list, masks_list)
        x, shapes = pack_crops([self.prepare_tokens_with_masks(x, m) for x, m in zip(x_list, masks_list)])
        for blk, ropes in zip(self.blocks, self._ropes([self._grid(x) for x in x_list])):
            x = blk(x, shapes, ropes)
        return [self._output_dict(t, m, i) for i, (t, m) in enumerate(zip(unpack_crops(x, shapes), masks_list))]

    def forward_features(
        self,
        x: torch.Tensor | Sequence[torch.Tensor],
        masks: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    ) -> dict | list[dict]:
        """Normalised class/storage/patch tokens (dict), or a list of dicts when ``x`` is a list of batches."""
        if isinstance(x, (list, tuple)):
            if masks is not None and not isinstance(masks, (list, tuple)):
                raise TypeError("when x is a list of image batches, masks must be a list (or None)")
            return self.forward_features_list(x, masks)
        if isinstance(masks, (list, tuple)):
            raise TypeError("masks is a list but x is a single tensor; pass x as a list too")
        tokens = self.prepare_tokens_with_masks(x, masks)
        for blk, (rope,) in zip(self.blocks, self._ropes([self._grid(x)])):
            tokens = blk(tokens, rope=rope)
        return self._output_dict(tokens, masks)

    def forward(self, x, masks=None, is_training: bool = False):
        """``is_training``: the ``forward_features`` output; else ``head(x_norm_clstoken)`` (per batch for lists)."""
        out = self.forward_features(x, masks)
        if is_training:
            return out
        if isinstance(out, list):
            return [self.head(o["x_norm_clstoken"]) for o in out]
        return self.head(out["x_norm_clstoken"])

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        return_extra_tokens: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last ``n`` blocks (int) or of the listed blocks, in block order, as the official model.

        Each output is the patch tokens ``(B, N, D)`` (``(B, D, h, w)`` with ``reshape``), paired with the class
        token ``(B, D)`` if ``return_class_token`` and then the storage tokens ``(B, R, D)`` if
        ``return_extra_tokens``. ``norm``: the final norms (``cls_norm`` on class/storage tokens when untied).
        """
        take = block_indices(n, len(self.blocks))
        B, _, H, W = x.shape
        tokens = self.prepare_tokens_with_masks(x)
        outputs = []
        for i, (blk, (rope,)) in enumerate(zip(self.blocks[: take[-1] + 1], self._ropes([self._grid(x)]))):
            tokens = blk(tokens, rope=rope)
            if i in take:
                outputs.append(torch.cat(self._normed(tokens), dim=1) if norm else tokens)
        k = 1 + self.n_storage_tokens
        class_tokens = [out[:, 0] for out in outputs]
        extra_tokens = [out[:, 1:k] for out in outputs]
        patch_tokens = [out[:, k:] for out in outputs]
        if reshape:
            h, w = self._grid(x)
            patch_tokens = [out.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() for out in patch_tokens]
        parts = [patch_tokens]
        if return_class_token:
            parts.append(class_tokens)
        if return_extra_tokens:
            parts.append(extra_tokens)
        return tuple(patch_tokens) if len(parts) == 1 else tuple(zip(*parts))

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention probabilities ``(B, heads, T, T)`` of the last block, token order ``[cls, storage, patches]``."""
        tokens = self.prepare_tokens_with_masks(x)
        ropes = self._ropes([self._grid(x)])
        for blk, (rope,) in zip(self.blocks[:-1], ropes):
            tokens = blk(tokens, rope=rope)
        last = self.blocks[-1]
        return last.attn.attention_probs(last.norm1(tokens), rope=ropes[-1][0])
