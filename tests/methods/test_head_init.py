"""Prototypes from k-means (``dinoscale.methods.head_init``), against numpy references: the head's projection
computed by hand, clusters whose centres are known, and Lloyd's fixed point; and which features the DINOv2 family
feeds each head (``DINOv2.head_init_inputs``)."""

import math

import numpy as np
import pytest
import torch

from dinoscale.config import load_config
from dinoscale.methods.dinov2 import masked_patch_tokens
from dinoscale.methods.head_init import bottleneck_features, kmeans, prototypes_from_features, set_prototypes_
from dinoscale.methods.registry import build_method
from dinoscale.models.heads import DINOHead
from dinoscale.train.perf.flops import example_batch

_erf = np.vectorize(math.erf)


def numpy_bottleneck(head: DINOHead, x: np.ndarray) -> np.ndarray:
    """``normalize(fc2(gelu(fc1(x))))`` of a 2-layer head, in float64 numpy (GELU with erf, as nn.GELU)."""
    w1, b1 = head.mlp[0].weight.detach().double().numpy(), head.mlp[0].bias.detach().double().numpy()
    w2, b2 = head.mlp[2].weight.detach().double().numpy(), head.mlp[2].bias.detach().double().numpy()
    h = x @ w1.T + b1
    h = 0.5 * h * (1 + _erf(h / math.sqrt(2)))
    z = h @ w2.T + b2
    return z / np.linalg.norm(z, axis=1, keepdims=True)


@pytest.mark.parametrize("seed", range(4))
def test_prototypes_are_the_unit_centres_of_known_clusters_of_projected_features(seed):
    torch.manual_seed(seed)
    head = DINOHead(in_dim=6, out_dim=3, nlayers=2, hidden_dim=16, bottleneck_dim=4)
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), 20)
    x = 3 * rng.normal(size=(3, 6))[labels] + 0.01 * rng.normal(size=(60, 6))  # three tight, separate groups

    z = numpy_bottleneck(head, x)
    torch.testing.assert_close(bottleneck_features(head, torch.tensor(x, dtype=torch.float32)),
                               torch.tensor(z, dtype=torch.float32), atol=1e-5, rtol=1e-5)
    # By hand: k-means of three separate groups ends at the groups' means; the prototypes are their unit vectors.
    centres = np.stack([z[labels == k].mean(0) for k in range(3)])
    expected = centres / np.linalg.norm(centres, axis=1, keepdims=True)

    features = bottleneck_features(head, torch.tensor(x, dtype=torch.float32))
    set_prototypes_(head, prototypes_from_features(head, features, iterations=20,
                                                   generator=torch.Generator().manual_seed(seed)))
    got = head.last_layer.weight.detach().double().numpy()  # g * v / ||v||, the prototypes the logits use
    order = [int(np.argmax(got @ e)) for e in expected]  # k-means numbers its clusters its own way
    assert sorted(order) == [0, 1, 2]
    np.testing.assert_allclose(got[order], expected, atol=1e-5)
    assert torch.equal(head.last_layer.weight_g, torch.ones(3, 1))
    # the logits of a feature are its cosines to the centres: largest for its own group's
    logits = head(torch.tensor(x, dtype=torch.float32)).detach().numpy()
    assert (np.argmax(logits, 1) == np.array(order)[labels]).all()


def test_kmeans_ends_at_lloyds_fixed_point():
    # Overlapping data: every centre is the mean of the points nearest to it (numpy, float64).
    points = torch.randn(300, 5, generator=torch.Generator().manual_seed(0))
    centres = kmeans(points, 7, iterations=200, generator=torch.Generator().manual_seed(1)).double().numpy()
    p = points.double().numpy()
    nearest = ((p[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
    assert len(set(nearest.tolist())) == 7
    for k in range(7):
        np.testing.assert_allclose(centres[k], p[nearest == k].mean(0), atol=1e-5)


def test_kmeans_is_deterministic_given_the_seed():
    points = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))

    def run(seed, iterations=10):
        return kmeans(points, 8, iterations=iterations, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3, iterations=0), run(4, iterations=0))  # other seeds, other k-means++ draws
    seeds = run(3, iterations=0)  # the seeding picks data points
    assert all(any(torch.equal(c, q) for q in points) for c in seeds)


def test_kmeans_of_duplicated_points_and_too_few_points():
    points = torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5)
    centres = kmeans(points, 3, iterations=5, generator=torch.Generator().manual_seed(0))
    assert {tuple(c.tolist()) for c in centres} == {(1.0, 0.0), (0.0, 1.0)}  # a third centre on a duplicate
    with pytest.raises(ValueError, match="at least k points for k centres: got 2 points for k=3"):
        kmeans(points[:2], 3, iterations=5, generator=torch.Generator())
    head = DINOHead(in_dim=2, out_dim=16, nlayers=1, bottleneck_dim=2)
    with pytest.raises(ValueError, match="16 prototypes but only 10 features .* continued.head_init_batches"):
        prototypes_from_features(head, points, iterations=1, generator=torch.Generator())


TINY = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=4", "model.img_size=16",
    "dino.head_n_prototypes=64", "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32",
    "ibot.head_n_prototypes=48", "ibot.head_hidden_dim=64", "ibot.head_bottleneck_dim=32",
    "crops.global_crops_size=16", "crops.local_crops_size=8", "crops.local_crops_number=2",
]


@pytest.mark.parametrize("method,separate", [("dinov2", False), ("dinov2", True), ("ibot", True), ("dino", False)])
def test_heads_get_the_tokens_they_see_in_training_in_one_process_order(method, separate):
    cfg = load_config("quickstart", TINY + [f"method={method}", f"ibot.separate_head={separate}"])
    built = build_method(cfg)
    torch.manual_seed(0)
    student, _ = built.build_networks()
    backbone = student["backbone"].eval()
    batch = example_batch(built, 4, 3, image_size=16)
    inputs = built.head_init_inputs(backbone, batch)

    out = backbone(batch["global_crops"], is_training=True)
    cls = out["x_norm_clstoken"]
    if method == "dino":
        assert list(inputs) == ["dino_head"]
        assert torch.equal(torch.cat(inputs["dino_head"]), cls)
        return
    assert batch["mask_indices"].numel() > 0
    patches = masked_patch_tokens(out, batch["mask_indices"])
    if separate:
        assert list(inputs) == ["dino_head", "ibot_head"]
        assert torch.equal(torch.cat(inputs["dino_head"]), cls)
        assert torch.equal(torch.cat(inputs["ibot_head"]), patches)
        # the patch parts are crop A's then crop B's masked tokens
        in_a = batch["mask_indices"] < 3 * out["x_norm_patchtokens"].shape[1]
        assert [len(p) for p in inputs["ibot_head"]] == [int(in_a.sum()), int((~in_a).sum())]
    else:
        assert list(inputs) == ["dino_head"]
        assert torch.equal(torch.cat(inputs["dino_head"]), torch.cat((cls, patches)))
    assert [len(p) for p in inputs["dino_head"][:2]] == [3, 3]  # crop A, crop B of the 3 images
