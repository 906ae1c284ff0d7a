"""Vision Transformer backbone with the DINOv2 parameter layout.

Parameter names and shapes equal those of the released DINOv2 backbones, so an official ``.pth``
loads with ``strict=True``. No distribution code lives here: FSDP wraps ``self.blocks[i]`` from outside.

Token layout of a sequence: ``[cls, reg_1..reg_R, patch_1..patch_N]``; the registers carry no position
embedding. ``forward_features`` also accepts a list of image batches of different resolutions (multi-crop),
which go through the blocks together: norms and MLPs run on the concatenated tokens, attention per crop.

Multi-crop tokens travel through the blocks *packed*: one ``(sum_i B_i * N_i, D)`` tensor plus the crop shapes
``((B_1, N_1), ...)``, so the token-wise layers run as single large matmuls and no block concatenates and
splits its input again (blocks take ``blk(x, crop_shapes)``; a list still works, and is packed on entry).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from dinoscale.models.attention import Attention, scaled_linear

FFN_LAYERS = ("mlp", "swiglu", "swiglufused")
# Learned tokens and the position embedding: part of the input embedding, never weight-decayed.
_TOKEN_PARAMS = ("cls_token", "pos_embed", "mask_token", "register_tokens")


def crop_masks(
    x_list: Sequence[torch.Tensor], masks_list: Sequence[torch.Tensor | None] | None
) -> Sequence[torch.Tensor | None]:
    """One mask (or None) per image batch of a multi-crop list; ValueError for an empty list or a count mismatch."""
    if len(x_list) == 0:
        raise ValueError("forward_features got an empty list of image batches")
    if masks_list is None:
        return [None] * len(x_list)
    if len(masks_list) != len(x_list):
        raise ValueError(f"got {len(x_list)} image batches but {len(masks_list)} masks")
    return masks_list


def drop_path_rates(drop_path_rate: float, depth: int, uniform: bool) -> list[float]:
    """Each block's stochastic-depth rate: all ``drop_path_rate`` (``uniform``), or linear from 0 to it. Plain
    floats, so a model can be built on the meta device."""
    if uniform:
        return [drop_path_rate] * depth
    return [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]


def patches_of(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H/p * W/p, C * p * p)``: each patch flattened in (C, p, p) order, row-major."""
    B, C, H, W = images.shape
    grid = images.reshape(B, C, H // patch, patch, W // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return grid.reshape(B, -1, C * patch * patch)


def images_of(patches: torch.Tensor, image_shape: torch.Size, patch: int) -> torch.Tensor:
    """The inverse of :func:`patches_of`."""
    B, C, H, W = image_shape
    grid = patches.reshape(B, H // patch, W // patch, C, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(B, C, H, W)


class _PatchProjection(torch.autograd.Function):
    """A kernel = stride convolution as one matmul over the flattened patches, in ``dtype``.

    Saved for the backward: the images and the weight, as the convolution saves (not the patch copy, which the
    backward makes again), so activation memory is the convolution's. Its gradients: the weight's
    ``dy^T patches``, the bias's ``sum(dy)``, and the images' only when they need one.
    """

    @staticmethod
    def forward(ctx, images, weight, bias, patch: int, dtype: torch.dtype):
        ctx.save_for_backward(images, weight)
        ctx.patch, ctx.dtype = patch, dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        patches = patches_of(images.to(dtype), patch)
        B, N, K = patches.shape
        rows, flat_weight = patches.view(B * N, K), weight.reshape(weight.shape[0], K).to(dtype).t()
        out = rows @ flat_weight if bias is None else torch.addmm(bias.to(dtype), rows, flat_weight)
        return out.view(B, N, -1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        images, weight = ctx.saved_tensors
        dy = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.dtype)
        grad_images = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            flat_weight = weight.reshape(weight.shape[0], -1).to(ctx.dtype)
            grad_images = images_of(dy @ flat_weight, images.shape, ctx.patch).to(images.dtype)
        if ctx.needs_input_grad[1]:
            patches = patches_of(images.to(ctx.dtype), ctx.patch).reshape(dy.shape[0], -1)
            grad_weight = (dy.t() @ patches).view(weight.shape).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = dy.sum(0).to(ctx.bias_dtype)
        return grad_images, grad_weight, grad_bias, None, None


class PatchEmbed(nn.Module):
    """Split an image into ``patch_size`` x ``patch_size`` patches and project each to ``embed_dim``."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, H/p * W/p, D)``, patches in row-major order."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        p = self.patch_size[0]
        if H % p != 0 or W % p != 0:
            raise ValueError(f"image size {H}x{W} (HxW) is not a multiple of the patch size {p}")
        if x.device.type == "cpu" and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
            return self._project_patches(x)
        return self._convolve(x)

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        """``proj`` as the convolution it is stored as (GPUs, traced and exported graphs)."""
        return self.proj(x).flatten(2).transpose(1, 2)

    def _project_patches(self, x: torch.Tensor) -> torch.Tensor:
        """``proj`` as the linear map it is (kernel = stride): one matmul over the flattened patches
        (:class:`_PatchProjection`), in autocast's dtype when autocast is on, as the convolution would run.

        On CPU, forward and backward of the multi-crop batches take 2.5-3.8x less time this way than with oneDNN's
        convolution under bf16 autocast, about the same in float32 (``benchmarks/patch_embed_cpu.py``). Traced and
        exported graphs keep the convolution.
        """
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        return _PatchProjection.apply(x, self.proj.weight, self.proj.bias, self.patch_size[0], dtype)


class Mlp(nn.Module):
    """Two-layer GELU MLP: ``fc2(gelu(fc1(x)))``."""

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)

    def forward(self, x: torch.Tensor, out_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``out_scale``: a per-channel factor on the output (LayerScale), folded into ``fc2``."""
        return scaled_linear(self.fc2, self.act(self.fc1(x)), out_scale)


def swiglu_hidden_features(hidden_features: int) -> int:
    """DINOv2's SwiGLU width: two thirds of the MLP width (same parameter count), rounded up to a multiple of 8."""
    return (int(hidden_features * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward: ``w3(silu(a) * b)`` with ``[a, b] = w12(x)`` (one packed input projection)."""

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True) -> None:
        super().__init__()
        hidden = swiglu_hidden_features(hidden_features)
        self.w12 = nn.Linear(in_features, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, in_features, bias=bias)

    def forward(self, x: torch.Tensor, out_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``out_scale``: a per-channel factor on the output (LayerScale), folded into ``w3``."""
        a, b = self.w12(x).chunk(2, dim=-1)
        return scaled_linear(self.w3, F.silu(a) * b, out_scale)


class LayerScale(nn.Module):
    """Per-channel scaling of a residual branch, ``gamma`` initialised to ``init_values``.

    ``Block`` does not call it: it folds ``gamma`` into the branch's last linear layer (``scaled_linear``).
    The module holds the parameter under the released checkpoints' name (``ls1.gamma``).
    """

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability ``drop_prob``.

    Kept samples are scaled by ``1 / (1 - drop_prob)`` so the expectation is unchanged. Identity in eval mode.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"

    def forward(self, x: torch.Tensor, crop_shapes: CropShapes | None = None) -> torch.Tensor:
        """``x``: ``(B, ...)``, or packed multi-crop tokens ``(sum B_i * N_i, D)`` with their ``crop_shapes``."""
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        # The rate only meets float32 tensors (``rand < p``, ``mask / p``), never ``x`` itself: torch.compile then
        # keeps it symbolic, so blocks with different rates share one compiled graph (bf16 ``x / p`` or
        # ``bernoulli_(p)`` pin its value and compile one graph per block).
        if crop_shapes is None:
            keep = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) < keep_prob
        else:
            # one draw per image of each crop, in crop order (the same draws as crop-by-crop), spread over its tokens
            draws = [torch.rand(b, device=x.device) < keep_prob for b, _ in crop_shapes]
            keep = torch.cat([d.repeat_interleave(n) for d, (_, n) in zip(draws, crop_shapes)]).unsqueeze(-1)
        return x * (keep.float() / keep_prob).to(x.dtype)


CropShapes = tuple[tuple[int, int], ...]  # ((B_1, N_1), (B_2, N_2), ...) of packed multi-crop tokens


def pack_crops(xs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, CropShapes]:
    """``[(B_i, N_i, D)]`` -> ``(sum_i B_i * N_i, D)`` and the crop shapes."""
    if len(xs) == 0:
        raise ValueError("got an empty list of token tensors")
    D = xs[0].shape[-1]
    shapes = tuple((int(x.shape[0]), int(x.shape[1])) for x in xs)
    return torch.cat([x.reshape(-1, D) for x in xs]), shapes


def unpack_crops(x: torch.Tensor, crop_shapes: CropShapes) -> list[torch.Tensor]:
    """Inverse of :func:`pack_crops` (views, no copy)."""
    sizes = [b * n for b, n in crop_shapes]
    return [t.view(b, n, -1) for t, (b, n) in zip(x.split(sizes), crop_shapes)]


def resample_pos_embed(
    pos_embed: torch.Tensor,
    grid_hw: tuple[int, int],
    interpolate_offset: float = 0.0,
    interpolate_antialias: bool = False,
) -> torch.Tensor:
    """Resize position embeddings ``(1, 1 + M*M, D)`` (class slot first) to a ``rows x cols`` patch grid.

    The square ``M x M`` grid is resized bicubically in float32. With ``interpolate_offset > 0`` the scale
    factor is ``(n + offset) / M`` (original DINOv2 release), which shifts the sampling positions slightly;
    with 0 the target size is given directly (``_reg`` release, timm, Hugging Face). The class slot is kept
    as is. Same grid -> returned unchanged (no resampling, so no numerical change).
    """
    rows, cols = grid_hw
    num_pos = pos_embed.shape[1] - 1
    M = math.isqrt(num_pos)
    if M * M != num_pos:
        raise ValueError(f"pos_embed holds {num_pos} patch positions, which is not a square grid")
    if (rows, cols) == (M, M):
        return pos_embed
    dtype = pos_embed.dtype
    pos_embed = pos_embed.float()  # bicubic resampling in half precision shifts the embedding
    dim = pos_embed.shape[-1]
    patch_pos = pos_embed[:, 1:].reshape(1, M, M, dim).permute(0, 3, 1, 2)  # (1, D, rows, cols)
    if interpolate_offset:
        scale = (float(rows + interpolate_offset) / M, float(cols + interpolate_offset) / M)
        resize = {"scale_factor": scale}
    else:
        resize = {"size": (rows, cols)}
    patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=interpolate_antialias, **resize)
    if tuple(patch_pos.shape[-2:]) != (rows, cols):
        raise RuntimeError(f"position grid resized to {tuple(patch_pos.shape[-2:])}, expected {(rows, cols)}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat((pos_embed[:, :1], patch_pos), dim=1).to(dtype)


def _gamma(layer_scale: nn.Module) -> torch.Tensor | None:
    return layer_scale.gamma if isinstance(layer_scale, LayerScale) else None


def block_indices(n: int | Sequence[int], depth: int) -> list[int]:
    """The blocks ``get_intermediate_layers(n=...)`` returns, sorted: the last ``n`` for an int, else the listed
    indices (negative ones count from the end); ValueError for an out-of-range or empty choice."""
    if isinstance(n, int):
        if not 1 <= n <= depth:
            raise ValueError(f"n={n} must be between 1 and the number of blocks ({depth})")
        return list(range(depth - n, depth))
    indices = []
    for i in n:
        if not -depth <= i < depth:
            raise ValueError(f"block index {i} out of range for {depth} blocks")
        indices.append(i % depth)
    if not indices:
        raise ValueError("n is an empty list of block indices")
    return sorted(set(indices))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``.

    LayerScale is applied inside the branch's last linear layer (``attn.proj``, ``mlp.fc2``), whose weight and
    bias are scaled by ``gamma`` instead of its output: the same function, one elementwise pass over the tokens
    fewer per branch, forward and backward, and no copy of the branch output kept for ``gamma``'s gradient.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop_path: float = 0.0,
        init_values: float | None = None,
        ffn_layer: str = "mlp",
        attn_backend: str | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, attn_backend=attn_backend)
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        if ffn_layer == "mlp":
            self.mlp = Mlp(dim, hidden, bias=ffn_bias)
        elif ffn_layer in ("swiglu", "swiglufused"):
            self.mlp = SwiGLUFFN(dim, hidden, bias=ffn_bias)
        else:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r}; expected one of {FFN_LAYERS}")
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm2(x), out_scale=_gamma(self.ls2))

    def forward(
        self, x: torch.Tensor | Sequence[torch.Tensor], crop_shapes: CropShapes | None = None
    ) -> torch.Tensor | list[torch.Tensor]:
        """``(B, N, D)`` -> same; packed multi-crop tokens with ``crop_shapes`` -> same; a list -> a list."""
        if isinstance(x, (list, tuple)):
            packed, shapes = pack_crops(x)
            return unpack_crops(self.forward(packed, shapes), shapes)
        x = x + self.drop_path1(self.attn(self.norm1(x), crop_shapes, out_scale=_gamma(self.ls1)), crop_shapes)
        return x + self.drop_path2(self._ffn(x), crop_shapes)


class DinoVisionTransformer(nn.Module):
    """ViT with the DINOv2 release's parameter layout, registers, mask token and multi-crop forward.

    Args:
        img_size: image side the position embedding grid is built for (other sizes are interpolated).
        patch_size: patch side in pixels.
        in_chans: image channels.
        embed_dim, depth, num_heads, mlp_ratio: the usual transformer sizes.
        qkv_bias, ffn_bias, proj_bias: biases of the qkv projection, the FFN, the attention output projection.
        drop_path_rate: stochastic-depth rate of the last block; rates rise linearly from 0 over depth
            (all blocks use ``drop_path_rate`` if ``drop_path_uniform``).
        init_values: LayerScale init value; None means no LayerScale.
        ffn_layer: ``"mlp"`` or ``"swiglu"``/``"swiglufused"`` (same module; DINOv2's rounded hidden width).
        num_register_tokens: number of register tokens (0 = none).
        interpolate_antialias: ``antialias`` flag of the bicubic position-embedding interpolation.
        interpolate_offset: the release's offset added to the target grid before computing the scale factor
            (0.1 in the original release, 0 for the ``_reg`` models, where the target size is used directly).
        attn_backend: ``"sdpa"`` (None), ``"xformers"`` or ``"math"``; see ``dinoscale.models.attention``.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: float | None = None,
        ffn_layer: str = "mlp",
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        attn_backend: str | None = None,
    ) -> None:
        super().__init__()
        if ffn_layer not in FFN_LAYERS:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r}; expected one of {FFN_LAYERS}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        if img_size < patch_size:
            raise ValueError(f"img_size={img_size} is smaller than patch_size={patch_size}")
        self.embed_dim = self.num_features = embed_dim
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.n_blocks = depth
        self.num_heads = num_heads
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim))
        if num_register_tokens > 0:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        else:
            self.register_tokens = None
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

        dpr = drop_path_rates(drop_path_rate, depth, uniform=drop_path_uniform)
        self.blocks = nn.ModuleList(
            [
                Block(
                    dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_bias=proj_bias,
                    ffn_bias=ffn_bias,
                    drop_path=dpr[i],
                    init_values=init_values,
                    ffn_layer=ffn_layer,
                    attn_backend=attn_backend,
                )
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()
        self.init_weights()

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter; callable after ``to_empty()`` on a meta-device model."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        self.patch_embed.proj.reset_parameters()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, LayerScale)):
                m.reset_parameters()

    # ------------------------------------------------------------------ optimizer metadata

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW must not decay: the learned tokens, the position embedding and every 1-d parameter
        (biases, LayerNorm and LayerScale weights)."""
        return {name for name, p in self.named_parameters() if name in _TOKEN_PARAMS or p.ndim <= 1}

    def layer_id(self, name: str) -> int:
        """Depth of parameter ``name`` for layer-wise lr decay: 0 for the patch embedding and the tokens,
        ``i + 1`` for ``blocks.i``, ``n_blocks + 1`` for what comes after the blocks (the final norm)."""
        root, _, rest = name.partition(".")
        if root == "patch_embed" or root in _TOKEN_PARAMS:
            return 0
        if root == "blocks":
            return int(rest.partition(".")[0]) + 1
        return self.n_blocks + 1

    # ------------------------------------------------------------------ tokens

    def interpolate_pos_encoding(self, x: torch.Tensor, w: int, h: int) -> torch.Tensor:
        """Position embeddings ``(1, 1 + h/p * w/p, D)`` for an image of width ``w`` and height ``h`` pixels.

        ``w`` is the image *width* (``images.shape[-1]``), ``h`` its *height*. ``x`` is the token tensor the
        result is added to; only its dtype is used. See :func:`resample_pos_embed` for the interpolation.
        """
        p = self.patch_size
        if w % p != 0 or h % p != 0:
            raise ValueError(f"image size {h}x{w} (HxW) is not a multiple of the patch size {p}")
        pos_embed = resample_pos_embed(
            self.pos_embed,
            (h // p, w // p),
            interpolate_offset=self.interpolate_offset,
            interpolate_antialias=self.interpolate_antialias,
        )
        return pos_embed.to(x.dtype)

    def prepare_tokens_with_masks(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> tokens ``(B, 1 + R + N, D)``.

        ``masks`` (bool ``(B, N)``, True = masked) replaces the masked patch embeddings by ``mask_token``
        before position embeddings are added.
        """
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        B, _, H, W = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool:
                raise TypeError(f"masks must be a bool tensor, got {getattr(masks, 'dtype', type(masks))}")
            if tuple(masks.shape) != tuple(x.shape[:2]):
                raise ValueError(f"masks must have shape (B, N)={tuple(x.shape[:2])}, got {tuple(masks.shape)}")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(B, -1, -1).to(x.dtype), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, W, H)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(B, -1, -1).to(x.dtype), x[:, 1:]), dim=1)
        return x

    def _output_dict(self, x: torch.Tensor, masks: torch.Tensor | None) -> dict:
        x_norm = self.norm(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : 1 + r],
            "x_norm_patchtokens": x_norm[:, 1 + r :],
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
        for blk in self.blocks:
            x = blk(x, shapes)
        return [self._output_dict(t, m) for t, m in zip(unpack_crops(x, shapes), masks_list)]

    def forward_features(
        self,
        x: torch.Tensor | Sequence[torch.Tensor],
        masks: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    ) -> dict | list[dict]:
        """Normalised CLS/register/patch tokens (dict), or a list of dicts when ``x`` is a list of batches."""
        if isinstance(x, (list, tuple)):
            if masks is not None and not isinstance(masks, (list, tuple)):
                raise TypeError("when x is a list of image batches, masks must be a list (or None)")
            return self.forward_features_list(x, masks)
        if isinstance(masks, (list, tuple)):
            raise TypeError("masks is a list but x is a single tensor; pass x as a list too")
        tokens = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            tokens = blk(tokens)
        return self._output_dict(tokens, masks)

    def forward(self, x, masks=None, is_training: bool = False):
        """``is_training``: the ``forward_features`` output; else ``head(x_norm_clstoken)`` (per batch for lists)."""
        out = self.forward_features(x, masks)
        if is_training:
            return out
        if isinstance(out, list):
            return [self.head(o["x_norm_clstoken"]) for o in out]
        return self.head(out["x_norm_clstoken"])

    def _block_indices(self, n: int | Sequence[int]) -> list[int]:
        return block_indices(n, len(self.blocks))

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ):
        """Outputs of the last ``n`` blocks (int) or of the listed blocks, in block order.

        Returns a tuple of patch tokens ``(B, N, D)`` (``(B, D, h, w)`` with ``reshape``), or with
        ``return_class_token`` a tuple of ``(patch_tokens, cls_token)`` pairs. ``norm`` applies the final
        LayerNorm to each output. Register tokens are dropped.
        """
        take = self._block_indices(n)
        B, _, H, W = x.shape
        tokens = self.prepare_tokens_with_masks(x)
        outputs = []
        for i, blk in enumerate(self.blocks[: take[-1] + 1]):
            tokens = blk(tokens)
            if i in take:
                outputs.append(self.norm(tokens) if norm else tokens)
        class_tokens = [out[:, 0] for out in outputs]
        patch_tokens = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            p = self.patch_size
            patch_tokens = [
                out.reshape(B, H // p, W // p, -1).permute(0, 3, 1, 2).contiguous() for out in patch_tokens
            ]
        if return_class_token:
            return tuple(zip(patch_tokens, class_tokens))
        return tuple(patch_tokens)

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention probabilities ``(B, heads, T, T)`` of the last block, token order ``[cls, regs, patches]``."""
        tokens = self.prepare_tokens_with_masks(x)
        for blk in self.blocks[:-1]:
            tokens = blk(tokens)
        last = self.blocks[-1]
        return last.attn.attention_probs(last.norm1(tokens))
