import math

import pytest
import torch

from dinoscale.losses.simmim import SimMIMLoss, patchify


def test_patchify_layout():
    # pixel value = 1000*c + 10*row + col on a 4x4 image with 2x2 patches
    c, r, w = torch.meshgrid(torch.arange(3), torch.arange(4), torch.arange(4), indexing="ij")
    image = (1000 * c + 10 * r + w).float().unsqueeze(0)
    patches = patchify(image, 2)
    assert patches.shape == (1, 4, 12)
    # patch 1 is the top-right one (row-major); its first values are pixel (0, 2) for channels 0, 1, 2
    assert patches[0, 1, :3].tolist() == [2.0, 1002.0, 2002.0]
    # patch 2 is bottom-left; its last value is pixel (3, 1) of channel 2
    assert patches[0, 2, -1].item() == 2031.0
    with pytest.raises(ValueError, match="not a multiple"):
        patchify(torch.zeros(1, 3, 5, 4), 2)


def test_l1_over_masked_patches_only():
    target = torch.tensor([[[1.0, -2.0], [3.0, 4.0], [5.0, 6.0]]])  # (B=1, N=3, P=2)
    masks = torch.tensor([[True, False, True]])
    pred = torch.zeros_like(target, requires_grad=True)
    loss = SimMIMLoss()(pred, target, masks)
    assert loss.item() == pytest.approx((1 + 2 + 5 + 6) / 4)
    loss.backward()
    # visible patches get no gradient; masked values get sign(pred - target) / (|M| * P)
    assert torch.equal(pred.grad[0, 1], torch.zeros(2))
    torch.testing.assert_close(pred.grad[0, 0], torch.tensor([-0.25, 0.25]))
    # what the decoder predicts for visible patches does not matter
    other = pred.detach().clone()
    other[0, 1] = 100.0
    assert SimMIMLoss()(other, target, masks).item() == pytest.approx(loss.item())


def test_per_patch_normalised_target():
    target = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])  # mean 2.5, biased variance 1.25
    masks = torch.tensor([[True]])
    loss = SimMIMLoss(norm_target=True, eps=1e-6)
    expected = (1.5 + 0.5 + 0.5 + 1.5) / 4 / math.sqrt(1.25 + 1e-6)
    assert loss(torch.zeros_like(target), target, masks).item() == pytest.approx(expected, rel=1e-6)
    # normalised targets do not depend on the patch's brightness or contrast
    assert loss(torch.zeros_like(target), 3 * target + 7, masks).item() == pytest.approx(expected, rel=1e-5)


def test_empty_mask_gives_zero_and_bad_inputs_are_named():
    pred = torch.ones(2, 3, 4, requires_grad=True)
    loss = SimMIMLoss()(pred, torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))
    with pytest.raises(ValueError, match="masks must be a bool"):
        SimMIMLoss()(pred, torch.zeros(2, 3, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="must both be"):
        SimMIMLoss()(pred, torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.bool))
