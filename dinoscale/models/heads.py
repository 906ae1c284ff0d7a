"""Projection heads for self-distillation.

``DINOHead`` follows the DINO / DINOv2 head: an MLP down to a bottleneck, L2 normalisation,
then a weight-normalised linear layer whose rows act as ``out_dim`` prototypes.

Parameter names match DINOv2 checkpoints: ``mlp.0``, ``mlp.2``, ``mlp.4`` (for the default
3-layer head without batch norm) and ``last_layer.weight_g`` / ``last_layer.weight_v``.

Freezing the last layer: DINO keeps the prototypes fixed during the first
``freeze_last_layer_epochs`` because a moving prototype layer early in training makes
collapse more likely. The parameters to freeze are exactly those whose name contains
``"last_layer"``; use :func:`is_last_layer_param` to match them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DINOHead", "WeightNormLinear", "is_last_layer_param"]


def is_last_layer_param(name: str) -> bool:
    """True for parameters of a head's prototype layer (``last_layer.weight_g/weight_v``).

    These are the parameters whose gradient is dropped during ``freeze_last_layer_epochs``.
    """
    return "last_layer" in name


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation, ``W = g * V / ||V||``.

    Row ``k`` of the effective weight is ``w_k = g_k * v_k / ||v_k||_2``, i.e. the norm is taken
    over the input dimension, as ``torch.nn.utils.weight_norm(linear, dim=0)`` does. The
    parameters are called ``weight_g`` (shape ``(out_features, 1)``) and ``weight_v`` (shape
    ``(out_features, in_features)``) like the old ``weight_norm`` hook names them, so DINO
    checkpoints load unchanged.

    The normalisation is computed inside ``forward`` rather than with a forward-pre-hook or a
    parametrization: wrappers that shard modules from the outside (FSDP2) would otherwise see a
    derived ``weight`` attribute that is not a parameter.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(
                f"WeightNormLinear needs positive sizes, got in_features={in_features}, out_features={out_features}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.weight_g = nn.Parameter(torch.empty(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Direction: nn.Linear's default init (what DINOv2 gets, since it wraps a fresh
        # nn.Linear). Magnitude: g = 1, so every prototype starts with unit norm.
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        nn.init.ones_(self.weight_g)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight ``g * v / ||v||`` of shape ``(out_features, in_features)``."""
        return self.weight_g * self.weight_v / torch.linalg.vector_norm(self.weight_v, dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _build_mlp(
    nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, use_bn: bool, bias: bool
) -> nn.Module:
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(nlayers - 1):
        layers.append(nn.Linear(dim, hidden_dim, bias=bias))
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.GELU())
        dim = hidden_dim
    layers.append(nn.Linear(dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """DINO projection head: ``last_layer(normalize(mlp(x)))``.

    Args:
        in_dim: backbone feature size.
        out_dim: number of prototypes ``K`` (the softmax size of the DINO / iBOT losses).
        use_bn: add BatchNorm1d after each hidden Linear (changes the ``mlp.*`` indices).
        nlayers: number of Linear layers in the MLP (>= 1). With 1 the MLP is a single
            ``nn.Linear`` named ``mlp``.
        hidden_dim: width of the hidden layers.
        bottleneck_dim: size of the L2-normalised bottleneck fed to the prototypes.
        mlp_bias: use biases in the MLP Linear layers.

    Input ``(..., in_dim)``, output ``(..., out_dim)`` logits (before the temperature).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
    ):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead needs nlayers >= 1, got {nlayers}")
        for arg_name, value in (
            ("in_dim", in_dim),
            ("out_dim", out_dim),
            ("hidden_dim", hidden_dim),
            ("bottleneck_dim", bottleneck_dim),
        ):
            if value <= 0:
                raise ValueError(f"DINOHead needs a positive {arg_name}, got {value}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.bottleneck_dim = bottleneck_dim
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim, use_bn=use_bn, bias=mlp_bias)
        self.mlp.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW must not decay: the biases and the prototypes' magnitudes ``last_layer.weight_g``
        (as in DINOv2, the weights of an MLP batch norm are decayed)."""
        biases = {name for name, _ in self.named_parameters() if name.rpartition(".")[2] == "bias"}
        return biases | {"last_layer.weight_g"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        # 1e-12 underflows to 0 in fp16, which would divide by zero for a zero vector.
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, p=2, dim=-1, eps=eps)
        return self.last_layer(x)
