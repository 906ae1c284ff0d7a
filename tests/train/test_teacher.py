import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dinoscale.train.teacher import ema_update_, init_teacher_from_student_


def tiny(seed=0):
    torch.manual_seed(seed)
    model = nn.ModuleDict(
        {
            "backbone": nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)),
            "dino_head": nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5)),
        }
    )
    with torch.no_grad():
        for p in model.parameters():  # norms start at 1/0 in every model: make all values differ
            p.normal_()
    return model


def test_ema_matches_hand_computation():
    student = nn.Linear(1, 1, bias=False)
    teacher = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        student.weight.fill_(3.0)
        teacher.weight.fill_(1.0)
    ema_update_(teacher, student, 0.75)
    assert teacher.weight.item() == 1.5  # 0.75 * 1 + 0.25 * 3
    ema_update_(teacher, student, 0.5)
    assert teacher.weight.item() == 2.25  # 0.5 * 1.5 + 0.5 * 3
    assert student.weight.item() == 3.0


def test_ema_formula_on_every_parameter():
    student, teacher = tiny(0), tiny(1)
    t0 = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    s0 = {n: p.detach().clone() for n, p in student.named_parameters()}
    ema_update_(teacher, student, 0.992)
    for name, p in teacher.named_parameters():
        expected = 0.992 * t0[name] + (1 - 0.992) * s0[name]
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)
        assert not torch.equal(p.detach(), t0[name])
    # later calls see the student's new values (the cached pairing holds the live parameters)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    t1 = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    ema_update_(teacher, student, 0.9)
    for name, p in teacher.named_parameters():
        torch.testing.assert_close(p.detach(), 0.9 * t1[name] + 0.1 * (s0[name] + 1.0), rtol=0, atol=1e-6)


def test_momentum_one_keeps_teacher_and_zero_copies_student():
    student, teacher = tiny(0), tiny(1)
    before = copy.deepcopy(teacher.state_dict())
    ema_update_(teacher, student, 1.0)
    for name, p in teacher.named_parameters():
        assert torch.equal(p, before[name])
    ema_update_(teacher, student, 0.0)
    for (name, p), s in zip(teacher.named_parameters(), student.parameters()):
        assert torch.equal(p, s), name
    with pytest.raises(ValueError, match="momentum"):
        ema_update_(teacher, student, 1.5)


def test_matching_ignores_wrappers():
    class Compiled(nn.Module):
        def __init__(self, module):
            super().__init__()
            self._orig_mod = module

    student = tiny(0)
    student["backbone"] = Compiled(student["backbone"])  # names: backbone._orig_mod.0.weight
    teacher = tiny(1)
    t0 = teacher["backbone"][0].weight.detach().clone()
    ema_update_(teacher, student, 0.5)
    expected = 0.5 * t0 + 0.5 * student["backbone"]._orig_mod[0].weight.detach()
    torch.testing.assert_close(teacher["backbone"][0].weight.detach(), expected)


def test_name_and_shape_mismatch_errors():
    student = tiny(0)
    teacher = tiny(1)
    teacher["ibot_head"] = nn.Linear(3, 5)
    with pytest.raises(ValueError, match=r"only in the teacher: \['ibot_head.bias', 'ibot_head.weight'\]"):
        ema_update_(teacher, student, 0.9)

    teacher = tiny(1)
    teacher["dino_head"][0] = nn.Linear(3, 7)
    with pytest.raises(ValueError, match=r"dino_head.0.weight.*\(7, 3\).*\(5, 3\)"):
        ema_update_(teacher, student, 0.9)
    with pytest.raises(ValueError, match="dino_head.0.weight"):
        init_teacher_from_student_(teacher, student)

    teacher = tiny(1).double()
    with pytest.raises(ValueError, match="float64"):
        ema_update_(teacher, student, 0.9)


def test_cache_is_rebuilt_when_parameters_are_replaced():
    student, teacher = tiny(0), tiny(1)
    ema_update_(teacher, student, 0.5)
    # e.g. wrapping with fully_shard after the first update swaps in new parameter objects
    teacher["backbone"][0].weight = nn.Parameter(torch.zeros(6, 4))
    ema_update_(teacher, student, 0.5)
    torch.testing.assert_close(teacher["backbone"][0].weight.detach(), 0.5 * student["backbone"][0].weight.detach())


def test_init_teacher_copies_parameters_and_buffers_and_freezes():
    student, teacher = tiny(0), tiny(1)
    student.train()
    student["dino_head"](torch.randn(8, 3))  # update BatchNorm running stats
    init_teacher_from_student_(teacher, student)
    for (name, t), s in zip(teacher.named_parameters(), student.parameters()):
        assert torch.equal(t, s), name
        assert not t.requires_grad
        assert s.requires_grad
    for (name, t), s in zip(teacher.named_buffers(), student.buffers()):
        assert torch.equal(t, s), name
    assert teacher["dino_head"][1].num_batches_tracked.item() == 1
    # copies, not shared storage
    with torch.no_grad():
        student["backbone"][0].weight.add_(1.0)
    assert not torch.equal(teacher["backbone"][0].weight, student["backbone"][0].weight)


@pytest.fixture
def one_rank_group():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        pytest.skip("a process group already exists")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ema_on_dtensor_parameters_updates_local_shards_in_place(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))

    def shard(module):
        for sub in module.modules():
            for name, p in list(sub.named_parameters(recurse=False)):
                setattr(sub, name, nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])))
        return module

    student, teacher = shard(tiny(0)), shard(tiny(1))
    assert all(isinstance(p, DTensor) for p in teacher.parameters())
    locals_before = {n: p.to_local() for n, p in teacher.named_parameters()}
    t0 = {n: p.to_local().clone() for n, p in teacher.named_parameters()}
    s0 = {n: p.to_local().clone() for n, p in student.named_parameters()}
    ema_update_(teacher, student, 0.75)
    for name, p in teacher.named_parameters():
        assert p.to_local() is locals_before[name] or p.to_local().data_ptr() == locals_before[name].data_ptr()
        torch.testing.assert_close(p.to_local(), 0.75 * t0[name] + 0.25 * s0[name], rtol=0, atol=1e-6)

    plain = tiny(2)
    with pytest.raises(ValueError, match="DTensor in the teacher only"):
        ema_update_(teacher, plain, 0.5)

    fresh = shard(tiny(3))
    init_teacher_from_student_(fresh, student)
    for (name, t), s in zip(fresh.named_parameters(), student.parameters()):
        assert torch.equal(t.to_local(), s.to_local()), name
