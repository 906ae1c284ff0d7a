"""End-to-end checks of the training loop on a tiny ViT and real Fashion-MNIST images (CPU, seconds)."""

import io
import json
from pathlib import Path

import pytest
import torch

from dinoscale import checkpoint
from dinoscale.config import load_config
from dinoscale.methods.registry import METHODS
from dinoscale.methods.dinov2 import DINOv2
from dinoscale.train import loop
from dinoscale.data.shard_writer import write_shards
from dinoscale.data.streams import StreamGroups
from dinoscale.train.build import ensure_shards
from dinoscale.train.resume import ResumeError, recorded_stream_groups
from dinoscale.train.step import TooManyBadSteps
from tests.tiny import TINY_RUN

FMNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist")

TINY = [*TINY_RUN, "model.drop_path_rate=0.1", "optim.base_lr=0.001"]


def run(tmp_path, *extra):
    cfg = load_config("quickstart", TINY + [f"train.output_dir={tmp_path}", *extra])
    return cfg, loop.train(cfg)


def rows(out_dir, kind=None):
    lines = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in lines if r.get("type") == kind] if kind else [r for r in lines if "type" not in r]


def test_train_writes_config_checkpoints_metrics_and_export(tmp_path):
    cfg, result = run(tmp_path, "train.max_steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=1")
    assert result.status == "finished" and result.step == 4
    assert (tmp_path / "config.yaml").exists()
    logged = rows(tmp_path)
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    for key in ("loss", "loss/dino_global", "loss/dino_local", "loss/koleo", "loss/ibot", "lr", "wd",
                "momentum", "teacher_temp", "grad_norm", "images_per_s", "data/corrupt_samples"):
        assert key in logged[-1], key
    # FLOPs counted once at the start: achieved TFLOP/s and MFU on every log line, MFU a fraction of the peak
    assert all(r["perf/tflops_per_s"] > 0 and 0 < r["perf/mfu"] < 1 for r in logged)
    # keep_checkpoints=1: only the last survives
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_000000004"]
    # the export loads with plain torch.load + strict load_state_dict into the same architecture
    from dinoscale.models.factory import build_backbone

    model = build_backbone(cfg.model, drop_path_rate=0.0)
    model.load_state_dict(torch.load(tmp_path / "export" / "teacher_backbone.pth"), strict=True)
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "export" / "teacher_backbone.safetensors")) == set(model.state_dict())


def test_loss_decreases_over_a_few_steps(tmp_path):
    # With the teacher held fixed (EMA momentum 1, constant temperature, frozen center) the targets are a
    # fixed function of the images, so the student's cross-entropy to them must go down. (With a moving
    # teacher the DINO loss may rise while the teacher sharpens, which is not a failure.)
    _, result = run(tmp_path, "train.max_steps=20", "optim.base_lr=0.004", "optim.warmup_epochs=0",
                    "train.checkpoint_every=1000", "teacher.warmup_teacher_temp=0.07",
                    "teacher.momentum_teacher=1.0", "teacher.final_momentum_teacher=1.0",
                    "dino.center_momentum=1.0", "dino.koleo_loss_weight=0.0")
    losses = [r["loss"] for r in rows(tmp_path)]
    assert result.step == 20
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses


def assert_same_run(full, resumed, steps):
    """The resumed run logged the uninterrupted run's steps, losses and gradients, and ended with its teacher."""
    a, b = rows(full), rows(resumed)
    assert [r["step"] for r in b] == list(range(1, steps + 1))  # no duplicated rows after resume
    for ra, rb in zip(a, b):
        for key in ("loss", "loss/dino_global", "loss/dino_local", "loss/koleo", "loss/ibot", "grad_norm", "lr"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
    ta = torch.load(full / "export" / "teacher_backbone.pth")
    tb = torch.load(resumed / "export" / "teacher_backbone.pth")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_resume_is_exact(tmp_path):
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    run(full, "train.max_steps=6", "train.checkpoint_every=3")
    run(stopped, "train.max_steps=3", "train.checkpoint_every=3")
    _, result = run(stopped, "train.max_steps=6", "train.checkpoint_every=3")
    assert result.step == 6
    assert_same_run(full, stopped, 6)


@pytest.fixture(scope="module")
def fmnist_shards(tmp_path_factory):
    """96 Fashion-MNIST training images in 6 shards."""
    out = tmp_path_factory.mktemp("fmnist-shards")
    write_shards("fashion-mnist", out, max_samples_per_shard=16, limit=96)
    return out / "train"


@pytest.mark.parametrize("kind", ["map", "shards"])
def test_resume_with_another_num_workers_is_exact(tmp_path, fmnist_shards, kind):
    # Shards: the first run fixes 2 stream groups (one per worker); the resume reads them in the main process.
    data, (first, later) = ([], (0, 2)) if kind == "map" else ([f"train.dataset={fmnist_shards}"], (2, 0))
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    run(full, *data, f"train.num_workers={first}", "train.max_steps=6", "train.checkpoint_every=3")
    run(stopped, *data, f"train.num_workers={first}", "train.max_steps=3", "train.checkpoint_every=3")
    saved = json.loads((checkpoint.latest_checkpoint(stopped) / "trainer.json").read_text())
    assert (saved["shard_stream_groups"], saved["shard_streams_per_group"]) == (max(1, first), 1)
    _, result = run(stopped, *data, f"train.num_workers={later}", "train.max_steps=6", "train.checkpoint_every=3")
    assert result.step == 6
    assert_same_run(full, stopped, 6)


def test_resume_refuses_another_global_batch_or_stream_groups_unless_allowed(tmp_path):
    run(tmp_path, "train.max_steps=2", "train.checkpoint_every=2")
    with pytest.raises(ResumeError, match="global batch of 8 images per step, this run has 4 .* Resume with "
                                          "train.batch_size_per_rank=8, or set train.allow_global_batch_change=true"):
        run(tmp_path, "train.max_steps=3", "train.batch_size_per_rank=4")
    with pytest.raises(ResumeError, match="train.shard_stream_groups=3, but the checkpoint's data position reads 1"):
        run(tmp_path, "train.max_steps=3", "train.shard_stream_groups=3")
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_000000002"  # refused before any step
    _, result = run(tmp_path, "train.max_steps=3", "train.batch_size_per_rank=4",
                    "train.allow_global_batch_change=true")
    assert result.step == 3 and rows(tmp_path)[-1]["images_per_s"] > 0


def test_checkpoint_without_recorded_stream_groups_resumes_with_the_old_default():
    cfg = load_config("quickstart", TINY + ["train.num_workers=3"])
    assert recorded_stream_groups(cfg, {"step": 5, "world_size": 2}) == StreamGroups(3, 2)
    assert recorded_stream_groups(cfg, {"world_size": 1, "shard_stream_groups": 4,
                                        "shard_streams_per_group": 2}) == StreamGroups(4, 2)
    cfg = load_config("quickstart", TINY + ["train.shard_streams_per_group=8"])
    with pytest.raises(ResumeError, match="shard_streams_per_group=8, but .* reads 2: .* fixed at a run's first "
                                          "start. Set train.shard_streams_per_group=0"):
        recorded_stream_groups(cfg, {"world_size": 1, "shard_stream_groups": 4, "shard_streams_per_group": 2})


def test_preemption_stop_saves_and_resumes(tmp_path):
    calls = {"n": 0}

    def stop_after_two():
        calls["n"] += 1
        return calls["n"] >= 2

    cfg = load_config("quickstart", TINY + [f"train.output_dir={tmp_path}", "train.max_steps=5",
                                           "train.checkpoint_every=100"])
    result = loop.train(cfg, stop_requested=stop_after_two)
    assert result.status == "preempted" and result.step == 2
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_000000002"
    assert loop.train(cfg).step == 5


class NaNAtSteps(DINOv2):
    bad_calls = {2, 3}

    def forward(self, *args, **kwargs):
        total, terms = super().forward(*args, **kwargs)
        if not torch.is_grad_enabled():  # the FLOP count's traced forward at the start, not a training step
            return total, terms
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls in self.bad_calls:
            total = total * float("nan")
        return total, terms


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "dinov2", NaNAtSteps)
    _, result = run(tmp_path, "train.max_steps=5", "train.checkpoint_every=100")
    assert result.step == 5
    skipped = rows(tmp_path, "skipped_step")
    assert [r["step"] for r in skipped] == [2, 3]
    assert [r["consecutive_bad_steps"] for r in skipped] == [1, 2]
    finite = {r["step"]: r["loss"] is not None for r in rows(tmp_path)}  # non-finite values are logged as null
    assert finite == {1: True, 2: False, 3: False, 4: True, 5: True}


def test_skipped_steps_between_log_steps_are_all_reported(tmp_path, monkeypatch):
    # The skip is decided on the device; the host reads the flags at the next log step, none are lost.
    monkeypatch.setitem(METHODS, "dinov2", NaNAtSteps)
    _, result = run(tmp_path, "train.max_steps=6", "train.log_every=5", "train.checkpoint_every=100")
    assert result.step == 6
    skipped = rows(tmp_path, "skipped_step")
    assert [(r["step"], r["consecutive_bad_steps"]) for r in skipped] == [(2, 1), (3, 2)]
    assert [(r["step"], r["skipped_steps_in_a_row"]) for r in rows(tmp_path)] == [(5, 0), (6, 0)]


def test_too_many_bad_steps_stop_with_clear_error(tmp_path, monkeypatch):
    class AlwaysNaN(NaNAtSteps):
        bad_calls = set(range(1, 100))

    monkeypatch.setitem(METHODS, "dinov2", AlwaysNaN)
    with pytest.raises(TooManyBadSteps, match="3 consecutive steps"):
        run(tmp_path, "train.max_steps=10", "train.max_consecutive_bad_steps=3")


def test_sigterm_checkpoints_and_exits_with_requeue_code(tmp_path):
    """The CLI path with DataLoader workers: SIGTERM (as SLURM/scancel send it to the whole process group)
    makes the trainer save at the next step boundary and exit with code 3; rerunning resumes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, str(repo / "tools" / "train.py"), "--config", "quickstart", *TINY,
           f"train.output_dir={tmp_path}", "train.num_workers=2", "train.max_steps=400",
           "train.checkpoint_every=1000", "optim.epochs=100"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group, workers included
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, out[-3000:]
    saved = checkpoint.latest_checkpoint(tmp_path)
    assert saved is not None and "checkpoint saved" in out
    step = int(saved.name.split("_")[1])
    assert step >= 3 and [r["step"] for r in rows(tmp_path)][-1] == step


def test_export_tool_from_checkpoint_loads_through_hub(tmp_path):
    import importlib.util

    cfg, _ = run(tmp_path / "run", "train.max_steps=2")
    spec = importlib.util.spec_from_file_location("export_backbone", Path(__file__).resolve().parents[2]
                                                  / "tools" / "export_backbone.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([str(tmp_path / "run"), str(tmp_path / "out" / "bb"), "--heads"]) == 0
    from dinoscale.hub import load_state_dict_any
    from dinoscale.models.factory import build_backbone

    model = build_backbone(cfg.model, drop_path_rate=0.0)
    assert load_state_dict_any(model, str(tmp_path / "out" / "bb.safetensors")) == "dinov2"
    exported = torch.load(tmp_path / "run" / "export" / "teacher_backbone.pth")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in exported.items())
    assert (tmp_path / "out" / "bb_heads.pth").exists()
    assert tool.main([str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2


def test_shards_are_built_on_first_run_and_damage_is_counted(tmp_path):
    """train.build_shards_from writes the shards once; a corrupt image inside them is skipped and counted."""
    from PIL import Image

    folder = tmp_path / "photos"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (20, 20), (i * 20, 40, 90 if label == "a" else 200)).save(folder / label / f"{i}.png")
    (folder / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    shards = tmp_path / "shards"
    ensure_shards(load_config("quickstart", [f"train.dataset={shards}", f"train.build_shards_from={folder}"]))
    index = json.loads((shards / "index.json").read_text())
    assert index["total"] == 24 and index["skipped"] == 1  # the broken file is refused at write time

    # Damage one image inside the written shard (same size, so the tar stays readable): skipped, counted.
    import tarfile

    shard = shards / index["shards"][0]["name"]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        damaged = False
        for member, data in members:
            if member.name.endswith(".png") and not damaged:
                data, damaged = b"\0" * len(data), True
            tar.addfile(member, io.BytesIO(data))
    _, result = run(tmp_path / "run", f"train.dataset={shards}", f"train.build_shards_from={folder}",
                    "train.max_steps=4", "train.checkpoint_every=100")
    assert result.step == 4
    assert rows(tmp_path / "run")[-1]["data/corrupt_samples"] >= 1


def test_periodic_knn_eval_logs_and_keeps_the_evaluated_teacher(tmp_path):
    _, result = run(tmp_path, "train.max_steps=4", "train.checkpoint_every=100", "evaluation.period=2",
                    "evaluation.knn_train_dataset=fashion-mnist:train", "evaluation.knn_test_dataset=fashion-mnist:test",
                    "evaluation.knn_max_train_samples=300", "evaluation.knn_max_test_samples=200",
                    "evaluation.knn_image_size=16")
    evals = rows(tmp_path, "eval")
    assert [r["step"] for r in evals] == [2]  # not at the last step: the end of training has its own export
    assert 10.0 < evals[0]["knn/top1@20"] <= 100.0  # better than chance on 10 classes
    from dinoscale.hub import load_state_dict_any
    from dinoscale.models.factory import build_backbone

    model = build_backbone(load_config("quickstart", TINY).model, drop_path_rate=0.0)
    saved = tmp_path / "eval" / "step_000000002" / "teacher_backbone.pth"
    assert load_state_dict_any(model, str(saved)) == "dinov2"


def test_flop_count_leaves_training_unchanged(tmp_path):
    # The count traces a forward on a batch of its own: RNG streams and buffers must come back untouched.
    _, _ = run(tmp_path / "counted", "train.max_steps=3", "train.log_throughput=true")
    _, _ = run(tmp_path / "plain", "train.max_steps=3", "train.log_throughput=false")
    counted, plain = rows(tmp_path / "counted"), rows(tmp_path / "plain")
    assert [r["loss"] for r in counted] == [r["loss"] for r in plain]
    assert "perf/mfu" in counted[-1] and "perf/mfu" not in plain[-1]
