"""BEiT: config checks, block masks, the loss against its definition, the frozen tokenizer through real training,
training and exact resume through the engine, and its two configs."""

import random

import pytest
import torch
import torch.nn.functional as F

from dinoscale.checkpoint import latest_checkpoint, read_dcp_checkpoint
from dinoscale.config import CONFIG_DIR, load_config
from dinoscale.data.transforms.single_crop import RandomResizedCropFlip
from dinoscale.methods.beit import BEiT
from dinoscale.methods.registry import build_method
from dinoscale.tokenizers.dvae import load_tokenizer
from dinoscale.train import loop
from tests.methods.conftest import save_tiny_tokenizer


def _batch(method, n_images=4, seed=0, image_size=32):
    transform = method.build_transform()
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n_images, 3, image_size, image_size), dtype=torch.uint8, generator=g)
    torch.manual_seed(seed)
    return method.build_collate(method.cfg.model.patch_size)([(transform(im), 0) for im in images],
                                                             rng=random.Random(seed))


def test_config_checks_are_named(tiny_config, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="needs a trained tokenizer"):
        build_method(tiny_config("beit"))
    tok = f"beit.tokenizer={tiny_tokenizer}"
    with pytest.raises(ValueError, match="photometric_on_device"):
        build_method(tiny_config("beit", tok, "crops.photometric_on_device=true"))
    with pytest.raises(FileNotFoundError, match="train_tokenizer"):
        build_method(tiny_config("beit", f"beit.tokenizer={tmp_path / 'none'}"))
    with pytest.raises(ValueError, match="below the 16 patches"):
        build_method(tiny_config("beit", tok, "beit.num_masking_patches=16")).build_collate(4)
    # A tokenizer with 8-px cells on the 16-px crop gives a 2x2 grid, not the ViT's 4x4 ...
    coarse = save_tiny_tokenizer(tmp_path / "coarse", patch_size=8)
    with pytest.raises(ValueError, match="token grid"):
        build_method(tiny_config("beit", f"beit.tokenizer={coarse}")).build_collate(4)
    # ... unless it sees a 32-px copy of the crop (BEiT's second, differently sized input).
    build_method(tiny_config("beit", f"beit.tokenizer={coarse}", "beit.tokenizer_input_size=32")).build_collate(4)


def test_the_students_initial_weights_do_not_depend_on_the_tokenizer(tiny_config, tiny_tokenizer, tmp_path):
    # Loading a tokenizer builds a dVAE (random draws) before reading its weights; the RNG is restored after it.
    from dinoscale.tokenizers.dvae import DiscreteVAE, save_tokenizer

    bigger = save_tokenizer(DiscreteVAE(patch_size=4, vocab_size=64, hidden_dim=16, codebook_dim=16), tmp_path / "b")
    backbones = []
    for tokenizer in (tiny_tokenizer, bigger):
        torch.manual_seed(0)
        backbones.append(build_method(tiny_config("beit", f"beit.tokenizer={tokenizer}")).build_networks()[0]
                         ["backbone"].state_dict())
    assert all(torch.equal(backbones[0][k], backbones[1][k]) for k in backbones[0])


def test_block_masks_do_not_depend_on_the_rank_split(tiny_config, tiny_tokenizer):
    method = build_method(tiny_config("beit", f"beit.tokenizer={tiny_tokenizer}"))
    transform = method.build_transform()
    samples = [(transform(torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)), i) for i in range(8)]
    from dinoscale.data.collate import collate_block_masked_views

    collate = method.build_collate(4)
    one = collate(samples, rng=random.Random(5))
    kwargs = dict(mask_generator=collate.keywords["mask_generator"], num_masking_patches=6)
    two = [collate_block_masked_views(samples[4 * r : 4 * (r + 1)], rng=random.Random(5), rank=r, world_size=2,
                                      **kwargs) for r in range(2)]
    assert torch.equal(torch.cat([b["masks"] for b in two]), one["masks"])
    assert one["n_masked_global"].item() == two[0]["n_masked_global"].item() == one["masks"].sum().item()
    assert torch.equal(one["mask_indices"], one["masks"].flatten().nonzero().squeeze(1))
    counts = one["masks"].sum(dim=1)
    assert (counts <= 6).all() and counts.float().mean() >= 5  # the generator may stop a block short, rarely
    assert one["labels"].tolist() == list(range(8)) and one["images"].shape == (8, 3, 16, 16)
    # another step draws other masks
    assert not torch.equal(collate(samples, rng=random.Random(6))["masks"], one["masks"])


def test_loss_is_cross_entropy_against_the_tokens_of_the_uncorrupted_image(tiny_config, tiny_tokenizer):
    cfg = tiny_config("beit", f"beit.tokenizer={tiny_tokenizer}", "model.drop_path_rate=0.0")
    torch.manual_seed(0)
    method = build_method(cfg)
    student, teacher = method.build_networks()
    assert teacher is None and set(student) == {"backbone", "head"}
    assert student["head"].out_features == 32 and list(method.parameters()) == [] and method.state_dict() == {}
    batch = _batch(method)
    loss, terms = method(student, None, batch, {})
    assert list(terms) == ["ce_masked", "token_acc"]
    # By hand: the tokenizer's argmax tokens of the unmasked images, the head's logits of the masked ViT's
    # patch tokens, cross-entropy averaged over the masked patches only.
    tokens = load_tokenizer(tiny_tokenizer).encoder(batch["images"]).argmax(dim=1).flatten(1)
    with torch.no_grad():
        out = student["backbone"](batch["images"], masks=batch["masks"], is_training=True)["x_norm_patchtokens"]
        logits = student["head"](out)
    expected = F.cross_entropy(logits[batch["masks"]], tokens[batch["masks"]])
    torch.testing.assert_close(loss.detach(), expected)
    acc = (logits[batch["masks"]].argmax(dim=1) == tokens[batch["masks"]]).float().mean()
    torch.testing.assert_close(terms["token_acc"], acc)
    # The ViT's input is masked (its predictions at masked patches differ from the unmasked image's), the
    # tokenizer's is not: the targets above came from the plain images.
    with torch.no_grad():
        unmasked = student["head"](student["backbone"](batch["images"], masks=None, is_training=True)
                                   ["x_norm_patchtokens"])
    assert not torch.allclose(unmasked[batch["masks"]], logits[batch["masks"]])


def test_tokenizer_sees_its_own_copy_of_the_crop(tiny_config, tmp_path):
    coarse = save_tiny_tokenizer(tmp_path / "coarse", patch_size=8)
    method = build_method(tiny_config("beit", f"beit.tokenizer={coarse}", "beit.tokenizer_input_size=32",
                                      "model.drop_path_rate=0.0"))
    student, _ = method.build_networks()
    batch = _batch(method)
    assert batch["images"].shape[-1] == 16 and batch["tokenizer_images"].shape[-1] == 32
    # the same box and flip at both sizes: single views of 16 and 32 px drawn from the same RNG state
    image = torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8)
    torch.manual_seed(3)
    pair = method.build_transform()(image)
    for size, view in zip((16, 32), pair):
        torch.manual_seed(3)
        assert torch.equal(RandomResizedCropFlip(size, scale=(0.4, 1.0))(image), view)
    loss, _ = method(student, None, batch, {})
    tokens = load_tokenizer(coarse).encoder(batch["tokenizer_images"]).argmax(dim=1).flatten(1)
    with torch.no_grad():
        out = student["backbone"](batch["images"], masks=batch["masks"], is_training=True)["x_norm_patchtokens"]
    expected = F.cross_entropy(student["head"](out)[batch["masks"]], tokens[batch["masks"]])
    torch.testing.assert_close(loss.detach(), expected)


def test_the_tokenizer_stays_frozen_and_bitwise_unchanged_through_training(runner, tiny_tokenizer, monkeypatch):
    runs = []
    build_run = loop.build_run
    monkeypatch.setattr(loop, "build_run", lambda cfg: runs.append(build_run(cfg)) or runs[-1])
    cfg, result = runner.train("beit", f"beit.tokenizer={tiny_tokenizer}", "train.max_steps=3")
    assert result.step == 3
    run = runs[0]
    tokenizer = run.method.frozen_networks()["tokenizer"]
    saved = load_tokenizer(tiny_tokenizer).encoder.state_dict()
    state = tokenizer.state_dict()
    assert list(state) == list(saved)
    assert all(torch.equal(state[k], saved[k]) for k in saved)  # bitwise, after 3 optimizer steps
    assert not tokenizer.training
    assert all(not p.requires_grad and p.grad is None for p in tokenizer.parameters())
    optimized = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in tokenizer.parameters()}
    assert optimized == {id(p) for p in run.student.parameters() if p.requires_grad}
    # the student did train, and neither its checkpoint nor the method's state holds the tokenizer
    ckpt = read_dcp_checkpoint(latest_checkpoint(result.output_dir))
    assert not any("tokenizer" in k or k.startswith("layers.") for k in ckpt["student"])
    assert ckpt.get("method", {}) == {} and "tokenizer" not in ckpt.get("networks", {})
    initial = build_method(cfg).build_networks()[0]
    assert not torch.equal(ckpt["student"]["head.weight"], initial["head"].weight)


def test_training_lowers_the_loss(runner, tiny_tokenizer):
    trained, _ = runner.assert_training_lowers_loss("beit", f"beit.tokenizer={tiny_tokenizer}")
    assert {"loss", "loss/ce_masked", "loss/token_acc"} <= set(trained[-1])


def test_resume_is_exact(runner, tiny_tokenizer, tmp_path):
    overrides = [f"beit.tokenizer={tiny_tokenizer}", "train.checkpoint_every=2"]
    runner.train("beit", *overrides, "train.max_steps=4", out=tmp_path / "full")
    runner.train("beit", *overrides, "train.max_steps=2", out=tmp_path / "stopped")
    _, result = runner.train("beit", *overrides, "train.max_steps=4", out=tmp_path / "stopped")
    assert result.step == 4
    full, resumed = runner.rows(tmp_path / "full"), runner.rows(tmp_path / "stopped")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(full, resumed):
        losses = {k: v for k, v in a.items() if k.startswith("loss")}
        assert losses == {k: v for k, v in b.items() if k.startswith("loss")}
    states = [read_dcp_checkpoint(latest_checkpoint(tmp_path / d))["student"] for d in ("full", "stopped")]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # bitwise


def test_fmnist_config_runs_a_step(tmp_path):
    tokenizer = save_tiny_tokenizer(tmp_path / "tok", patch_size=4)
    cfg = load_config(CONFIG_DIR / "methods" / "beit_fmnist.yaml",
                      ["train.autocast=none", f"beit.tokenizer={tokenizer}"])
    assert cfg.method == "beit" and cfg.model.patch_size == 4 and cfg.crops.global_crops_size == 28
    assert load_config(CONFIG_DIR / "methods" / "beit_fmnist.yaml").beit.tokenizer == "./outputs/tokenizers/dvae_fmnist"
    method = build_method(cfg)
    torch.manual_seed(0)
    student, _ = method.build_networks()
    batch = _batch(method, image_size=28)
    assert batch["masks"].shape == (4, 49) and (batch["masks"].sum(dim=1) <= 20).all()
    loss, terms = method(student, None, batch, {})
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in terms.values())
    loss.backward()


def test_vitb16_config_is_the_papers_recipe(tmp_path):
    path = CONFIG_DIR / "methods" / "beit_vitb16.yaml"
    cfg = load_config(path)
    assert (cfg.model.arch, cfg.model.patch_size, cfg.crops.global_crops_size) == ("vit_base", 16, 224)
    assert (cfg.model.layerscale, cfg.model.drop_path_rate) == (0.1, 0.1)
    assert (cfg.beit.num_masking_patches, cfg.beit.min_block_patches, cfg.beit.tokenizer_input_size) == (75, 16, 112)
    assert cfg.optim.base_lr == 1.5e-3 and not cfg.optim.scale_lr_with_batch
    assert cfg.train.batch_size_per_rank * 16 == 2048  # 16 GPUs
    optim = cfg.optim
    assert (optim.epochs, optim.warmup_epochs, optim.weight_decay, optim.clip_grad) == (800, 10, 0.05, 3.0)
    # Its tokenizer: 8-px cells on the 112-px copy, the ViT's 14x14 grid (a tiny one stands in for the 8192-token dVAE).
    tokenizer = save_tiny_tokenizer(tmp_path / "tok", patch_size=8)
    method = build_method(load_config(path, [f"beit.tokenizer={tokenizer}"]))
    assert isinstance(method, BEiT)
    views = method.build_transform()(torch.randint(0, 256, (3, 300, 260), dtype=torch.uint8))
    assert views[0].shape == (3, 224, 224) and views[1].shape == (3, 112, 112)
    method.build_collate(16)
