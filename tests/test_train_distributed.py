"""Multi-process training on CPU (gloo): FSDP2 runs (full sharding, and hybrid sharding on a 2x2 mesh of two
simulated nodes) equal single-process runs; sharded checkpoints reshard onto another number of ranks.

Each case spawns real processes that go through ``dinoscale.distributed.init_distributed`` (torchrun variables)
and the unmodified ``dinoscale.train.loop.train``.
"""

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dinoscale import checkpoint
from dinoscale.config import load_config
from dinoscale.parallel import strip_wrapper_prefixes
from tests.tiny import TINY_RUN

FMNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist"),
]

GLOBAL_BATCH = 12
BASE = [
    *TINY_RUN,  # its batch is set per world size below
    "model.drop_path_rate=0.0",  # stochastic depth draws per-rank randomness: off for exact comparisons
    # Without LayerScale the blocks act from the start, so CLS features of different images differ; with
    # gamma=1e-5 they are nearly equal at init and KoLeo's -log(distance) only amplifies rounding noise.
    "model.layerscale=null",
    "optim.epochs=3", "optim.base_lr=0.002",
    "compute.param_dtype=fp32",  # compare numerics, not bf16 rounding
]


def _worker(rank, world_size, port, overrides, results, nodes=1, probe_dir=None):
    """One rank of ``world_size``, on "node" ``rank // (world_size // nodes)`` (the variables torchrun sets for
    ``--nnodes=nodes``; the local world size is what ``compute.hybrid_shard`` shards over)."""
    per_node = world_size // nodes
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank % per_node),
                      LOCAL_WORLD_SIZE=str(per_node), GROUP_RANK=str(rank // per_node), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from dinoscale import distributed
    from dinoscale.train.loop import train

    distributed.init_distributed()
    try:
        with _probe(probe_dir, rank):
            result = train(load_config("quickstart", overrides))
        results.put((rank, result.status, result.step))
    finally:
        distributed.destroy_distributed()


@contextlib.contextmanager
def _probe(probe_dir, rank):
    """With a ``probe_dir``: record what this rank trained on and how its networks were sharded, in
    ``probe_dir/rank{rank}.pt``. The trainer is unchanged: ``build_run`` and ``device_batch`` are only observed.

    Recorded: ``batches``, this rank's crops and masks of each step, in step order; ``params``, per student and
    teacher parameter after the last step: its mesh shape and dimension names, placements, local shard and full
    shape (None for a plain tensor: a single process).
    """
    if probe_dir is None:
        yield
        return
    from dinoscale.train import loop

    runs, batches = [], []
    build_run, device_batch = loop.build_run, loop.device_batch

    def observed_build_run(cfg):
        runs.append(build_run(cfg))
        return runs[-1]

    def observed_device_batch(batch, *args, **kwargs):
        batches.append({k: batch[k].clone() for k in ("global_crops", "local_crops", "masks")})
        return device_batch(batch, *args, **kwargs)

    loop.build_run, loop.device_batch = observed_build_run, observed_device_batch
    try:
        yield
    finally:
        loop.build_run, loop.device_batch = build_run, device_batch
    params = {}
    for net in ("student", "teacher"):
        for name, p in getattr(runs[0], net).named_parameters():
            dtensor = hasattr(p, "to_local")
            params[f"{net}.{strip_wrapper_prefixes(name)}"] = dict(
                mesh_shape=list(p.device_mesh.shape) if dtensor else None,
                mesh_dims=list(p.device_mesh.mesh_dim_names) if dtensor else None,
                placements=[_placement(x) for x in p.placements] if dtensor else None,
                local=(p.to_local() if dtensor else p).detach().clone(), shape=list(p.shape))
    Path(probe_dir).mkdir(parents=True, exist_ok=True)
    torch.save({"batches": batches, "params": params}, Path(probe_dir) / f"rank{rank}.pt")


def _placement(placement):
    """``"Replicate"``, ``"Shard(0)"``, ...: the kind and dimension, whatever torch's repr of the day."""
    return type(placement).__name__ + (f"({placement.dim})" if hasattr(placement, "dim") else "")


def launch(world_size, out_dir, *extra, nodes=1, probe_dir=None):
    """Run training with ``world_size`` processes (1 = a plain single process, no process group) on ``nodes``
    simulated nodes; ``probe_dir``: see :func:`_probe`."""
    overrides = BASE + [f"train.batch_size_per_rank={GLOBAL_BATCH // world_size}", f"train.output_dir={out_dir}",
                        *extra]
    if world_size == 1:
        from dinoscale.train.loop import train

        with _probe(probe_dir, 0):
            return train(load_config("quickstart", overrides)).step
    from dinoscale.distributed import find_free_port

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world_size, find_free_port(), overrides, results, nodes, probe_dir),
                       nprocs=world_size, join=True, start_method="spawn")
    outcomes = [results.get() for _ in range(world_size)]
    assert sorted(r[0] for r in outcomes) == list(range(world_size))
    assert {r[1:] for r in outcomes} == {outcomes[0][1:]}, outcomes  # every rank ends the same way
    return outcomes[0][2]


def losses(out_dir):
    rows = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "type" not in r}


TERMS = ("loss", "loss/dino_global", "loss/dino_local", "loss/koleo", "loss/ibot", "grad_norm")


def assert_same_losses(a, b, steps, rtol=1e-4, atol=1e-5):
    for step in steps:
        for key in TERMS:
            assert a[step][key] == pytest.approx(b[step][key], rel=rtol, abs=atol), (step, key)


def teacher_weights(out_dir):
    return torch.load(Path(out_dir) / "export" / "teacher_backbone.pth")


def test_two_rank_fsdp_equals_one_process(tmp_path):
    launch(1, tmp_path / "one", "train.max_steps=4")
    launch(2, tmp_path / "two", "train.max_steps=4")
    assert_same_losses(losses(tmp_path / "one"), losses(tmp_path / "two"), range(1, 5))
    a, b = teacher_weights(tmp_path / "one"), teacher_weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_sharded_checkpoint_resumes_on_1_2_and_3_ranks(tmp_path):
    reference = tmp_path / "reference"
    launch(1, reference, "train.max_steps=5")
    ref = losses(reference)
    start = tmp_path / "start"
    launch(2, start, "train.max_steps=2")  # a sharded (FSDP, 2-rank) checkpoint at step 2
    assert checkpoint.latest_checkpoint(start).name == "step_000000002"
    for world_size in (1, 2, 3):
        run = tmp_path / f"resume{world_size}"
        run.mkdir()
        shutil.copytree(start / "checkpoints", run / "checkpoints")  # each resume starts from the step-2 shards
        (run / "metrics.jsonl").write_text((start / "metrics.jsonl").read_text())
        assert launch(world_size, run, "train.max_steps=5", "train.keep_checkpoints=10") == 5
        got = losses(run)
        assert sorted(got) == [1, 2, 3, 4, 5], (world_size, sorted(got))
        assert_same_losses(ref, got, range(3, 6))


def test_export_of_sharded_checkpoint_loads_through_hub(tmp_path):
    launch(2, tmp_path / "run", "train.max_steps=2")
    from dinoscale.hub import load_state_dict_any
    from dinoscale.models.factory import build_backbone

    out = tmp_path / "exported"
    checkpoint.export_from_checkpoint(checkpoint.latest_checkpoint(tmp_path / "run"), out, heads=True)
    model = build_backbone(load_config("quickstart", BASE).model, drop_path_rate=0.0)
    assert load_state_dict_any(model, str(out.with_suffix(".pth"))) == "dinov2"
    final = teacher_weights(tmp_path / "run")  # the end-of-training export gathered from the shards
    assert all(torch.equal(model.state_dict()[k], final[k]) for k in final)


# ----------------------------------------------------------------------------- hybrid sharding on a 2x2 mesh

# compute.hybrid_shard on 2 simulated nodes of 2 ranks (LOCAL_WORLD_SIZE=2): mesh ("dp_replicate", "dp_shard") of
# shape (2, 2): every parameter is sharded over the 2 ranks of a node and replicated over the 2 nodes.
# The teacher follows the student faster than in the recipe (EMA momentum 0.9), so that 2 steps move it visibly.
HYBRID = ["compute.hybrid_shard=true", "train.max_steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=10",
          "teacher.momentum_teacher=0.9"]
# Equal up to fp32 round-off, which comes from the order of the sums: one process reduces the 12 samples at once,
# the mesh averages 4 partial gradients of 3 samples (reduce-scatter within a node, then all-reduce across nodes),
# so losses and gradients differ by a few ulps (observed: <= 2e-7 relative), and AdamW's m / sqrt(v) carries that
# into the weights (observed after 4 steps, also after the resumes: <= 2.5e-7 absolute in student and teacher,
# whose values are <= 1). The tolerances leave a margin of 4x or more over that. A lost replica update or a shard
# read at the wrong offset is of the order of a step's change instead: the tests check that steps 3-4 move each
# network by > MOVES_BY x the difference found, and by > 10x WEIGHT_ATOL. (A gradient averaged by a wrong factor
# barely moves AdamW's weights, which are invariant to the gradient's scale; the logged grad_norm, compared at
# LOSS_RTOL, shows it.)
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6
WEIGHT_RTOL, WEIGHT_ATOL = 1e-5, 1e-6
MOVES_BY = 100


def _step_rows(out_dir, upto):
    rows = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return "".join(json.dumps(r) + "\n" for r in rows if "type" not in r and r["step"] <= upto)


def _checkpoint(out_dir, step):
    return checkpoint.read_dcp_checkpoint(checkpoint.checkpoint_root(out_dir) / f"step_{step:09d}")


def _flat(state, prefix=""):
    """A checkpoint's nested tensors as one dict by dotted name."""
    flat = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        flat.update(_flat(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return flat


def assert_same_state(a, b):
    """Student, teacher, loss centers and AdamW moments of two checkpoints, equal to fp32 round-off."""
    a, b = _flat(a), _flat(b)
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    assert any(k.startswith("student.") for k in a) and any(k.startswith("teacher.") for k in a)
    assert any(k.endswith("exp_avg_sq") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=k)


def _max_diff(a, b, net):
    return max((a[net][k] - b[net][k]).abs().max().item() for k in a[net])


def assert_moves_more_than_it_differs(start, end, other_end):
    """The comparison of ``end`` and ``other_end`` is not vacuous: from ``start`` to ``end`` (the steps compared)
    the student and the EMA teacher each changed by > MOVES_BY x what ``end`` and ``other_end`` differ by."""
    for net in ("student", "teacher"):
        moved, differ = _max_diff(end, start, net), _max_diff(end, other_end, net)
        assert moved > MOVES_BY * differ and moved > 10 * WEIGHT_ATOL, (net, moved, differ)


def _probes(probe_dir, world_size):
    return [torch.load(Path(probe_dir) / f"rank{r}.pt") for r in range(world_size)]


def _global_batches(probes):
    """Per step, the global batch: the ranks' crops and masks (crop-major: ``[n_crops * B, ...]``) joined in rank
    order, as ``[n_crops, global batch, ...]``."""
    per_rank_batch = GLOBAL_BATCH // len(probes)
    return [{key: torch.cat([b[key].reshape(-1, per_rank_batch, *b[key].shape[1:]) for b in per_rank], dim=1)
             for key in per_rank[0]}
            for per_rank in zip(*(p["batches"] for p in probes))]


def assert_same_batches(a, b):
    assert len(a) == len(b) > 0
    for step_a, step_b in zip(a, b):  # the same images, crops and masks: bitwise
        assert step_a.keys() == step_b.keys()
        assert all(torch.equal(step_a[k], step_b[k]) for k in step_a)


@pytest.fixture(scope="module")
def hybrid_runs(tmp_path_factory):
    """4 steps of one process and of 4 processes on a 2x2 hybrid mesh (checkpoints at steps 2 and 4), same global
    batch of 12, both probed (:func:`_probe`)."""
    root = tmp_path_factory.mktemp("hybrid")
    assert launch(1, root / "one", *HYBRID, probe_dir=root / "probe_one") == 4
    assert launch(4, root / "mesh", *HYBRID, nodes=2, probe_dir=root / "probe_mesh") == 4
    return root


@pytest.mark.slow  # with its fixture: 5 training processes, ~45 s on 2 cores
def test_hybrid_2x2_mesh_trains_like_one_process(hybrid_runs):
    """4 ranks on a 2x2 hybrid mesh read the single process's data and log its losses and gradient norms; their
    checkpoints (steps 2 and 4) hold its weights, loss centers and AdamW moments."""
    one, mesh = hybrid_runs / "one", hybrid_runs / "mesh"
    probes = _probes(hybrid_runs / "probe_mesh", 4)
    # The mesh is 2x2: every parameter of student and teacher is replicated over mesh dim 0 (the nodes) and sharded
    # along its own dim 0 over mesh dim 1 (the ranks of a node): ranks 0, 1 (node 0) hold different halves, ranks
    # 2, 3 (node 1) the same halves as 0, 1, bitwise.
    final = _checkpoint(mesh, 4)
    names = probes[0]["params"].keys()
    assert any(n.startswith("teacher.") for n in names) and any(n.startswith("student.") for n in names)
    for name in names:
        shards = [p["params"][name] for p in probes]
        for s in shards:
            assert s["mesh_shape"] == [2, 2] and s["mesh_dims"] == ["dp_replicate", "dp_shard"], (name, s)
            assert s["placements"] == ["Replicate", "Shard(0)"], (name, s)
        dim0 = shards[0]["shape"][0]
        assert [len(s["local"]) for s in shards[:2]] == [(dim0 + 1) // 2, dim0 // 2], name  # halves of dim 0
        assert torch.equal(shards[0]["local"], shards[2]["local"]) and torch.equal(shards[1]["local"],
                                                                                    shards[3]["local"]), name
        net, key = name.split(".", 1)
        # the halves of node 0 make the parameter the run checkpointed at its end
        assert torch.equal(torch.cat([shards[0]["local"], shards[1]["local"]]), final[net][key]), name
    # the 4 ranks read the single process's batches, split in rank order (the data position is the same)
    assert_same_batches(_global_batches(probes), _global_batches(_probes(hybrid_runs / "probe_one", 1)))
    assert_same_losses(losses(one), losses(mesh), range(1, 5), rtol=LOSS_RTOL, atol=LOSS_ATOL)
    for step in (2, 4):
        assert_same_state(_checkpoint(one, step), _checkpoint(mesh, step))
    assert_moves_more_than_it_differs(_checkpoint(one, 2), _checkpoint(one, 4), final)


@pytest.mark.slow  # 3 ranks: ~35 s on 2 cores
@pytest.mark.parametrize("world_size", [1, 3])
def test_hybrid_2x2_checkpoint_resumes_on_1_and_3_ranks(hybrid_runs, tmp_path, world_size):
    """The 2x2 run's step-2 checkpoint continues on 1 rank (no mesh) or on 3 ranks of one node (mesh 1x3, the
    shards cut in 3 instead of 2) exactly as the uninterrupted single process: steps 3 and 4, their data, the
    final weights."""
    one, mesh = hybrid_runs / "one", hybrid_runs / "mesh"
    (tmp_path / "checkpoints").mkdir()
    shutil.copytree(checkpoint.checkpoint_root(mesh) / "step_000000002", tmp_path / "checkpoints" / "step_000000002")
    (tmp_path / "metrics.jsonl").write_text(_step_rows(mesh, upto=2))
    assert json.loads((tmp_path / "checkpoints" / "step_000000002" / "trainer.json").read_text())["world_size"] == 4
    probe = tmp_path / "probe"
    assert launch(world_size, tmp_path, *HYBRID, probe_dir=probe) == 4
    probes = _probes(probe, world_size)
    expected_mesh = None if world_size == 1 else [1, 3]
    assert {str(p["params"][n]["mesh_shape"]) for p in probes for n in p["params"]} == {str(expected_mesh)}
    got = losses(tmp_path)
    assert sorted(got) == [1, 2, 3, 4]
    assert_same_losses(losses(one), got, range(3, 5), rtol=LOSS_RTOL, atol=LOSS_ATOL)
    # the data continues at step 3: the resumed run's two steps read the uninterrupted run's last two batches
    assert_same_batches(_global_batches(probes), _global_batches(_probes(hybrid_runs / "probe_one", 1))[2:])
    assert json.loads((checkpoint.latest_checkpoint(tmp_path) / "trainer.json").read_text())[
        "data_position_step"] == 4
    assert_same_state(_checkpoint(one, 4), _checkpoint(tmp_path, 4))
    assert_moves_more_than_it_differs(_checkpoint(one, 2), _checkpoint(one, 4), _checkpoint(tmp_path, 4))
