import pytest
import torch

from dinoscale.config import load_config
from dinoscale.methods.registry import build_method
from dinoscale.methods.msn import Prototypes, random_patch_masks


def test_patch_masks_drop_the_requested_fraction():
    torch.manual_seed(0)
    masks = random_patch_masks(6, 49, 0.3, torch.device("cpu"))
    assert masks.dtype == torch.bool and masks.sum(dim=1).tolist() == [15] * 6  # round(0.3 * 49)
    assert not torch.equal(masks[0], masks[1])
    assert random_patch_masks(2, 16, 0.0, torch.device("cpu")).sum() == 0


def test_prototypes_give_cosine_similarities():
    protos = Prototypes(dim=4, num_prototypes=3)
    z = torch.randn(5, 4)
    sims = protos(z)
    expected = torch.nn.functional.cosine_similarity(z[:, None], protos.weight[None], dim=-1)
    torch.testing.assert_close(sims, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(protos(3.0 * z), sims, rtol=1e-5, atol=1e-6)


def test_networks_and_views():
    cfg = load_config("quickstart", ["method=msn", "msn.proj_hidden_dim=64", "msn.proj_out_dim=16",
                                     "msn.num_prototypes=10", "crops.local_crops_number=3",
                                     "model.drop_path_rate=0.2"])
    method = build_method(cfg)
    student, teacher = method.build_networks()
    assert method.uses_teacher and set(student) == set(teacher) == {"backbone", "projector", "prototypes"}
    assert student["prototypes"].weight.shape == (10, 16)
    # stochastic depth in the student only
    assert student["backbone"].blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert teacher["backbone"].blocks[-1].drop_path1.drop_prob == 0.0
    assert method.build_transform().local_crops_number == 3  # the focal views
    with pytest.raises(ValueError, match="patch_drop"):
        build_method(load_config("quickstart", ["method=msn", "msn.patch_drop=1.0"]))


def test_targets_use_the_students_prototypes(runner):
    # The teacher's copy of the prototypes is never used: scrambling it changes nothing.
    cfg = runner.config("msn")
    method = build_method(cfg)
    torch.manual_seed(0)
    student, teacher = method.build_networks()
    teacher.load_state_dict(student.state_dict())
    batch = {"global_crops": torch.randn(8, 3, 16, 16), "local_crops": torch.randn(8, 3, 8, 8)}
    torch.manual_seed(1)
    loss, terms = method(student, teacher, batch, {})
    with torch.no_grad():
        teacher["prototypes"].weight.normal_()
    torch.manual_seed(1)
    assert method(student, teacher, batch, {})[0].item() == loss.item()
    assert set(terms) == {"msn_ce", "mean_entropy"}


def test_training_lowers_the_loss_against_a_fixed_teacher(runner, tmp_path):
    trained, _ = runner.assert_training_lowers_loss("msn", *runner.FIXED_TEACHER)
    assert {"loss", "loss/msn_ce", "loss/mean_entropy"} <= set(trained[-1])
    assert (tmp_path / "trained" / "export" / "teacher_backbone.pth").exists()
