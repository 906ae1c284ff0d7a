"""Every registered method keeps the ``Method`` contract of ``dinoscale.methods.base`` (tiny ViT, CPU)."""

import random

import pytest
import torch
from torch import nn

from dinoscale.methods.base import Method, uses_sample_index
from dinoscale.methods.registry import METHODS, build_method
from dinoscale.models.vit import DinoVisionTransformer
from dinoscale.train.schedules import build_schedules

# With separate_head=true DINOv2 and iBOT also build the iBOT head, so both head layouts are covered.
# Distillation (from the tiny_teacher_run fixture) is covered with both objectives and with a further student.
CASES = [(name, []) for name in METHODS] + [(name, ["ibot.separate_head=true"]) for name in ("dinov2", "ibot")] + [
    ("distillation", ["distillation.objective=features", "distillation.projector_hidden_dim=16"]),
    ("distillation", ["distillation.students=[{name: second, embed_dim: 16, depth: 1}]"]),
]


def _sched(cfg) -> dict:
    """A real step's schedule values (``dinoscale.train.schedules``), as the loop passes them."""
    return build_schedules(
        total_steps=10, epoch_length=5, base_lr=1e-3, min_lr=1e-6, warmup_epochs=1, weight_decay=0.04,
        weight_decay_end=0.4, momentum_teacher=cfg.teacher.momentum_teacher,
        final_momentum_teacher=cfg.teacher.final_momentum_teacher, teacher_temp=cfg.teacher.teacher_temp,
        warmup_teacher_temp=cfg.teacher.warmup_teacher_temp, warmup_teacher_temp_epochs=1,
        freeze_last_layer_epochs=0,
    ).at(3)


def _batch(method, patch_size: int, n_images: int = 4) -> dict:
    """The method's own transform and collate on random uint8 images, as the data loader runs them (with each
    sample's dataset index for the methods that ask for it)."""
    transform = method.build_transform()
    images = torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    samples = [(transform(image), 0, i) if uses_sample_index(method) else (transform(image), 0)
               for i, image in enumerate(images)]
    return method.build_collate(patch_size)(samples, rng=random.Random(0))


def test_the_protocol_rejects_what_is_not_a_method():
    assert not isinstance(nn.Linear(2, 2), Method)


@pytest.mark.parametrize("name,extra", CASES)
def test_registered_method_keeps_the_contract(name, extra, tiny_config, request):
    if name == "distillation":  # it needs a teacher to learn from
        extra = [*extra, f"distillation.teacher={request.getfixturevalue('tiny_teacher_run')}"]
    if name == "beit":  # it needs a tokenizer
        extra = [*extra, f"beit.tokenizer={request.getfixturevalue('tiny_tokenizer')}"]
    cfg = tiny_config(name, *extra)
    torch.manual_seed(0)
    method = build_method(cfg)
    assert isinstance(method, Method)
    assert METHODS[name] is type(method)

    # No parameters of its own: its buffers are its whole state, and the checkpointed ones carry their names.
    assert list(method.parameters()) == []
    assert set(method.state_dict()) <= {k for k, _ in method.named_buffers()}

    student, teacher = method.build_networks()
    assert isinstance(student, nn.ModuleDict) and isinstance(student["backbone"], DinoVisionTransformer)
    assert (teacher is None) == (not method.uses_teacher)
    if teacher is not None:  # an EMA copy: the loop matches parameters and buffers by name
        assert isinstance(teacher, nn.ModuleDict)
        assert [(k, p.shape) for k, p in teacher.named_parameters()] == [
            (k, p.shape) for k, p in student.named_parameters()
        ]
        assert [k for k, _ in teacher.named_buffers()] == [k for k, _ in student.named_buffers()]
        teacher.load_state_dict(student.state_dict())
        teacher.eval().requires_grad_(False)

    batch = _batch(method, student["backbone"].patch_size)
    sched = _sched(cfg)
    loss, terms = method(student, teacher, batch, sched)
    assert loss.ndim == 0 and loss.requires_grad and torch.isfinite(loss)
    assert terms and all(v.ndim == 0 and not v.requires_grad and torch.isfinite(v) for v in terms.values())
    loss.backward()
    # Every optimized student parameter gets a gradient (the optimizer's checkpointed state must cover them).
    no_grad = [k for k, p in student.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []

    # The logged terms are the same names in the same order at every step (the loop all-reduces them).
    _, again = method(student, teacher, batch, sched)
    assert list(again) == list(terms)
