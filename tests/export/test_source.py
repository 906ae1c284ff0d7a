"""Which backbone an export starts from: run directories, checkpoints and weights files inside and outside a
run, named architectures; and the errors for what cannot be resolved."""

import pytest
import torch

from dinoscale import hub
from dinoscale.checkpoint import latest_checkpoint
from dinoscale.eval.backbones import load_backbone
from dinoscale.export.backbone import ExportError
from dinoscale.export.source import backbone_from_source

TINY = dict(embed_dim=32, depth=2, num_heads=2)


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_run_directory_checkpoint_and_export_inside_a_run(trained_run):
    reference = load_backbone(weights=str(trained_run))  # the evaluation tools' reading of the run
    assert reference.n_blocks == 2 and reference.patch_size == 4
    for source in (
        trained_run,
        latest_checkpoint(trained_run),  # checkpoints/step_*: the teacher, architecture from the run
        trained_run / "export" / "teacher_backbone.safetensors",
        trained_run / "export" / "teacher_backbone.pth",
    ):
        model = backbone_from_source(str(source))
        assert not model.training
        assert_same_state(model, reference)


def test_weights_outside_a_run_need_an_architecture(tmp_path):
    torch.manual_seed(0)
    model = hub.load("dinov2_vits14", **TINY)
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    with pytest.raises(ExportError, match="cannot tell the architecture.*--arch"):
        backbone_from_source(str(tmp_path / "weights.pth"))
    by_path = backbone_from_source(str(tmp_path / "weights.pth"), arch="dinov2_vits14", model_kwargs=TINY)
    by_name = backbone_from_source("dinov2_vits14", weights=str(tmp_path / "weights.pth"), model_kwargs=TINY)
    by_options = backbone_from_source(None, arch="dinov2_vits14", weights=str(tmp_path / "weights.pth"),
                                      model_kwargs=TINY)
    for loaded in (by_path, by_name, by_options):
        assert_same_state(loaded, model)


def test_unresolvable_sources_are_named(tmp_path):
    with pytest.raises(ExportError, match="source not found: .*nowhere.* dinov2_vits14"):
        backbone_from_source(str(tmp_path / "nowhere"))
    (tmp_path / "w.pth").write_bytes(b"")
    with pytest.raises(ExportError, match="--weights is only for a named architecture"):
        backbone_from_source(str(tmp_path / "w.pth"), weights="other.pth")
    with pytest.raises(ExportError, match="drop --arch"):
        backbone_from_source("vit_small", arch="vit_base")
