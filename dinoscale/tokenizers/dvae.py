"""BEiT's visual tokenizer: a discrete VAE in the style of DALL-E's (Ramesh et al. 2021), one token per ViT patch.

Layout, for images ``(B, C, H, W)`` (normalised like the views the ViT sees) and ``p = patch_size``::

    encoder:  x -> logits (B, K, H/p, W/p)       a conv network; the downsampling by p is done in stages, one
                                                 per prime factor f of p (4 -> 2, 2; 7 -> 7; 16 -> 2, 2, 2, 2),
                                                 each a conv of kernel = stride = f after residual blocks
    tokens:   argmax_k logits -> (B, H/p * W/p)  row-major, the order of the ViT's patch tokens
    relaxed:  y = gumbel_softmax(logits, tau)    (B, K, h, w), soft one-hots; hard one-hots of the tokens at eval
    decoder:  z = sum_k y_k e_k (codebook e: K x D) -> (B, C, H, W)  the mirror of the encoder, nearest-neighbour
                                                 upsampling by each factor followed by a 3x3 conv

Training (``tools/train_tokenizer.py``, loss ``dinoscale.losses.dvae``) minimises the reconstruction error of
``decoder(gumbel_softmax(encoder(x), tau))`` plus a weighted KL divergence of ``softmax(logits)`` to the uniform
prior over the K tokens, with ``tau`` annealed by :func:`gumbel_temperature` (DALL-E: 1 to 1/16, cosine). No
normalisation layers: the encoder's output does not depend on the batch or on train/eval mode.

Checkpoint (:func:`save_tokenizer` / :func:`load_tokenizer`): a directory holding ``dvae.safetensors`` (the
state dict) and ``dvae.json`` (``{"class": "DiscreteVAE", "args": constructor arguments, ...}`` plus what the
training tool records: data, steps, final losses).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["DVAEEncoder", "DiscreteVAE", "gumbel_temperature", "load_tokenizer", "prime_factors", "save_tokenizer"]

WEIGHTS_NAME = "dvae.safetensors"
CONFIG_NAME = "dvae.json"


def prime_factors(n: int) -> list[int]:
    """The prime factors of ``n >= 1`` in increasing order, with repetition (``12 -> [2, 2, 3]``, ``1 -> []``)."""
    if n < 1:
        raise ValueError(f"prime_factors needs n >= 1, got {n}")
    factors, f = [], 2
    while f * f <= n:
        while n % f == 0:
            factors.append(f)
            n //= f
        f += 1
    return factors + ([n] if n > 1 else [])


class ResBlock(nn.Module):
    """``x + conv3x3(relu(conv3x3(relu(x))))``: a pre-activation residual block at constant width."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class DVAEEncoder(nn.Module):
    """Images ``(B, in_chans, H, W)`` -> token logits ``(B, vocab_size, H/patch_size, W/patch_size)``.

    What BEiT runs (frozen): :meth:`forward` gives the logits, :meth:`tokens` the token ids, row-major.
    """

    def __init__(self, *, in_chans: int, patch_size: int, vocab_size: int, hidden_dim: int, num_res_blocks: int):
        super().__init__()
        self.patch_size = patch_size
        self.vocab_size = vocab_size
        # Downsample first, then the residual blocks: no block runs at the full resolution, where it costs most.
        layers: list[nn.Module] = [nn.Conv2d(in_chans, hidden_dim, 3, padding=1)]
        for f in prime_factors(patch_size):
            layers.append(nn.Conv2d(hidden_dim, hidden_dim, kernel_size=f, stride=f))
            layers += [ResBlock(hidden_dim) for _ in range(num_res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(hidden_dim, vocab_size, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"the dVAE needs images whose sides are multiples of its patch size {self.patch_size}, "
                             f"got {h}x{w}")
        return self.layers(x)

    @torch.no_grad()
    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, h*w)`` long: the most likely token of each cell, row-major (the ViT's patch order)."""
        return self(x).argmax(dim=1).flatten(1)


class DVAEDecoder(nn.Module):
    """Codebook vectors ``(B, codebook_dim, h, w)`` -> images ``(B, in_chans, h*patch_size, w*patch_size)``."""

    def __init__(self, *, in_chans: int, patch_size: int, codebook_dim: int, hidden_dim: int, num_res_blocks: int):
        super().__init__()
        factors = list(reversed(prime_factors(patch_size)))
        layers: list[nn.Module] = [nn.Conv2d(codebook_dim, hidden_dim, 1)]
        layers += [ResBlock(hidden_dim) for _ in range(num_res_blocks)]
        for f in factors[:-1]:
            layers += [nn.Upsample(scale_factor=f, mode="nearest"), nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1)]
            layers += [ResBlock(hidden_dim) for _ in range(num_res_blocks)]
        # The last upsampling goes straight to the pixels (a 3x3 conv): again nothing wide at full resolution.
        layers += [nn.Upsample(scale_factor=factors[-1], mode="nearest")] if factors else []
        layers += [nn.ReLU(), nn.Conv2d(hidden_dim, in_chans, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)


class DiscreteVAE(nn.Module):
    """A DALL-E-style discrete VAE with ``vocab_size`` tokens, one per ``patch_size`` x ``patch_size`` cell.

    Args:
        in_chans: image channels.
        patch_size: side in pixels of the cell each token stands for (the ViT's patch size when the tokenizer
            sees the ViT's crop; BEiT: 8 on a 112-px copy of a 224-px crop for 16-px patches).
        vocab_size: K, the number of visual tokens (BEiT: 8192).
        hidden_dim: width of the encoder's and decoder's convolutions.
        codebook_dim: D, the size of each token's codebook vector (the decoder's input).
        num_res_blocks: residual blocks per resolution, in the encoder and in the decoder.
    """

    def __init__(self, *, in_chans: int = 3, patch_size: int = 4, vocab_size: int = 512, hidden_dim: int = 64,
                 codebook_dim: int = 64, num_res_blocks: int = 1):
        super().__init__()
        for name, value in (("in_chans", in_chans), ("patch_size", patch_size), ("vocab_size", vocab_size),
                            ("hidden_dim", hidden_dim), ("codebook_dim", codebook_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DiscreteVAE needs a positive int {name}, got {value!r}")
        if vocab_size < 2:
            raise ValueError(f"DiscreteVAE needs at least 2 tokens, got vocab_size={vocab_size}")
        if not isinstance(num_res_blocks, int) or num_res_blocks < 0:
            raise ValueError(f"DiscreteVAE needs num_res_blocks >= 0, got {num_res_blocks!r}")
        self.args = dict(in_chans=in_chans, patch_size=patch_size, vocab_size=vocab_size, hidden_dim=hidden_dim,
                         codebook_dim=codebook_dim, num_res_blocks=num_res_blocks)
        self.patch_size = patch_size
        self.vocab_size = vocab_size
        self.encoder = DVAEEncoder(in_chans=in_chans, patch_size=patch_size, vocab_size=vocab_size,
                                   hidden_dim=hidden_dim, num_res_blocks=num_res_blocks)
        self.codebook = nn.Embedding(vocab_size, codebook_dim)
        self.decoder = DVAEDecoder(in_chans=in_chans, patch_size=patch_size, codebook_dim=codebook_dim,
                                   hidden_dim=hidden_dim, num_res_blocks=num_res_blocks)

    def decode(self, one_hot: torch.Tensor) -> torch.Tensor:
        """Soft or hard one-hots ``(B, K, h, w)`` -> images: the decoder of ``sum_k y_k e_k``."""
        return self.decoder(torch.einsum("bkhw,kd->bdhw", one_hot, self.codebook.weight))

    def decode_tokens(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Token ids ``(B, h*w)`` (row-major) -> images."""
        one_hot = F.one_hot(tokens.reshape(-1, *grid), self.vocab_size).permute(0, 3, 1, 2)
        return self.decode(one_hot.to(self.codebook.weight.dtype))

    def forward(self, x: torch.Tensor, temperature: float, hard: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reconstruction, logits)`` through the Gumbel-softmax relaxation at ``temperature`` (noise from
        torch's global RNG); ``hard=True`` passes hard one-hots forward (straight-through gradients)."""
        if temperature <= 0:
            raise ValueError(f"the Gumbel-softmax temperature must be positive, got {temperature}")
        logits = self.encoder(x)
        relaxed = F.gumbel_softmax(logits.float(), tau=temperature, hard=hard, dim=1)
        return self.decode(relaxed.to(logits.dtype)), logits

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder's image of ``x``'s tokens (hard, no noise): what the tokens keep of the image."""
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return self.decode_tokens(self.encoder.tokens(x), (h, w))


def gumbel_temperature(step: int, total_steps: int, start: float = 1.0, end: float = 1.0 / 16) -> float:
    """The Gumbel-softmax temperature at ``step`` of ``total_steps``: a cosine from ``start`` to ``end``
    (DALL-E anneals 1 -> 1/16 this way), ``end`` from ``total_steps`` on::

        tau(s) = end + (start - end) * (1 + cos(pi * min(s, T) / T)) / 2
    """
    if start <= 0 or end <= 0:
        raise ValueError(f"Gumbel temperatures must be positive, got start={start}, end={end}")
    if total_steps <= 0:
        return end
    progress = min(max(step, 0), total_steps) / total_steps
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def save_tokenizer(model: DiscreteVAE, directory: str | Path, **metadata: Any) -> Path:
    """Write ``model`` to ``directory`` (``dvae.safetensors`` + ``dvae.json`` with its constructor arguments and
    ``metadata``, e.g. how it was trained); returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME))
    info = {"class": type(model).__name__, "args": dict(model.args), **metadata}
    (directory / CONFIG_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return directory


def _tokenizer_files(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    weights, config = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    if not weights.is_file() or not config.is_file():
        raise FileNotFoundError(
            f"no dVAE tokenizer at {path}: expected a directory holding {WEIGHTS_NAME} and {CONFIG_NAME}, as "
            "tools/train_tokenizer.py writes it (e.g. python tools/train_tokenizer.py --config "
            "configs/methods/beit_fmnist.yaml)"
        )
    return weights, config


def load_tokenizer(path: str | Path) -> DiscreteVAE:
    """The :class:`DiscreteVAE` saved at ``path`` (its directory, or a file in it), on the CPU, in eval mode."""
    weights, config = _tokenizer_files(path)
    info = json.loads(config.read_text())
    if info.get("class") != DiscreteVAE.__name__:
        raise ValueError(f"{config} describes a {info.get('class')!r}, not a {DiscreteVAE.__name__}")
    model = DiscreteVAE(**info["args"])
    model.load_state_dict(load_file(str(weights), device="cpu"), strict=True)
    return model.eval()
