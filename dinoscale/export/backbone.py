"""What every exporter needs to know about a backbone: its architecture, read off the module, and its weights
with the parameters a target library always has.

A :class:`~dinoscale.models.vit.DinoVisionTransformer` does not keep its constructor arguments; ``BackboneSpec``
reads them back from the module (widths, biases, LayerScale, registers, position-embedding interpolation).
Hugging Face's ``Dinov2Model`` and timm's ``vit_*_dinov2`` models always have LayerScale and biases in the
attention output and the FFN: :func:`export_state_dict` writes those our backbone lacks with their identity
values (LayerScale 1, bias 0), so the target computes the same function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dinoscale.models.vit import DinoVisionTransformer, LayerScale, SwiGLUFFN


class ExportError(ValueError):
    """A backbone cannot be exported to the requested target, or the output cannot be written."""


@dataclass(frozen=True)
class BackboneSpec:
    """The architecture of a DinoVisionTransformer, as the exporters need it."""

    img_size: int
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    ffn_layer: str  # "mlp" or "swiglu"
    ffn_hidden: int  # hidden width of the FFN (SwiGLU: of each of its two input projections)
    num_register_tokens: int
    qkv_bias: bool
    proj_bias: bool
    ffn_bias: bool
    layerscale: bool
    interpolate_offset: float
    interpolate_antialias: bool

    @property
    def grid_size(self) -> int:
        """Side of the patch grid the position embedding is learned for."""
        return self.img_size // self.patch_size


def backbone_spec(model: torch.nn.Module) -> BackboneSpec:
    """The architecture of ``model``; ExportError for anything but a DinoVisionTransformer."""
    if not isinstance(model, DinoVisionTransformer):
        raise ExportError(f"can only export a DinoVisionTransformer backbone, got {type(model).__name__}")
    block = model.blocks[0]
    mlp = block.mlp
    swiglu = isinstance(mlp, SwiGLUFFN)
    img_h, img_w = model.patch_embed.img_size
    if img_h != img_w:
        raise ExportError(f"the position embedding grid must be square, got an image size of {img_h}x{img_w}")
    return BackboneSpec(
        img_size=img_h,
        patch_size=model.patch_size,
        in_chans=model.patch_embed.in_chans,
        embed_dim=model.embed_dim,
        depth=model.n_blocks,
        num_heads=model.num_heads,
        ffn_layer="swiglu" if swiglu else "mlp",
        ffn_hidden=mlp.w3.in_features if swiglu else mlp.fc1.out_features,
        num_register_tokens=model.num_register_tokens,
        qkv_bias=block.attn.qkv.bias is not None,
        proj_bias=block.attn.proj.bias is not None,
        ffn_bias=(mlp.w3 if swiglu else mlp.fc2).bias is not None,
        layerscale=isinstance(block.ls1, LayerScale),
        interpolate_offset=float(model.interpolate_offset),
        interpolate_antialias=bool(model.interpolate_antialias),
    )


def export_state_dict(model: DinoVisionTransformer) -> dict[str, torch.Tensor]:
    """The backbone's weights (official layout, float32, CPU) plus identity LayerScale / zero biases where the
    backbone has none (the function is unchanged; the targets always hold these parameters)."""
    spec = backbone_spec(model)
    state = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
    dim = spec.embed_dim
    ffn_layers = ("w12", "w3") if spec.ffn_layer == "swiglu" else ("fc1", "fc2")
    for i in range(spec.depth):
        block = f"blocks.{i}"
        if not spec.layerscale:
            state[f"{block}.ls1.gamma"] = torch.ones(dim)
            state[f"{block}.ls2.gamma"] = torch.ones(dim)
        if not spec.proj_bias:
            state[f"{block}.attn.proj.bias"] = torch.zeros(dim)
        if not spec.ffn_bias:
            for name in ffn_layers:
                state[f"{block}.mlp.{name}.bias"] = torch.zeros(state[f"{block}.mlp.{name}.weight"].shape[0])
    return state
