import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from dinoscale.device import inference_autocast_dtype
from dinoscale.eval.extract import extract_features
from dinoscale.eval.transforms import eval_transform


class TinyTokenModel(torch.nn.Module):
    """Stand-in with the DinoVisionTransformer feature interface (patch 7, dim 8)."""

    patch_size = 7
    embed_dim = 8

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Conv2d(3, 8, kernel_size=7, stride=7)
        self.norm = torch.nn.LayerNorm(8)

    def forward_features(self, x):
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # (B, N, 8)
        cls = tokens.max(dim=1).values
        return {"x_norm_clstoken": self.norm(cls), "x_norm_patchtokens": self.norm(tokens)}

    def forward(self, x):
        return self.forward_features(x)["x_norm_clstoken"]


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, n, bad=()):
        g = torch.Generator().manual_seed(1)
        self.images = torch.rand(n, 3, 14, 14, generator=g)
        self.bad = set(bad)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        if i in self.bad:
            raise OSError(f"cannot identify image file 'img{i}.jpg'")
        return self.images[i], i % 4


def test_order_shape_and_values_match_per_sample_forward():
    model = TinyTokenModel()
    ds = ListDataset(11)
    out = extract_features(model, ds, batch_size=4, pooled_patches=True, autocast_dtype=torch.float32, progress=False)
    assert out["cls"].shape == (11, 8) and out["cls"].dtype == torch.float32
    assert out["patch_mean"].shape == (11, 8)
    assert out["labels"].tolist() == [i % 4 for i in range(11)]
    assert out["indices"].tolist() == list(range(11))
    with torch.no_grad():
        ref = torch.stack([model(ds[i][0][None])[0] for i in range(11)])
        ref_patch = torch.stack(
            [model.forward_features(ds[i][0][None])["x_norm_patchtokens"][0].mean(0) for i in range(11)]
        )
    torch.testing.assert_close(out["cls"], ref)
    torch.testing.assert_close(out["patch_mean"], ref_patch)
    assert out["num_skipped"] == 0


def test_bf16_autocast_close_to_fp32_and_model_state_restored():
    model = TinyTokenModel().train()
    ds = ListDataset(6)
    fp32 = extract_features(model, ds, batch_size=3, autocast_dtype="fp32", progress=False)
    bf16 = extract_features(model, ds, batch_size=3, autocast_dtype="bf16", progress=False)
    assert bf16["cls"].dtype == torch.float32
    torch.testing.assert_close(bf16["cls"], fp32["cls"], atol=0.1, rtol=0.05)
    assert model.training  # eval() during extraction only


def test_unreadable_samples_are_skipped_and_counted(caplog):
    ds = ListDataset(9, bad={0, 4, 5})
    out = extract_features(TinyTokenModel(), ds, batch_size=4, autocast_dtype=torch.float32, progress=False)
    assert out["num_skipped"] == 3
    assert [i for i, _ in out["skipped"]] == [0, 4, 5]
    assert "cannot identify image" in out["skipped"][0][1]
    assert out["indices"].tolist() == [1, 2, 3, 6, 7, 8]
    assert out["labels"].tolist() == [1, 2, 3, 2, 3, 0]
    assert out["cls"].shape == (6, 8)
    assert "skipped 3 unreadable" in caplog.text


def test_plain_model_and_dataloader_input():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 14 * 14, 5))
    ds = ListDataset(7)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=True)  # shuffle is replaced: dataset order
    out = extract_features(model, loader, autocast_dtype=torch.float32, progress=False)
    assert out["cls"].shape == (7, 5)
    assert out["indices"].tolist() == list(range(7))
    with pytest.raises(ValueError, match="pooled_patches"):
        extract_features(model, ds, pooled_patches=True, progress=False)


def test_transform_applied_to_pil_and_required_for_non_tensors():
    images = [Image.new("RGB", (30, 20), color=(i * 20, 0, 0)) for i in range(3)]
    ds = [(im, 0) for im in images]
    out = extract_features(
        TinyTokenModel(), ds, transform=eval_transform(14, 7, crop_ratio=1.0), autocast_dtype="fp32", progress=False
    )
    assert out["cls"].shape == (3, 8)
    with pytest.raises(RuntimeError, match="no sample could be loaded"):
        extract_features(TinyTokenModel(), ds, progress=False)


def test_autocast_resolution():
    cpu = torch.device("cpu")
    assert inference_autocast_dtype(cpu, torch.float32) is None
    assert inference_autocast_dtype(cpu, "bf16") == torch.bfloat16
    assert inference_autocast_dtype(cpu, None) in (None, torch.bfloat16)
    with pytest.raises(ValueError, match="autocast dtype must be one of"):
        inference_autocast_dtype(cpu, "int8")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CollectiveModel(TinyTokenModel):
    """Runs a collective in every forward, like an FSDP-sharded model all-gathering its weights."""

    def forward_features(self, x):
        from dinoscale import distributed

        tag = torch.tensor([1.0, 0.0, 0.0, 7.0])
        got = distributed.all_reduce_sum_(tag.clone())
        # Matched with another rank's forward, the sum is world * tag; matched with any other
        # collective (a rank that skipped a forward), it is not.
        if not torch.equal(got, tag * distributed.get_world_size()):
            raise RuntimeError(f"forward collective mismatched across ranks: {got.tolist()}")
        return super().forward_features(x)


def _distributed_worker(rank, world, port, result_path):
    import datetime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A short timeout turns a collective mismatch (hang) into a failure.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        out = extract_features(
            TinyTokenModel(), ListDataset(11, bad={3}), batch_size=2, autocast_dtype="fp32", progress=False
        )
        # 5 samples, batch 2: rank 0 gets [0, 2, 4] (2 batches), rank 1 gets [1, 3] (1 batch, with
        # sample 1 unreadable) and must add a throw-away forward to match rank 0.
        uneven = extract_features(
            CollectiveModel(), ListDataset(5, bad={1}), batch_size=2, autocast_dtype="fp32", progress=False
        )
        saved = {k: out[k] for k in ("cls", "labels", "indices", "num_skipped")}
        saved["uneven_indices"] = uneven["indices"]
        torch.save(saved, f"{result_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_distributed_gathers_in_dataset_order(tmp_path):
    world = 2
    mp.spawn(_distributed_worker, args=(world, _free_port(), str(tmp_path / "out")), nprocs=world)
    single = extract_features(
        TinyTokenModel(), ListDataset(11, bad={3}), batch_size=2, autocast_dtype="fp32", progress=False
    )
    for rank in range(world):
        got = torch.load(tmp_path / f"out.{rank}")
        assert got["indices"].tolist() == [i for i in range(11) if i != 3]
        assert got["num_skipped"] == 1
        torch.testing.assert_close(got["cls"], single["cls"])
        assert torch.equal(got["labels"], single["labels"])
        assert got["uneven_indices"].tolist() == [0, 2, 3, 4]
