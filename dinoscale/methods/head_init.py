"""Prototypes of a DINO head from data: k-means of the features the head is applied to.

Released DINOv2/DINOv3 backbones come without their DINO/iBOT heads. A fresh head has random prototypes (the rows
of its last, weight-normalised layer), so the teacher's first targets say nothing about the images and the
student's backbone is pulled towards arbitrary partitions (the kNN accuracy of a continued run collapses). Here
the prototypes start where the data is instead::

    z_i = mlp(x_i) / ||mlp(x_i)||                  the head's bottleneck features (its MLP as initialised)
    c_1..c_K = k-means(z_1..z_N)                   k-means++ seeding, then Lloyd iterations (squared Euclidean)
    last_layer.weight_v = c_k / ||c_k||,  weight_g = 1      so the effective prototypes are the unit centres

so a head's logits ``<z, c_k / ||c_k||>`` start as the cosine to the nearest clusters of real features. Which
features feed which head is the method's business (``DINOv2.head_init_inputs``); collecting them over batches
and ranks is ``dinoscale.train.continue_from``'s. Everything here is deterministic given the ``generator``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dinoscale.models.heads import DINOHead

__all__ = ["bottleneck_features", "kmeans", "prototypes_from_features", "set_prototypes_"]

# Distances are computed for this many (point, centre) pairs at a time: 2**26 floats, 256 MiB.
_PAIRS_PER_CHUNK = 1 << 26


@torch.no_grad()
def bottleneck_features(head: DINOHead, x: torch.Tensor) -> torch.Tensor:
    """``normalize(head.mlp(x))``: the unit vectors the head's prototypes are compared with (fp32)."""
    return F.normalize(head.mlp(x.float()), p=2, dim=-1)


def _nearest(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre of every point (squared Euclidean), in chunks of points."""
    centre_sq = (centres * centres).sum(1)
    chunk = max(1, _PAIRS_PER_CHUNK // max(1, centres.shape[0]))
    # ||x - c||^2 = ||x||^2 - 2 <x, c> + ||c||^2; ||x||^2 is the same for every centre of a point
    return torch.cat([torch.addmm(centre_sq, part, centres.T, alpha=-2.0).argmin(1) for part in points.split(chunk)])


def _kmeans_pp(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each next centre drawn with probability proportional to
    its squared distance to the nearest centre so far."""
    n = points.shape[0]
    norms_sq = (points * points).sum(1)

    def distance_sq(index: torch.Tensor) -> torch.Tensor:  # to points[index]; one pass over the points
        return (norms_sq + norms_sq[index] - 2 * (points @ points[index])).clamp_(min=0)

    chosen = torch.empty(k, dtype=torch.long, device=points.device)
    chosen[0] = torch.randint(n, (1,), generator=generator, device=points.device)
    nearest_sq = distance_sq(chosen[0])
    for i in range(1, k):
        # All remaining points coincide with centres (duplicated features): draw uniformly instead.
        weights = torch.where(nearest_sq.sum() > 0, nearest_sq, torch.ones_like(nearest_sq))
        chosen[i] = torch.multinomial(weights, 1, generator=generator)[0]
        nearest_sq = torch.minimum(nearest_sq, distance_sq(chosen[i]))
    return points[chosen].clone()


@torch.no_grad()
def kmeans(points: torch.Tensor, k: int, *, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """``(k, d)`` k-means centres of ``points`` ``(n, d)``: k-means++ seeding, then at most ``iterations`` Lloyd
    steps (each point to its nearest centre, each centre to the mean of its points; a centre without points stays
    where it is), stopping early once the assignment no longer changes.

    ``generator`` (on ``points``' device) makes the result deterministic. Needs ``n >= k``.
    """
    n = points.shape[0]
    if k < 1 or n < k:
        raise ValueError(f"k-means needs at least k points for k centres: got {n} points for k={k}")
    if iterations < 0:
        raise ValueError(f"k-means iterations must be >= 0, got {iterations}")
    points = points.float()
    centres = _kmeans_pp(points, k, generator)
    assignment = None
    for _ in range(iterations):
        new_assignment = _nearest(points, centres)
        if assignment is not None and torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        sums = torch.zeros_like(centres).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=k).unsqueeze(1)
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
    return centres


@torch.no_grad()
def set_prototypes_(head: DINOHead, centres: torch.Tensor) -> None:
    """Make the head's prototypes the unit vectors of ``centres`` ``(out_dim, bottleneck_dim)``: ``weight_v`` the
    normalised centres, ``weight_g`` 1 (a fresh head's magnitude)."""
    layer = head.last_layer
    if tuple(centres.shape) != tuple(layer.weight_v.shape):
        raise ValueError(f"centres of shape {tuple(centres.shape)} for prototypes of shape "
                         f"{tuple(layer.weight_v.shape)}")
    layer.weight_v.copy_(F.normalize(centres.float(), p=2, dim=1))
    layer.weight_g.fill_(1.0)


def prototypes_from_features(
    head: DINOHead, bottleneck: torch.Tensor, *, iterations: int, generator: torch.Generator
) -> torch.Tensor:
    """The unit k-means centres of ``bottleneck`` (features already through :func:`bottleneck_features`), one
    per prototype of ``head``: what :func:`set_prototypes_` writes."""
    n_prototypes = head.last_layer.out_features
    if bottleneck.shape[0] < n_prototypes:
        raise ValueError(
            f"the head has {n_prototypes} prototypes but only {bottleneck.shape[0]} features were collected for "
            "its k-means: raise continued.head_init_batches (or lower the head's head_n_prototypes)"
        )
    centres = kmeans(bottleneck, n_prototypes, iterations=iterations, generator=generator)
    return F.normalize(centres, p=2, dim=1)
