"""Seeing what a representation keeps: a representation-conditioned diffusion model (RCDM).

RCDM (Bordes et al. 2022, "High Fidelity Visualization of What Your Self-Supervised Representation Knows
About"; MSN's figures use it) trains a generator to produce images from a *frozen* backbone's representation
``r = f(x0)`` of them. Samples conditioned on one image's ``r`` with different noise show what ``r`` keeps
(what all samples share) and what it throws away (what varies between them).

The generator is a DDPM (``diffusers``' ``DDPMScheduler``, cosine schedule, v-prediction) on the images
scaled to [-1, 1]::

    t ~ U{0, ..., T-1},  eps ~ N(0, I),  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0,   loss = || v - v_theta(x_t, t, r) ||^2

and samples are drawn with DDIM (``DDIMScheduler``, eta 0: the starting noise alone decides a sample).
v rather than eps: at high noise, v is (minus) the clean image, the conditional mean the representation
pins down early in training, whereas the eps-model's image estimate ``(x_t - sqrt(1 - abar_t) eps_theta) /
sqrt(abar_t)`` blows its errors up. On Fashion-MNIST after 300 CPU steps, eps gave noise, v garments.

The network is ``diffusers``' ``UNet2DModel`` with ``class_embed_type="identity"``: the representation goes
through ``LayerNorm`` and a linear map to the time-embedding width and is added to the timestep embedding,
``emb = TimestepEmbedding(t) + W LN(r)``; with ``resnet_time_scale_shift="scale_shift"`` every ResNet block
turns ``emb`` into a per-channel scale and shift of its GroupNorm output, ``h = GN(h) (1 + s(emb)) + b(emb)``:
the adaptive group norm that RCDM takes from ADM to condition on ``r``. It is the cheapest clean choice:
``UNet2DConditionModel`` with ``r`` as a one-token ``encoder_hidden_states`` would need cross-attention blocks,
and a cross-attention over a single token has softmax weight 1, so it only adds the same vector
``W_o W_v r`` at every position (a shift without the scale) at the cost of attention layers at every level.

Images: Fashion-MNIST's 28 px are kept as they are (``image_size=28``: three UNet levels of 28, 14 and 7
px, no padding to 32 and no pixels spent on an empty border); another ``image_size`` resizes them.
A trained decoder is saved as ``decoder.safetensors`` (weights) and ``decoder.json`` (its constructor
arguments and what it was trained on) in one directory, so tools can reuse it.

``diffusers`` is an optional dependency (``pip install -e ".[viz]"``), imported only where it is needed.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dinoscale.device import autocast, inference_autocast_dtype

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "decoder.safetensors"
ARGS_NAME = "decoder.json"


def require_diffusers():
    """The ``diffusers`` module, or an ImportError that says how to install it."""
    try:
        import diffusers
    except ImportError as exc:
        raise ImportError(
            "the RCDM decoder needs diffusers: pip install -e \".[viz]\" (or pip install 'diffusers>=0.30')"
        ) from exc
    return diffusers


class RCDMDecoder(nn.Module):
    """``v_theta(x_t, t, r)``: a small ``UNet2DModel`` conditioned on a representation ``r`` (see the module doc).

    Args:
        cond_dim: width D of the representations.
        image_size: side of the square images (a multiple of ``2 ** (len(block_out_channels) - 1)``).
        in_channels: image channels (1 for Fashion-MNIST).
        block_out_channels: UNet width per level (one downsampling between levels).
        layers_per_block: ResNet blocks per level on the way down (one more on the way up).
        attention_levels: per level, whether its blocks have self-attention (and the middle block has
            attention when any level has).
        attention_head_dim: channels per attention head.
        norm_num_groups: GroupNorm groups (must divide every width).
        num_train_timesteps, beta_schedule: the DDPM noise schedule (``DDPMScheduler`` arguments).
        prediction_type: what the UNet predicts: ``v_prediction`` (v, the default), ``epsilon`` or ``sample``
            (x0).
    """

    def __init__(
        self,
        cond_dim: int,
        *,
        image_size: int = 28,
        in_channels: int = 1,
        block_out_channels: Sequence[int] = (16, 32, 64),
        layers_per_block: int = 1,
        attention_levels: Sequence[bool] = (False, False, True),
        attention_head_dim: int = 32,
        norm_num_groups: int = 8,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        prediction_type: str = "v_prediction",
    ) -> None:
        super().__init__()
        diffusers = require_diffusers()
        block_out_channels = tuple(int(c) for c in block_out_channels)
        attention_levels = tuple(bool(a) for a in attention_levels)
        if len(attention_levels) != len(block_out_channels):
            raise ValueError(
                f"attention_levels {attention_levels} needs one entry per level of block_out_channels "
                f"{block_out_channels}"
            )
        factor = 2 ** (len(block_out_channels) - 1)
        if image_size % factor:
            raise ValueError(
                f"image_size {image_size} must be a multiple of {factor} for {len(block_out_channels)} levels"
            )
        self.cond_dim = int(cond_dim)
        self.image_size = int(image_size)
        self.in_channels = int(in_channels)
        self.num_train_timesteps = int(num_train_timesteps)
        self.beta_schedule = beta_schedule
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")
        self.prediction_type = prediction_type
        self._args = {
            "cond_dim": self.cond_dim, "image_size": self.image_size, "in_channels": self.in_channels,
            "block_out_channels": list(block_out_channels), "layers_per_block": int(layers_per_block),
            "attention_levels": list(attention_levels), "attention_head_dim": int(attention_head_dim),
            "norm_num_groups": int(norm_num_groups), "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": beta_schedule, "prediction_type": prediction_type,
        }
        time_embed_dim = 4 * block_out_channels[0]  # UNet2DModel's default width of the timestep embedding
        self.unet = diffusers.UNet2DModel(
            sample_size=image_size,
            in_channels=in_channels,
            out_channels=in_channels,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels)),
            add_attention=any(attention_levels),
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            resnet_time_scale_shift="scale_shift",
            class_embed_type="identity",
            time_embedding_dim=time_embed_dim,
        )
        # LayerNorm first: backbones' feature scales differ (a random init's CLS vs a trained one's).
        self.cond_proj = nn.Sequential(nn.LayerNorm(self.cond_dim), nn.Linear(self.cond_dim, time_embed_dim))

    def args(self) -> Dict[str, Any]:
        """The constructor arguments (JSON-serialisable): ``RCDMDecoder(**decoder.args())`` rebuilds it."""
        return dict(self._args)

    def noise_scheduler(self):
        """The training schedule: a ``DDPMScheduler`` with the decoder's prediction type, x0 clipped to [-1, 1]."""
        diffusers = require_diffusers()
        return diffusers.DDPMScheduler(
            num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule,
            prediction_type=self.prediction_type, clip_sample=True,
        )

    def sampling_scheduler(self, num_inference_steps: int):
        """DDIM on the training schedule, ``num_inference_steps`` steps spaced from the last timestep
        ("trailing": the first step starts from pure noise)."""
        diffusers = require_diffusers()
        scheduler = diffusers.DDIMScheduler.from_config(self.noise_scheduler().config, timestep_spacing="trailing")
        scheduler.set_timesteps(num_inference_steps)
        return scheduler

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, representations: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) noisy images, (B,) timesteps, (B, D) representations -> (B, C, H, W) prediction
        (of v, eps or x0: ``prediction_type``)."""
        if representations.ndim != 2 or representations.shape[1] != self.cond_dim:
            raise ValueError(
                f"representations must be (B, {self.cond_dim}), got {tuple(representations.shape)}"
            )
        cond = self.cond_proj(representations.to(self.cond_proj[1].weight.dtype))
        return self.unet(noisy, timesteps, class_labels=cond).sample


# --------------------------------------------------------------------------------------
# Data: decoder images and backbone representations
# --------------------------------------------------------------------------------------


def decoder_images(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """(N, H, W), (N, 1, H, W) or (N, 3, H, W) images (uint8, or float in [0, 1]) -> (N, 1, S, S) in [-1, 1].

    Colour is averaged to gray (Fashion-MNIST's three channels are equal); another size is reached by
    a bilinear (antialiased) resize.
    """
    x = images
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, H, W) or (N, 1|3, H, W), got {tuple(images.shape)}")
    if x.dtype == torch.uint8:  # integer sum, one division: equal channels give exactly gray / 255
        x = x.sum(dim=1, keepdim=True, dtype=torch.float32) / (255.0 * x.shape[1])
    else:
        x = x.float().mean(dim=1, keepdim=True)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return (x.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> uint8 [0, 255] (the inverse of ``decoder_images``' scaling)."""
    return ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def backbone_input_size(model: nn.Module) -> int:
    """The image side a backbone was built for (``patch_embed.img_size``), else 28 (Fashion-MNIST's)."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(size, (tuple, list)):
        size = size[0]
    return int(size) if size else 28


def backbone_representations(
    model: nn.Module,
    dataset,
    *,
    image_size: Optional[int] = None,
    batch_size: int = 256,
    device: Optional[torch.device] = None,
    autocast_dtype: Any = "fp32",
    progress: bool = False,
) -> torch.Tensor:
    """The frozen backbone's CLS representation (N, D) of every sample of ``dataset``, in dataset order.

    ``eval.extract.extract_features`` with the evaluation transform at ``image_size`` (default: the
    backbone's own input size) without cutting borders (``crop_ratio=1``: Fashion-MNIST's garments touch
    them). fp32 by default: the decoder is trained on these exact vectors and later conditioned on them.
    """
    from dinoscale.eval.extract import extract_features
    from dinoscale.eval.transforms import eval_transform

    size = image_size or backbone_input_size(model)
    out = extract_features(
        model, dataset, transform=eval_transform(size, model.patch_size, crop_ratio=1.0),
        batch_size=batch_size, device=device, autocast_dtype=autocast_dtype, progress=progress,
        desc="representations",
    )
    if out["num_skipped"]:
        raise RuntimeError(f"{out['num_skipped']} image(s) could not be read; RCDM pairs need every image")
    return out["cls"]


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def diffusion_loss(
    decoder: RCDMDecoder,
    scheduler,
    x0: torch.Tensor,
    representations: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    autocast_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """The DDPM loss ``mean || target - f_theta(x_t, t, r) ||^2`` of one batch, the target being the decoder's
    ``prediction_type`` (eps, v or x0); timesteps and noise are drawn from ``generator``."""
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    t, noise = t.to(x0.device), noise.to(x0.device)
    noisy = scheduler.add_noise(x0, noise, t)
    if decoder.prediction_type == "v_prediction":
        target = scheduler.get_velocity(x0, noise, t)
    else:
        target = noise if decoder.prediction_type == "epsilon" else x0
    with autocast(x0.device, autocast_dtype):
        pred = decoder(noisy, t, representations)
    return F.mse_loss(pred.float(), target)


def train_decoder(
    decoder: RCDMDecoder,
    images: torch.Tensor,
    representations: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    warmup_steps: int = 50,
    weight_decay: float = 0.0,
    seed: int = 0,
    autocast_dtype: Any = None,
    log_every: int = 0,
    callback: Optional[Callable[[int, float], None]] = None,
) -> List[float]:
    """Train ``decoder`` on (image, representation) pairs; returns the loss of every step.

    Args:
        images: (N, C, S, S) in [-1, 1] (``decoder_images``), on the decoder's device.
        representations: (N, D), the frozen backbone's representations of the same images.
        steps, batch_size: AdamW steps on batches drawn without replacement (a new permutation per pass).
        lr, warmup_steps: linear warm-up to ``lr``, then cosine decay to 0 at ``steps``.
        seed: the batches, timesteps and noise all come from one generator seeded with it.
        autocast_dtype: None = bf16 where the hardware has bf16 matmuls (``device.inference_autocast_dtype``),
            or a dtype / "fp32" / "bf16".
        log_every: log the mean loss every this many steps (0: never); ``callback(step, loss)`` after each.
    """
    if images.shape[0] != representations.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {representations.shape[0]} representations")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    device = images.device
    amp = inference_autocast_dtype(device, autocast_dtype)
    scheduler = decoder.noise_scheduler()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=weight_decay)

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    n = images.shape[0]
    order, position = torch.randperm(n, generator=generator), 0
    losses: List[float] = []
    decoder.train()
    start = time.perf_counter()
    for step in range(steps):
        if position + batch_size > n:
            order, position = torch.randperm(n, generator=generator), 0
        index = order[position : position + min(batch_size, n)].to(device)
        position += batch_size
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = diffusion_loss(decoder, scheduler, images[index], representations[index], generator, amp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if callback is not None:
            callback(step, losses[-1])
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            recent = losses[-log_every:]
            elapsed = time.perf_counter() - start
            logger.info(
                "rcdm step %d/%d loss %.4f (%.2f s/step)", step + 1, steps, sum(recent) / len(recent),
                elapsed / (step + 1),
            )
    decoder.eval()
    return losses


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------


@torch.no_grad()
def sample(
    decoder: RCDMDecoder,
    representations: torch.Tensor,
    noise: torch.Tensor,
    *,
    num_inference_steps: int = 50,
    autocast_dtype: Any = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """DDIM (eta 0) from ``noise`` (B, C, S, S) conditioned on ``representations`` (B, D) -> (B, C, S, S) in [-1, 1].

    Deterministic given the noise: the same noise and representation give the same image.
    """
    if noise.shape[0] != representations.shape[0]:
        raise ValueError(f"{noise.shape[0]} noise images but {representations.shape[0]} representations")
    expected = (decoder.in_channels, decoder.image_size, decoder.image_size)
    if tuple(noise.shape[1:]) != expected:
        raise ValueError(f"noise must be (B, {expected[0]}, {expected[1]}, {expected[2]}), got {tuple(noise.shape)}")
    device = next(decoder.parameters()).device
    amp = inference_autocast_dtype(device, autocast_dtype)
    was_training = decoder.training
    decoder.eval()
    out = []
    try:
        for start in range(0, noise.shape[0], batch_size):
            scheduler = decoder.sampling_scheduler(num_inference_steps)
            x = noise[start : start + batch_size].to(device).float()
            r = representations[start : start + batch_size].to(device)
            for t in scheduler.timesteps:
                with autocast(device, amp):
                    pred = decoder(x, t.expand(x.shape[0]).to(device), r)
                x = scheduler.step(pred.float(), t, x, eta=0.0).prev_sample
            out.append(x.clamp(-1.0, 1.0).cpu())
    finally:
        decoder.train(was_training)
    return torch.cat(out)


def sample_noise(decoder: RCDMDecoder, num_samples: int, seed: int) -> torch.Tensor:
    """(S, C, H, W) starting noise, sample ``s`` drawn from a generator seeded with ``seed + s``."""
    shape = (decoder.in_channels, decoder.image_size, decoder.image_size)
    generators = [torch.Generator().manual_seed(seed + s) for s in range(num_samples)]
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def samples_per_image(
    decoder: RCDMDecoder,
    representations: torch.Tensor,
    num_samples: int,
    *,
    seed: int = 0,
    num_inference_steps: int = 50,
    autocast_dtype: Any = None,
) -> torch.Tensor:
    """``num_samples`` samples per representation: (N, D) -> (N, S, C, H, W) in [-1, 1].

    Sample ``s`` of every image starts from the same noise (``sample_noise``), so within a column of a
    picture (and between decoders of one image size) only the representation differs.
    """
    n = representations.shape[0]
    noise = sample_noise(decoder, num_samples, seed)
    flat = sample(
        decoder, representations.repeat_interleave(num_samples, dim=0), noise.repeat(n, 1, 1, 1),
        num_inference_steps=num_inference_steps, autocast_dtype=autocast_dtype,
    )
    return flat.reshape(n, num_samples, *flat.shape[1:])


# --------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------


def save_decoder(decoder: RCDMDecoder, directory: str | Path, metadata: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``decoder.safetensors`` (weights) and ``decoder.json`` (``{"args": ..., "metadata": ...}``)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in decoder.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME))
    payload = {"args": decoder.args(), "metadata": metadata or {}}
    (directory / ARGS_NAME).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return directory


def load_decoder(directory: str | Path) -> Tuple[RCDMDecoder, Dict[str, Any]]:
    """(decoder in eval mode, metadata) from a directory written by ``save_decoder``."""
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (WEIGHTS_NAME, ARGS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found: not a decoder saved by save_decoder")
    payload = json.loads((directory / ARGS_NAME).read_text(encoding="utf-8"))
    decoder = RCDMDecoder(**payload["args"])
    decoder.load_state_dict(load_file(str(directory / WEIGHTS_NAME)), strict=True)
    decoder.eval()
    return decoder, payload.get("metadata", {})


# --------------------------------------------------------------------------------------
# The picture
# --------------------------------------------------------------------------------------


def grid_layout(
    num_rows: int, num_samples: Sequence[int], tile: int, *, gap: int = 2, group_gap: int = 10, header: int = 16
) -> Dict[str, Any]:
    """Pixel layout of ``sample_grid``: the real image, then one group of tiles per decoder.

    Width ``tile + sum_g (group_gap + S_g tile + (S_g - 1) gap)``, height ``header + R tile + (R - 1) gap``.
    Returns ``{"size": (width, height), "real": [x], "groups": [[x of each sample tile]], "rows": [y]}``.
    """
    x, groups = tile, []
    for s in num_samples:
        x += group_gap
        groups.append([x + k * (tile + gap) for k in range(s)])
        x += s * tile + (s - 1) * gap
    rows = [header + r * (tile + gap) for r in range(num_rows)]
    height = header + num_rows * tile + (num_rows - 1) * gap
    return {"size": (x, height), "real": [0], "groups": groups, "rows": rows}


def sample_grid(
    real: torch.Tensor,
    samples: Sequence[torch.Tensor],
    labels: Sequence[str],
    *,
    scale: int = 3,
    real_label: str = "image",
):
    """One picture: per row a real image, then per decoder (group, labelled on top) its samples of that image.

    Args:
        real: (R, 1, S, S) images in [-1, 1].
        samples: per decoder (R, S_g, 1, S, S) in [-1, 1] (``samples_per_image``).
        labels: per decoder, the header of its group.
        scale: every image is enlarged ``scale`` times (nearest neighbour).

    Returns ``(PIL image, grid_layout(...))``: gray tiles on white, layout as in ``grid_layout``.
    """
    from PIL import Image, ImageDraw, ImageFont

    if len(samples) != len(labels):
        raise ValueError(f"{len(samples)} sample groups but {len(labels)} labels")
    rows, size = real.shape[0], real.shape[-1]
    for s in samples:
        if s.shape[0] != rows or s.shape[-1] != size:
            raise ValueError(f"sample group of shape {tuple(s.shape)} does not match {rows} real images of {size} px")
    tile = size * scale
    layout = grid_layout(rows, [s.shape[1] for s in samples], tile)
    canvas = Image.new("L", layout["size"], color=255)

    def paste(image: torch.Tensor, x: int, y: int) -> None:
        pixels = to_uint8(image).reshape(size, size).numpy()
        canvas.paste(Image.fromarray(np.ascontiguousarray(pixels)).resize((tile, tile), Image.NEAREST), (x, y))

    for r, y in enumerate(layout["rows"]):
        paste(real[r], layout["real"][0], y)
        for group, xs in zip(samples, layout["groups"]):
            for k, x in enumerate(xs):
                paste(group[r, k], x, y)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((0, 2), real_label, fill=0, font=font)
    for label, xs in zip(labels, layout["groups"]):
        draw.text((xs[0], 2), label, fill=0, font=font)
    return canvas, layout
