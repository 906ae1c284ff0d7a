import itertools
import logging
import multiprocessing
from functools import partial

import pytest
import torch
from torch.utils.data import Dataset

from dinoscale.data.collate import collate_multicrop
from dinoscale.data.loader import build_pretrain_loader
from dinoscale.data.open import open_dataset
from dinoscale.data.sources.image_folder import ImageFolderDataset
from dinoscale.data.steps import usable_workers
from dinoscale.data.streams import StreamGroups
from dinoscale.data.transforms.masking import MaskingGenerator
from dinoscale.data.transforms.multicrop import MultiCropAugmentation


class ToyDataset(Dataset):
    """Item i: a (3, 4, 4) uint8 image holding i (mod 256) in channel 0 and i // 256 in channel 1."""

    def __init__(self, n, bad=()):
        self.n = n
        self.bad = set(bad)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.bad:
            raise OSError(f"cannot identify image file #{i}")
        image = torch.zeros(3, 4, 4, dtype=torch.uint8)
        image[0] = i % 256
        image[1] = i // 256
        return image, i % 7


def random_transform(image):
    """Stand-in augmentation: keeps the sample id, adds noise from torch's global RNG."""
    index = image[0, 0, 0].long() + 256 * image[1, 0, 0].long()
    return {"index": index, "noise": torch.rand(3)}


def stack_collate(samples, *, rng):
    """Stand-in collate: stacks, and draws a 'mask' from the given rng."""
    return {
        "index": torch.stack([s[0]["index"] for s in samples]),
        "noise": torch.stack([s[0]["noise"] for s in samples]),
        "labels": torch.tensor([s[1] for s in samples]),
        "mask": torch.tensor([rng.random() for _ in samples]),
    }


def take(loader, n):
    batches = list(itertools.islice(loader, n))
    loader.close()
    return batches


def make(dataset, **kw):
    args = dict(batch_size_per_rank=4, num_workers=0, seed=3, start_step=0, rank=0, world_size=1)
    args.update(kw)
    return build_pretrain_loader(dataset, random_transform, stack_collate, **args)


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def test_map_batches_identical_for_0_and_2_workers():
    ds = ToyDataset(37)
    serial = take(make(ds, num_workers=0), 12)
    parallel = take(make(ds, num_workers=2), 12)
    assert_same(serial, parallel)
    # The noise really comes from the per-sample seeded RNG: different seeds differ.
    other = take(make(ds, seed=4), 1)
    assert not torch.equal(other[0]["noise"], serial[0]["noise"])


def test_close_stops_the_persistent_workers_at_once():
    """The workers ignore SIGTERM and the DataLoader keeps its persistent-workers iterator: close() must stop them
    itself, or a process still holding the closed loader waits for them forever at exit."""
    loader = make(ToyDataset(37), num_workers=2)
    before = {p.pid for p in multiprocessing.active_children()}
    next(loader)
    workers = [p for p in multiprocessing.active_children() if p.pid not in before]
    assert len(workers) == 2
    loader.close()
    assert not any(p.is_alive() for p in workers)
    assert loader._dataloader._iterator is None
    loader.close()  # twice is harmless


def test_map_stream_is_permutation_per_epoch_and_epochs_differ():
    ds = ToyDataset(24)
    batches = take(make(ds, batch_size_per_rank=6), 8)  # 2 epochs of 24 samples
    order = torch.cat([b["index"] for b in batches]).tolist()
    assert sorted(order[:24]) == list(range(24)) and sorted(order[24:]) == list(range(24))
    assert order[:24] != order[24:] and order[:24] != list(range(24))
    assert all(torch.equal(b["labels"], b["index"] % 7) for b in batches)


def test_map_main_rng_untouched():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    take(make(ToyDataset(10)), 3)
    assert torch.equal(torch.get_rng_state(), state)


def test_map_resume_reproduces_uninterrupted_stream():
    ds = ToyDataset(29)  # batch boundaries straddle epoch boundaries
    full = take(make(ds, num_workers=2), 20)
    resumed = make(ds, start_step=13)
    assert resumed.step == 13
    assert_same(take(resumed, 7), full[13:])


def test_map_world_size_1_vs_2_same_global_batches():
    ds = ToyDataset(31)
    single = take(make(ds, batch_size_per_rank=6), 9)
    ranks = [take(make(ds, batch_size_per_rank=3, world_size=2, rank=r), 9) for r in range(2)]
    for step in range(9):
        for key in ("index", "noise", "labels"):
            merged = torch.cat([ranks[0][step][key], ranks[1][step][key]])
            assert torch.equal(merged, single[step][key]), (step, key)
    # The collate rng is seeded per step, the same on every rank (collates draw for the global batch).
    assert torch.equal(ranks[0][0]["mask"], ranks[1][0]["mask"])
    assert not torch.equal(ranks[0][0]["mask"], ranks[0][1]["mask"])
    # Resume under a different world size continues the same sample stream.
    resumed = take(make(ds, batch_size_per_rank=3, world_size=2, rank=1, start_step=5), 4)
    for step in range(5, 9):
        assert torch.equal(resumed[step - 5]["index"], single[step]["index"][3:])


def test_map_corrupt_sample_replaced_counted_logged_once(caplog):
    ds = ToyDataset(16, bad={5})
    with caplog.at_level(logging.WARNING, logger="dinoscale.data"):
        loader = make(ds, num_workers=2, batch_size_per_rank=8)
        batches = take(loader, 6)  # 3 epochs: index 5 is met 3 times
    order = torch.cat([b["index"] for b in batches[:2]]).tolist()
    assert sorted(order) == sorted([i for i in range(16) if i != 5] + [6])
    assert loader.stats()["corrupt_samples"] == 3
    assert sum("ToyDataset [5]" in r.getMessage() for r in caplog.records) == 1


def test_map_systematic_failure_raises():
    ds = ToyDataset(8, bad=set(range(8)))
    with pytest.raises(RuntimeError, match="consecutive samples failed"):
        take(make(ds), 1)


def test_with_index_gives_each_sample_its_dataset_index():
    """``with_index``: samples are (image, label, index), the index of the image actually loaded (a corrupt sample's
    replacement brings its own index)."""
    seen = []

    def collate(samples, *, rng):
        seen.append([(int(s[0]["index"]), s[1], s[2]) for s in samples])
        return stack_collate([s[:2] for s in samples], rng=rng)

    ds = ToyDataset(16, bad={5})
    loader = build_pretrain_loader(ds, random_transform, collate, batch_size_per_rank=8, num_workers=0, seed=3,
                                   start_step=0, rank=0, world_size=1, with_index=True)
    take(loader, 2)
    rows = [r for batch in seen for r in batch]
    assert all(image_id == index and label == index % 7 for image_id, label, index in rows)
    assert sorted(index for _, _, index in rows) == sorted([i for i in range(16) if i != 5] + [6])


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size_per_rank"):
        make(ToyDataset(4), batch_size_per_rank=0)
    with pytest.raises(ValueError, match="rank"):
        make(ToyDataset(4), rank=2, world_size=2)
    with pytest.raises(TypeError, match="map-style"):
        make(object())


# --------------------------------------------------------------------------- shards


def make_shards_loader(spec, helpers, transform=None, groups=2, **kw):
    """Shard batches read as ``groups`` groups of one stream per rank (unless ``streams`` is given)."""
    args = dict(batch_size_per_rank=3, num_workers=0, seed=7, start_step=0, rank=0, world_size=1, shuffle_buffer=5)
    args.update(kw)
    args.setdefault("streams", StreamGroups(groups, args["world_size"]))
    return build_pretrain_loader(str(spec), transform or helpers.id_transform, helpers.id_collate, **args)


def test_shard_batches_identical_for_0_and_2_workers(tmp_path, helpers):
    out = helpers.write_set(tmp_path, n=30, per_shard=4)
    serial = take(make_shards_loader(out, helpers, num_workers=0), 14)
    parallel = take(make_shards_loader(out, helpers, num_workers=2), 14)
    assert_same(serial, parallel)
    assert len({i for b in serial for i in b["id"].tolist()}) > 15  # really reads many samples
    with pytest.raises(ValueError, match="multiple of num_workers"):
        make_shards_loader(out, helpers, num_workers=2, groups=3)


@pytest.mark.parametrize("resampled", [False, True])
def test_shard_resume_reproduces_uninterrupted_stream(tmp_path, helpers, resampled):
    out = helpers.write_set(tmp_path, n=30, per_shard=4)  # 8 shards (last one holds 2)
    # Damage must not break exact resume either: the planned counts come from the index.
    (out / "shard-000004.tar").unlink()
    kw = dict(resampled=resampled, world_size=2, rank=1)
    full = take(make_shards_loader(out, helpers, **kw), 30)  # several epochs / segments
    for start in (1, 7, 19):
        resumed = take(make_shards_loader(out, helpers, start_step=start, num_workers=2, **kw), 30 - start)
        assert_same(resumed, full[start:])


def test_shard_resume_does_not_decode_consumed_samples(tmp_path, helpers):
    out = helpers.write_set(tmp_path, n=30, per_shard=4)
    calls = []

    def counting_transform(image):
        calls.append(1)
        return helpers.id_transform(image)

    loader = make_shards_loader(out, helpers, transform=counting_transform, start_step=25)
    take(loader, 2)
    assert len(calls) == 2 * 3


def test_shard_dataset_source_keeps_its_image_format(tmp_path, helpers):
    out = helpers.write_set(tmp_path, n=8, per_shard=4)
    received = []

    def record_type(image):
        received.append(type(image))
        return helpers.id_transform(image)

    loader = build_pretrain_loader(
        open_dataset(str(out)), record_type, helpers.id_collate, batch_size_per_rank=2, num_workers=0,
        seed=0, start_step=0, rank=0, world_size=1,
    )  # fmt: skip
    take(loader, 1)
    assert received == [bytes, bytes]  # pretraining from open_dataset: the augmentation decodes


def test_shards_refuse_with_index(tmp_path, helpers):
    out = helpers.write_set(tmp_path, n=8, per_shard=4)
    with pytest.raises(ValueError, match="map-style"):
        make_shards_loader(out, helpers, with_index=True)


# --------------------------------------------------------------------------- with the real pipeline


def _real_pipeline():
    augmentation = MultiCropAugmentation(
        local_crops_number=2, global_crops_size=28, local_crops_size=14, global_crops_scale=(0.5, 1.0)
    )
    collate = partial(
        collate_multicrop,
        mask_generator=MaskingGenerator((4, 4), max_num_patches=8),
        n_tokens=16,
        mask_ratio_tuple=(0.1, 0.5),
        mask_probability=0.5,
    )
    return augmentation, collate


def _assert_same_dicts(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            if torch.is_tensor(x[key]):
                assert torch.equal(x[key], y[key]), key
            else:
                assert x[key] == y[key], key


@pytest.mark.parametrize("kind", ["map", "shards"])
def test_real_multicrop_pipeline_workers_and_resume(tmp_path, helpers, kind):
    augmentation, collate = _real_pipeline()
    if kind == "map":
        helpers.make_folder(tmp_path / "img", n=10)
        source = ImageFolderDataset(tmp_path / "img", image_format="bytes")
    else:
        source = str(helpers.write_set(tmp_path, n=16, per_shard=4))
    kw = dict(batch_size_per_rank=4, seed=11, rank=0, world_size=1, streams=StreamGroups(2, 1))
    if kind == "map":
        kw.pop("streams")

    def run(num_workers, start_step, n):
        loader = build_pretrain_loader(
            source, augmentation, collate, num_workers=num_workers, start_step=start_step, **kw
        )
        return take(loader, n)

    serial = run(0, 0, 4)
    assert serial[0]["global_crops"].shape == (8, 3, 28, 28) and serial[0]["local_crops"].shape == (8, 3, 14, 14)
    assert serial[0]["masks"].shape == (8, 16)
    _assert_same_dicts(serial, run(2, 0, 4))
    _assert_same_dicts(serial[2:], run(0, 2, 2))


# --------------------------------------------------------------------------- shard resumes under another setup


def test_shard_resume_with_other_num_workers_continues_exactly(tmp_path, helpers):
    out = helpers.write_set(tmp_path, n=30, per_shard=4)
    streams = StreamGroups(4, 1)  # what a first run with 4 workers fixes
    full = take(make_shards_loader(out, helpers, streams=streams, num_workers=2), 16)
    for workers in (0, 1):
        assert_same(take(make_shards_loader(out, helpers, streams=streams, num_workers=workers, start_step=9), 7),
                    full[9:])


def test_usable_workers_divide_the_groups():
    assert [usable_workers(StreamGroups(8, 1), n) for n in (0, 1, 3, 4, 6, 8, 16)] == [0, 1, 2, 4, 4, 8, 8]
    assert usable_workers(StreamGroups(1, 2), 4) == 1


def test_shard_global_batch_same_over_1_2_and_4_ranks_and_resumes_across(tmp_path, helpers):
    out = helpers.write_set(tmp_path, n=40, per_shard=4)
    streams = StreamGroups(2, 4)  # 4 streams per group: world sizes 1, 2 and 4 read the same global batches
    runs = {}
    for world_size in (1, 2, 4):
        runs[world_size] = [take(make_shards_loader(out, helpers, streams=streams, batch_size_per_rank=8 // world_size,
                                                    world_size=world_size, rank=rank), 6)
                            for rank in range(world_size)]
    single = runs[1][0]
    for world_size in (2, 4):
        for step in range(6):
            for key in ("id", "noise", "labels"):
                merged = torch.cat([runs[world_size][rank][step][key] for rank in range(world_size)])
                assert torch.equal(merged, single[step][key]), (world_size, step, key)
    assert len({i for b in single for i in b["id"].tolist()}) > 20  # really reads many samples
    # A run of 4 ranks resumed on 2 (and on 1) continues with the samples it would have read.
    resumed = take(make_shards_loader(out, helpers, streams=streams, batch_size_per_rank=4, world_size=2, rank=1,
                                      start_step=3, num_workers=2), 3)
    assert_same(resumed, runs[2][1][3:])
    assert_same(take(make_shards_loader(out, helpers, streams=streams, batch_size_per_rank=8, start_step=4), 2),
                single[4:])


def test_shard_world_size_that_does_not_divide_the_streams_is_refused(tmp_path, helpers):
    out = helpers.write_set(tmp_path, n=16, per_shard=4)
    with pytest.raises(ValueError, match="world size must divide 2; got 4. Use a world size dividing 2"):
        make_shards_loader(out, helpers, streams=StreamGroups(1, 2), batch_size_per_rank=2, world_size=4, rank=0)
    with pytest.raises(ValueError, match="global batch \\(6\\) must be a multiple of the shard streams per step"):
        make_shards_loader(out, helpers, streams=StreamGroups(1, 4), batch_size_per_rank=6, world_size=1)


@pytest.mark.parametrize("resampled", [False, True])
def test_pipe_shards_resume_exactly_and_read_like_files(tmp_path, helpers, resampled):
    out = helpers.write_set(tmp_path, n=30, per_shard=4)  # 8 shards
    piped = f"pipe:cat {out}/shard-{{000000..000007}}.tar"
    kw = dict(resampled=resampled, groups=2)
    full = take(make_shards_loader(piped, helpers, **kw), 14)
    assert_same(full, take(make_shards_loader(out, helpers, **kw), 14))  # intact data: as read from the files
    for start, workers in ((5, 2), (11, 0)):
        assert_same(take(make_shards_loader(piped, helpers, start_step=start, num_workers=workers, **kw), 14 - start),
                    full[start:])
    # Without an index, a damaged shard is not padded, but reads the same on resume.
    data = (out / "shard-000002.tar").read_bytes()
    (out / "shard-000002.tar").write_bytes(data[: len(data) // 2])
    damaged = take(make_shards_loader(piped, helpers, **kw), 14)
    assert_same(take(make_shards_loader(piped, helpers, start_step=6, num_workers=2, **kw), 8), damaged[6:])
