import math

import pytest
import torch

from dinoscale.losses.koleo import KoLeoLoss, nearest_neighbour_indices


def _circle(degrees, radius=1.0):
    a = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return (radius * torch.stack([a.cos(), a.sin()], dim=1)).float()


def test_square_on_circle():
    # Four points 90 degrees apart: every nearest distance is the chord sqrt(2).
    loss = KoLeoLoss()(_circle([0, 90, 180, 270]))
    assert loss.item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-5)


def test_uneven_points_known_nearest_distances():
    # Angles 0, 60, 180 on a circle of radius 5 (normalised away): chords 2 sin(d/2).
    # 0 -> 60: 1;  60 -> 0: 1;  180 -> 60: 2 sin(60 deg) = sqrt(3)  (180 -> 0 would be 2).
    x = _circle([0, 60, 180], radius=5.0)
    expected = -(math.log(1.0) + math.log(1.0) + math.log(math.sqrt(3))) / 3
    assert KoLeoLoss()(x).item() == pytest.approx(expected, abs=1e-5)
    assert nearest_neighbour_indices(x / 5, x / 5).tolist() == [1, 0, 1]


def test_antipodal_pair_does_not_pick_itself():
    x = _circle([0, 180])
    assert nearest_neighbour_indices(x, x).tolist() == [1, 0]
    assert KoLeoLoss()(x).item() == pytest.approx(-math.log(2.0), abs=1e-5)


def test_gradient_pushes_nearest_points_apart():
    x = _circle([0, 10, 180]).requires_grad_(True)
    KoLeoLoss()(x).backward()
    # Gradient descent on point at 0 deg moves it away from 10 deg (negative y direction).
    step = -x.grad
    assert step[0, 1] < 0 and step[1, 1] > 0


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2 samples"):
        KoLeoLoss()(torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"\(batch, dim\)"):
        KoLeoLoss()(torch.randn(2, 3, 4))


def test_distributed_flag_is_single_process_noop():
    torch.manual_seed(0)
    x = torch.randn(6, 5)
    assert torch.equal(KoLeoLoss(distributed=True)(x), KoLeoLoss()(x))
