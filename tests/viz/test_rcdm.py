import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from dinoscale.viz import rcdm  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FMNIST = Path("/usr/share/datasets/fashion-mnist")

# The smallest useful decoder: two levels (16 and 8 px) of 16 and 32 channels, attention on the last.
TINY = dict(image_size=16, block_out_channels=(16, 32), attention_levels=(False, True), attention_head_dim=16,
            norm_num_groups=4, num_train_timesteps=100)


def tiny_decoder(cond_dim=8, seed=0):
    torch.manual_seed(seed)
    return rcdm.RCDMDecoder(cond_dim, **TINY)


def blobs(n=8, size=16, seed=0):
    """Images of one bright square each (in [-1, 1]) and a representation that says where it is."""
    g = torch.Generator().manual_seed(seed)
    images = -torch.ones(n, 1, size, size)
    reps = torch.zeros(n, 8)
    for i in range(n):
        y, x = (int(v) for v in torch.randint(0, size - 6, (2,), generator=g))
        images[i, :, y : y + 6, x : x + 6] = 1.0
        reps[i, :4] = torch.tensor([y, x, y + 6, x + 6]) / size
        reps[i, 4:] = torch.randn(4, generator=g)
    return images, reps


def test_the_condition_changes_the_samples_and_the_noise_alone_fixes_them():
    decoder = tiny_decoder()
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    r = torch.randn(1, 8, generator=torch.Generator().manual_seed(1)).expand(2, -1)
    other = torch.randn(1, 8, generator=torch.Generator().manual_seed(2)).expand(2, -1)
    a = rcdm.sample(decoder, r, noise, num_inference_steps=4, autocast_dtype="fp32")
    b = rcdm.sample(decoder, other, noise, num_inference_steps=4, autocast_dtype="fp32")
    assert a.shape == (2, 1, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert (a - b).abs().mean() > 1e-2  # another representation, same noise: another image
    torch.testing.assert_close(rcdm.sample(decoder, r, noise, num_inference_steps=4, autocast_dtype="fp32"), a,
                               rtol=0, atol=0)
    assert (a[0] - a[1]).abs().mean() > 1e-2  # same representation, other noise: another sample
    with pytest.raises(ValueError, match=r"representations must be \(B, 8\)"):
        decoder(noise, torch.tensor([0, 1]), torch.zeros(2, 7))


def test_sampling_is_diffusers_ddim_pipeline():
    """Our loop gives what diffusers' own DDIMPipeline gives for the UNet with the condition held fixed."""
    from diffusers import DDIMPipeline
    from diffusers.models.unets.unet_2d import UNet2DOutput

    decoder = tiny_decoder()
    r = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))

    class Conditioned(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder, self.config = decoder, decoder.unet.config

        dtype, device = torch.float32, torch.device("cpu")  # what the pipeline asks its unet

        def forward(self, x, t):
            return UNet2DOutput(sample=self.decoder(x, t, r))

    pipe = DDIMPipeline(unet=Conditioned(), scheduler=decoder.sampling_scheduler(5))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), num_inference_steps=5,
                    output_type="pt").images
    noise = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = rcdm.sample(decoder, r, noise, num_inference_steps=5, autocast_dtype="fp32")
    torch.testing.assert_close((ours + 1) / 2, expected, rtol=0, atol=1e-6)


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch():
    decoder = tiny_decoder()
    images, reps = blobs()
    scheduler = decoder.noise_scheduler()

    def fixed_loss():  # the same timesteps and noise before and after training
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return sum(float(rcdm.diffusion_loss(decoder, scheduler, images, reps, g)) for _ in range(4)) / 4

    before = fixed_loss()
    losses = rcdm.train_decoder(decoder, images, reps, steps=30, batch_size=8, lr=3e-3, warmup_steps=3,
                                autocast_dtype="fp32")
    after = fixed_loss()
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert after < 0.7 * before, (before, after)
    assert not decoder.training


def test_training_is_seeded():
    images, reps = blobs()
    runs = []
    for _ in range(2):
        decoder = tiny_decoder()
        runs.append(rcdm.train_decoder(decoder, images, reps, steps=3, batch_size=4, seed=5, autocast_dtype="fp32"))
    assert runs[0] == runs[1]
    decoder = tiny_decoder()
    assert rcdm.train_decoder(decoder, images, reps, steps=3, batch_size=4, seed=6, autocast_dtype="fp32") != runs[0]


def test_save_load_round_trip_gives_identical_samples(tmp_path):
    decoder = tiny_decoder()
    images, reps = blobs()
    rcdm.train_decoder(decoder, images, reps, steps=2, batch_size=8, autocast_dtype="fp32")
    rcdm.save_decoder(decoder, tmp_path / "dec", {"backbone": "random", "steps": 2})
    assert json.loads((tmp_path / "dec" / "decoder.json").read_text())["args"]["block_out_channels"] == [16, 32]

    loaded, meta = rcdm.load_decoder(tmp_path / "dec")
    assert meta == {"backbone": "random", "steps": 2}
    assert loaded.args() == decoder.args()
    theirs = rcdm.samples_per_image(loaded, reps[:2], 3, seed=7, num_inference_steps=3, autocast_dtype="fp32")
    ours = rcdm.samples_per_image(decoder, reps[:2], 3, seed=7, num_inference_steps=3, autocast_dtype="fp32")
    assert theirs.shape == (2, 3, 1, 16, 16)
    assert torch.equal(theirs, ours)
    with pytest.raises(FileNotFoundError, match="decoder.safetensors"):
        rcdm.load_decoder(tmp_path)


def test_samples_of_one_column_share_their_noise():
    decoder = tiny_decoder()
    noise = rcdm.sample_noise(decoder, 2, seed=3)
    assert torch.equal(noise[1], torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(4)))
    r = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    grid = rcdm.samples_per_image(decoder, r, 2, seed=3, num_inference_steps=2, autocast_dtype="fp32")
    direct = rcdm.sample(decoder, r[1:].expand(2, -1), noise, num_inference_steps=2, autocast_dtype="fp32")
    # The same computation in batches of other sizes: CPU kernels chosen by batch size sum in another order (1.1e-6
    # apart on an AMX Xeon), while other noise moves the samples by far more than this tolerance (checked below).
    torch.testing.assert_close(grid[1], direct, rtol=1e-5, atol=1e-5)
    other_noise = rcdm.sample_noise(decoder, 2, seed=5)
    elsewhere = rcdm.sample(decoder, r[1:].expand(2, -1), other_noise, num_inference_steps=2, autocast_dtype="fp32")
    assert (elsewhere - direct).abs().max() > 1e-2


def test_decoder_images_scale_and_resize():
    gray = torch.tensor([[0, 255], [255, 0]], dtype=torch.uint8)[None].expand(3, 2, 2)[None]
    x = rcdm.decoder_images(gray, 2)
    assert x.shape == (1, 1, 2, 2) and x.tolist() == [[[[-1.0, 1.0], [1.0, -1.0]]]]
    assert torch.equal(rcdm.to_uint8(x)[0, 0], gray[0, 0])
    assert rcdm.decoder_images(torch.zeros(4, 28, 28, dtype=torch.uint8), 16).shape == (4, 1, 16, 16)


def test_sample_grid_places_every_tile():
    real = torch.linspace(-1, 1, 3)[:, None, None, None].expand(3, 1, 4, 4)
    groups = [torch.full((3, 2, 1, 4, 4), -1.0), torch.full((3, 1, 1, 4, 4), 1.0)]
    picture, layout = rcdm.sample_grid(real, groups, ["a", "b"], scale=2)
    # tile 8 px; width 8 + (10 + 2*8 + 2) + (10 + 8); height 16 + 3*8 + 2*2
    assert picture.size == layout["size"] == (54, 44)
    pixels = np.asarray(picture)
    for r, y in enumerate(layout["rows"]):
        assert (pixels[y : y + 8, 0:8] == int(rcdm.to_uint8(real[r, 0, 0, 0]))).all()
        for x in layout["groups"][0]:
            assert (pixels[y : y + 8, x : x + 8] == 0).all()
        assert (pixels[y : y + 8, layout["groups"][1][0] :][:, :8] == 255).all()
    with pytest.raises(ValueError, match="labels"):
        rcdm.sample_grid(real, groups, ["a"])


def test_the_package_imports_without_diffusers():
    code = (
        "import sys; sys.modules['diffusers'] = None\n"  # import diffusers now raises ImportError
        "import dinoscale, dinoscale.viz, dinoscale.viz.rcdm as r\n"
        "try:\n    r.RCDMDecoder(8)\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'pip install -e ".[viz]"' in out.stdout


@pytest.fixture(scope="module")
def tiny_run_dir(tmp_path_factory):
    """A finished 2-step tiny training run (config.yaml, export/teacher_backbone.*)."""
    if not FMNIST.exists():
        pytest.skip("needs Debian's dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist)")
    from dinoscale.config import load_config
    from dinoscale.train import loop
    from tests.tiny import TINY_RUN

    out = tmp_path_factory.mktemp("rcdm_run")
    overrides = [*TINY_RUN, "train.official_epoch_length=2", "optim.epochs=1", "optim.warmup_epochs=0",
                 f"train.output_dir={out}"]
    assert loop.train(load_config("quickstart", overrides)).status == "finished"
    assert (out / "export" / "teacher_backbone.safetensors").is_file()
    return out


def test_tool_trains_two_decoders_and_writes_the_grid(tiny_run_dir, tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import visualize_rcdm
    finally:
        sys.path.remove(str(REPO / "tools"))
    common = ["--backbone", "random", "--backbone", str(tiny_run_dir), "--train-samples", "16", "--images", "3",
              "--samples", "2", "--steps", "2", "--batch-size", "8", "--channels", "16", "32", "--image-size", "16",
              "--sampling-steps", "2", "--scale", "2", "--autocast", "fp32", "--device", "cpu"]
    assert visualize_rcdm.main(common + ["--output-dir", str(tmp_path / "a")]) == 0
    picture = tmp_path / "a" / "rcdm.png"
    tile = 16 * 2
    with Image.open(picture) as im:
        # 3 rows of 32 px tiles; the test image, then 2 groups of 2 samples (layout in grid_layout's doc)
        assert im.size == (tile + 2 * (10 + 2 * tile + 2), 16 + 3 * tile + 2 * 2)
        pixels = np.asarray(im.convert("L"))
    decoders = sorted((tmp_path / "a" / "decoders").iterdir())
    assert [d.name for d in decoders] == ["0_random_init", f"1_{tiny_run_dir.name}"]
    meta = json.loads((decoders[1] / "decoder.json").read_text())["metadata"]
    assert meta["backbone"] == str(tiny_run_dir) and meta["steps"] == 2 and meta["train_samples"] == 16

    # The first column is the real test image (first "T-shirt/top", first "Trouser", ...) at 16 px.
    from dinoscale.data.sources.fashion_mnist import FashionMNIST

    test = FashionMNIST(FMNIST, "test")
    first = int((test.targets == 1).nonzero()[0])
    real = rcdm.to_uint8(rcdm.decoder_images(test.images[first : first + 1], 16))[0, 0].numpy()
    y = 16 + tile + 2
    assert np.array_equal(pixels[y : y + tile : 2, 0:tile:2], real)

    # Reusing the saved decoders gives the same picture without training.
    reuse = common + ["--output-dir", str(tmp_path / "b"), "--decoder", str(decoders[0]), "--decoder", str(decoders[1])]
    assert visualize_rcdm.main(reuse) == 0
    assert not (tmp_path / "b" / "decoders").exists()
    with Image.open(tmp_path / "b" / "rcdm.png") as im:
        assert np.array_equal(np.asarray(im.convert("L")), pixels)
