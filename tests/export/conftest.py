"""Tiny random backbones for the export tests, and one real (tiny) training run directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dinoscale.config import load_config
from dinoscale.models.vit import DinoVisionTransformer
from dinoscale.train import loop
from tests.methods.conftest import TINY

FMNIST = Path("/usr/share/datasets/fashion-mnist")

# The architectures the tests export. "release" is the original DINOv2 release's position-embedding resize
# (offset 0.1), "registers" the register release's (exact grid, antialiased); "bare" has no LayerScale and no
# attention-output/FFN biases, a SwiGLU FFN of a non-standard width and 2 registers (generic names everywhere).
BACKBONES = {
    "release": dict(interpolate_offset=0.1, interpolate_antialias=False, init_values=1e-5),
    "registers": dict(num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True, init_values=1e-5),
    "bare": dict(
        ffn_layer="swiglu", mlp_ratio=3.0, init_values=None, proj_bias=False, ffn_bias=False, qkv_bias=False,
        num_register_tokens=2, interpolate_offset=0.0, interpolate_antialias=True,
    ),
}


def tiny_backbone(seed: int = 0, **kwargs) -> DinoVisionTransformer:
    """A depth-2, width-32 ViT with non-trivial random weights (unit LayerScale, zero biases would hide a
    transposed or misnamed parameter)."""
    args = dict(img_size=56, patch_size=14, embed_dim=32, depth=2, num_heads=2)
    args.update(kwargs)
    model = DinoVisionTransformer(**args).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            centre = 1.0 if p.ndim == 1 and ("norm" in name or "gamma" in name) else 0.0
            p.copy_(centre + 0.2 * torch.randn(p.shape, generator=gen))
    return model


def assert_close_tokens(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-4) -> None:
    """Shapes equal and every element within ``atol`` (the export tests' 1e-4 max abs difference)."""
    torch.testing.assert_close(torch.as_tensor(actual), torch.as_tensor(expected), rtol=0, atol=atol)


def assert_same_tokens(tokens: torch.Tensor, out: dict, num_registers: int) -> None:
    """``tokens`` ``(B, 1 + R + N, D)`` in the ``[cls, registers, patches]`` layout of Hugging Face's
    ``last_hidden_state`` and timm's ``forward_features`` against our ``forward_features`` dict."""
    assert_close_tokens(tokens[:, 0], out["x_norm_clstoken"])
    assert_close_tokens(tokens[:, 1 : 1 + num_registers], out["x_norm_regtokens"])
    assert_close_tokens(tokens[:, 1 + num_registers :], out["x_norm_patchtokens"])


# A real training run, as small as the method tests make it: config.yaml, checkpoints/step_*, export/.
TINY_RUN = TINY + [
    "model.layerscale=null", "model.interpolate_offset=0.1",  # the quickstart's backbone: no LayerScale
    "train.max_steps=2", "train.checkpoint_every=2",
]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A 2-step quickstart run (DINOv2 loss, no LayerScale, release interpolation) on Fashion-MNIST."""
    if not FMNIST.exists():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    out = tmp_path_factory.mktemp("run")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = loop.train(load_config("quickstart", TINY_RUN + [f"train.output_dir={out}"]))
    finally:
        torch.set_num_threads(previous)
    assert result.status == "finished" and result.step == 2
    return out
