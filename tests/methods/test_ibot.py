from dinoscale.config import load_config
from dinoscale.methods.registry import build_method
from dinoscale.methods.dinov2 import DINOv2


def test_ibot_is_dinov2_without_koleo():
    method = build_method(load_config("quickstart", ["method=ibot", "ibot.separate_head=true"]))
    assert isinstance(method, DINOv2)
    assert set(method.state_dict()) == {"dino_loss.center", "ibot_loss.center"}
    assert not hasattr(method, "koleo_loss")
    student, teacher = method.build_networks()
    assert set(student) == set(teacher) == {"backbone", "dino_head", "ibot_head"}
    assert student["backbone"].mask_token.requires_grad


def test_training_lowers_the_loss_against_a_fixed_teacher(runner):
    trained, _ = runner.assert_training_lowers_loss("ibot", *runner.FIXED_TEACHER)
    assert {"loss", "loss/dino_global", "loss/dino_local", "loss/ibot"} <= set(trained[-1])
    assert "loss/koleo" not in trained[-1]
