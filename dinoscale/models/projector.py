"""Projection MLPs with batch normalisation over the global batch (SimCLR, Barlow Twins, MSN).

SimCLR, Barlow Twins and MSN put a small MLP with batch normalisation on top of the backbone and train it
with batch statistics synchronised across GPUs (``SyncBatchNorm``); per-GPU statistics change the objective
(SimCLR calls it "global BN"). ``torch.nn.SyncBatchNorm`` only runs on accelerators, so
:class:`GlobalBatchNorm1d` does the same with :func:`dinoscale.distributed.all_gather_with_grad` and works
on CPU (gloo) as well. It is an exact no-op wrapper of plain batch norm in a single process.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn

from dinoscale import distributed

__all__ = ["GlobalBatchNorm1d", "ProjectionMLP"]

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class GlobalBatchNorm1d(nn.Module):
    """Batch norm of ``(n, dim)`` features with the statistics of the batch of all ranks::

        mean = 1/N sum_b x_b            var = 1/N sum_b (x_b - mean)^2        (N = global batch, biased var)
        y    = weight * (x - mean) / sqrt(var + eps) + bias

    The statistics always come from the current batch (no running averages): projection heads are only used
    in training, since evaluation and export use the backbone. An EMA teacher's projector therefore
    normalises its own batch too, as ``SyncBatchNorm`` in training mode does.

    Two all-gathers per call (the sums, then the squared deviations, so the variance does not suffer from
    the cancellation of ``E[x^2] - mean^2``) carry gradients, so N ranks holding B samples each compute
    exactly the single-process function of the N*B samples. Computed in float32, returned in the input dtype.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        if num_features <= 0:
            raise ValueError(f"GlobalBatchNorm1d needs a positive num_features, got {num_features}")
        if eps <= 0:
            raise ValueError(f"GlobalBatchNorm1d needs a positive eps, got {eps}")
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"GlobalBatchNorm1d expects (batch, {self.num_features}) features, got {tuple(x.shape)}")
        if x.shape[0] * distributed.get_world_size() < 2:  # checked without a device sync
            raise ValueError(f"GlobalBatchNorm1d needs at least 2 samples in the global batch, got {tuple(x.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            x32 = x.float()
            # Sum and count in one gather; the count makes ranks with different batch sizes exact too.
            stats = torch.cat([x32.sum(dim=0), x32.new_tensor([x32.shape[0]])]).unsqueeze(0)
            totals = distributed.all_gather_with_grad(stats).sum(dim=0)
            count = totals[-1]
            mean = totals[:-1] / count
            centered = x32 - mean
            var = distributed.all_gather_with_grad(centered.square().sum(dim=0, keepdim=True)).sum(dim=0) / count
            y = centered * torch.rsqrt(var + self.eps)
            if self.affine:
                y = y * self.weight.float() + self.bias.float()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


class ProjectionMLP(nn.Module):
    """``Linear -> GlobalBatchNorm1d -> activation`` for each hidden layer, then a last ``Linear``.

    Args:
        in_dim: backbone feature size.
        hidden_dims: widths of the hidden layers (may be empty: a single linear layer).
        out_dim: output size.
        activation: ``"relu"`` (SimCLR, Barlow Twins) or ``"gelu"`` (MSN).
        bias: biases in the linear layers (Barlow Twins uses none).
        last_norm: a ``GlobalBatchNorm1d`` without affine parameters after the last layer (SimCLR v2's head
            ends with a batch norm).

    Layers are named ``fc0, norm0, act0, fc1, ...``.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dims: Sequence[int],
        out_dim: int,
        *,
        activation: str = "relu",
        bias: bool = True,
        last_norm: bool = False,
    ):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation '{activation}'; choose one of {sorted(_ACTIVATIONS)}")
        dims = [int(in_dim), *(int(d) for d in hidden_dims), int(out_dim)]
        if any(d <= 0 for d in dims):
            raise ValueError(f"ProjectionMLP needs positive sizes, got in_dim={in_dim}, "
                             f"hidden_dims={list(hidden_dims)}, out_dim={out_dim}")
        self.in_dim, self.out_dim = dims[0], dims[-1]
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, (d_in, d_out) in enumerate(zip(dims[:-2], dims[1:-1])):
            layers[f"fc{i}"] = nn.Linear(d_in, d_out, bias=bias)
            layers[f"norm{i}"] = GlobalBatchNorm1d(d_out)
            layers[f"act{i}"] = _ACTIVATIONS[activation]()
        n_hidden = len(dims) - 2
        layers[f"fc{n_hidden}"] = nn.Linear(dims[-2], dims[-1], bias=bias)
        if last_norm:
            layers[f"norm{n_hidden}"] = GlobalBatchNorm1d(dims[-1], affine=False)
        self.layers = nn.Sequential(layers)

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW must not decay, as the reference recipes do: biases and batch-norm parameters."""
        return {name for name, p in self.named_parameters() if p.ndim <= 1}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
