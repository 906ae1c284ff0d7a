"""torch.hub entry points, with the names and signatures of upstream facebookresearch/dinov2's hub.

    torch.hub.load(REPO, "dinov2_vits14")                     # the released weights (downloaded once)
    torch.hub.load(REPO, "dinov2_vits14", pretrained=False)   # random weights
    torch.hub.load(REPO, "dinov2_vitb14", weights="hf-dinov2-base/")  # a path, URL or folder in any layout
    torch.hub.load(REPO, "dinov2_vits14_reg_lc", layers=1)    # released backbone + ImageNet-1k linear head
    torch.hub.load(REPO, "dinov3_vitb16", weights="dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth")  # DINOv3

Backbones: ``dinov2_vit{s,b,l,g}14`` and ``dinov2_vit{s,b,l,g}14_reg``, ``(*, pretrained=True,
weights="LVD142M", **kwargs)``; linear classifiers: the same names + ``_lc``, ``(*, layers=4, pretrained=True,
weights="IMAGENET1K", **kwargs)`` returning logits over the 1000 ImageNet classes. ``weights`` also takes
``"official"`` or a path / URL / state dict (official, timm, Hugging Face or dinoscale layout); ``kwargs``
override the release's DinoVisionTransformer arguments (see ``dinoscale.hub.zoo`` and
``dinoscale.hub.classifiers``).

DINOv3 backbones: ``dinov3_vits16``, ``dinov3_vits16plus``, ``dinov3_vitb16``, ``dinov3_vitl16``,
``dinov3_vitl16plus``, ``dinov3_vith16plus``, ``dinov3_vit7b16``, ``(*, pretrained=True, weights="LVD1689M",
check_hash=False, **kwargs)`` as upstream facebookresearch/dinov3's hub; ``weights`` takes a path, URL or state
dict in the official, Hugging Face or timm layout. Meta distributes the DINOv3 weights through signed URLs: the
release tags read the file from torch.hub's cache, and the error without it says where to put it.

Released files are cached in ``torch.hub.get_dir()/checkpoints/`` (the same files upstream's hub downloads):
without network, put the file there; the error raised offline names the URL and the exact path.
"""

dependencies = ["torch", "safetensors"]

from dinoscale.hub import (  # noqa: E402,F401  (torch.hub reads the names defined in this module)
    dinov2_vitb14,
    dinov2_vitb14_lc,
    dinov2_vitb14_reg,
    dinov2_vitb14_reg_lc,
    dinov2_vitg14,
    dinov2_vitg14_lc,
    dinov2_vitg14_reg,
    dinov2_vitg14_reg_lc,
    dinov2_vitl14,
    dinov2_vitl14_lc,
    dinov2_vitl14_reg,
    dinov2_vitl14_reg_lc,
    dinov2_vits14,
    dinov2_vits14_lc,
    dinov2_vits14_reg,
    dinov2_vits14_reg_lc,
    dinov3_vit7b16,
    dinov3_vitb16,
    dinov3_vith16plus,
    dinov3_vitl16,
    dinov3_vitl16plus,
    dinov3_vits16,
    dinov3_vits16plus,
)
