import torch

from dinoscale.config import load_config
from dinoscale.methods.registry import build_method


def test_networks_and_views():
    cfg = load_config("quickstart", ["method=barlow_twins", "barlow_twins.proj_dims=[64,48,32]",
                                     "barlow_twins.lambda_offdiag=0.01"])
    method = build_method(cfg)
    student, teacher = method.build_networks()
    assert teacher is None and set(student) == {"backbone", "projector"}
    linears = [m for m in student["projector"].modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [64, 48, 32]
    assert all(m.bias is None for m in linears)  # the paper's projector has no biases
    assert method.loss.lambda_offdiag == 0.01
    assert method.build_transform().local_crops_number == 0


def test_training_lowers_the_loss(runner, tmp_path):
    trained, _ = runner.assert_training_lowers_loss("barlow_twins")
    assert {"loss", "loss/barlow_twins"} <= set(trained[-1])
    assert (tmp_path / "trained" / "export" / "student_backbone.pth").exists()
