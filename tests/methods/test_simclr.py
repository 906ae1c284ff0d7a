import torch

from dinoscale import checkpoint
from dinoscale.config import load_config
from dinoscale.methods.registry import build_method
from dinoscale.models.factory import build_backbone
from dinoscale.models.projector import ProjectionMLP


def test_networks_views_and_no_teacher():
    cfg = load_config("quickstart", ["method=simclr", "simclr.proj_hidden_dim=64", "simclr.proj_out_dim=16",
                                     "simclr.proj_nlayers=3", "crops.local_crops_number=4"])
    method = build_method(cfg)
    student, teacher = method.build_networks()
    assert teacher is None and method.uses_teacher is False
    assert set(student) == {"backbone", "projector"}
    assert isinstance(student["projector"], ProjectionMLP)
    assert [m.out_features for m in student["projector"].modules() if isinstance(m, torch.nn.Linear)] == [64, 64, 16]
    assert method.build_transform().local_crops_number == 0  # two views, whatever crops.local_crops_number says
    assert dict(method.state_dict()) == {}


def test_training_lowers_the_loss_and_exports_the_student(runner, tmp_path):
    # Contrastive learning needs a few more images and steps than the other methods to beat the noise.
    trained, _ = runner.assert_training_lowers_loss("simclr", "train.batch_size_per_rank=16", steps=40,
                                                    factor=0.95)
    assert {"loss", "loss/nt_xent"} <= set(trained[-1])
    exported = torch.load(tmp_path / "trained" / "export" / "student_backbone.pth")
    build_backbone(runner.config("simclr").model, drop_path_rate=0.0).load_state_dict(exported, strict=True)
    assert not (tmp_path / "trained" / "export" / "teacher_backbone.pth").exists()


def test_resume_is_exact_without_a_teacher(runner, tmp_path):
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    runner.train("simclr", "train.max_steps=6", "train.checkpoint_every=3", out=full)
    runner.train("simclr", "train.max_steps=3", "train.checkpoint_every=3", out=stopped)
    assert checkpoint.latest_checkpoint(stopped).name == "step_000000003"
    _, result = runner.train("simclr", "train.max_steps=6", "train.checkpoint_every=3", out=stopped)
    assert result.step == 6
    a, b = runner.rows(full), runner.rows(stopped)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm", "lr"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
    ta = torch.load(full / "export" / "student_backbone.pth")
    tb = torch.load(stopped / "export" / "student_backbone.pth")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
