import pytest

from dinoscale.config import load_config
from dinoscale.methods.registry import build_method


def test_config_checks_are_named():
    with pytest.raises(ValueError, match="photometric_on_device"):
        build_method(load_config("quickstart", ["method=simmim", "crops.photometric_on_device=true"]))
    plain = ["method=simmim", "crops.photometric_on_device=false"]  # the quickstart batches photometry on the device
    with pytest.raises(ValueError, match="mask_ratio"):
        build_method(load_config("quickstart", [*plain, "simmim.mask_ratio=1.0"]))
    method = build_method(load_config("quickstart", [*plain, "simmim.mask_patch_size=6"]))
    with pytest.raises(ValueError, match="multiple"):
        method.build_collate(patch_size=4)  # 28-pixel crops cannot be cut into 6-pixel cells


def test_networks_have_a_linear_pixel_decoder():
    cfg = load_config("quickstart", ["method=simmim", "crops.photometric_on_device=false", "simmim.mask_patch_size=4"])
    student, teacher = build_method(cfg).build_networks()
    assert teacher is None and set(student) == {"backbone", "decoder"}
    assert student["decoder"].in_features == cfg.model.embed_dim
    assert student["decoder"].out_features == cfg.model.patch_size**2 * 3


@pytest.mark.parametrize("norm_target", [False, True])
def test_training_lowers_the_loss(runner, norm_target):
    trained, _ = runner.assert_training_lowers_loss("simmim", f"simmim.norm_target={norm_target}")
    assert {"loss", "loss/l1_masked"} <= set(trained[-1])
