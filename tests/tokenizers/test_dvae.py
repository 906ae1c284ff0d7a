"""The dVAE tokenizer: its grid, tokens, temperature schedule, that it trains, and its checkpoint round trip."""

import json
import math

import pytest
import torch

from dinoscale.losses.dvae import DVAELoss
from dinoscale.tokenizers.dvae import DiscreteVAE, gumbel_temperature, load_tokenizer, prime_factors, save_tokenizer


def tiny(**kwargs):
    torch.manual_seed(0)
    return DiscreteVAE(**{"patch_size": 4, "vocab_size": 16, "hidden_dim": 8, "codebook_dim": 8, **kwargs})


def test_prime_factors():
    assert [prime_factors(n) for n in (1, 4, 7, 12, 16)] == [[], [2, 2], [7], [2, 2, 3], [2, 2, 2, 2]]


@pytest.mark.parametrize("patch_size,size", [(4, 28), (7, 28), (8, 32), (1, 5)])
def test_one_token_per_patch_and_same_size_reconstructions(patch_size, size):
    model = tiny(patch_size=patch_size)
    x = torch.randn(2, 3, size, size)
    logits = model.encoder(x)
    grid = size // patch_size
    assert logits.shape == (2, 16, grid, grid)
    tokens = model.encoder.tokens(x)
    assert tokens.shape == (2, grid * grid) and tokens.dtype == torch.long
    assert torch.equal(tokens, logits.argmax(dim=1).flatten(1))  # row-major, the ViT's patch order
    reconstruction, relaxed_logits = model(x, temperature=0.5)
    assert reconstruction.shape == x.shape and torch.equal(relaxed_logits, logits)
    # hard reconstructions decode the tokens' codebook vectors
    assert torch.equal(model.reconstruct(x), model.decode_tokens(tokens, (grid, grid)))
    if patch_size > 1:
        with pytest.raises(ValueError, match="multiples of its patch size"):
            model.encoder(torch.randn(1, 3, size + 1, size))


def test_gumbel_temperature_is_a_cosine_from_start_to_end():
    assert gumbel_temperature(0, 100) == pytest.approx(1.0)
    assert gumbel_temperature(50, 100) == pytest.approx((1.0 + 1 / 16) / 2)
    assert gumbel_temperature(100, 100) == pytest.approx(1 / 16)
    assert gumbel_temperature(500, 100) == pytest.approx(1 / 16)
    assert gumbel_temperature(25, 100, start=2.0, end=0.5) == pytest.approx(0.5 + 1.5 * (1 + math.cos(math.pi / 4)) / 2)
    with pytest.raises(ValueError, match="positive"):
        gumbel_temperature(0, 10, start=0.0)


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    model = tiny()
    # Images made of 4x4 cells of 4 colours: 16 tokens can describe them exactly.
    g = torch.Generator().manual_seed(1)
    colours, cells = torch.randn(4, 3, generator=g), torch.randint(0, 4, (4, 2, 2), generator=g)
    x = colours[cells].permute(0, 3, 1, 2).repeat_interleave(4, 2).repeat_interleave(4, 3)  # (4, 3, 8, 8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        reconstruction, logits = model(x, temperature=1.0)
        loss, _ = DVAELoss()(reconstruction, x, logits, kl_weight=1e-3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


def test_checkpoint_round_trip_gives_the_same_tokens(tmp_path):
    model = tiny(num_res_blocks=2)
    with torch.no_grad():  # weights away from the initial draw, so that a reload could not be a re-init
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    directory = save_tokenizer(model, tmp_path / "tok", data={"dataset": "fashion-mnist:train"})
    info = json.loads((directory / "dvae.json").read_text())
    assert info["class"] == "DiscreteVAE" and info["args"] == model.args and info["data"]["dataset"]
    torch.manual_seed(123)  # another initial draw: the loaded weights must replace it
    loaded = load_tokenizer(directory)
    assert not loaded.training
    assert loaded.args == model.args
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(model.encoder.tokens(x), loaded.encoder.tokens(x))
    # a file inside the directory names it too; a wrong path names what is expected
    assert torch.equal(load_tokenizer(directory / "dvae.safetensors").encoder.tokens(x), model.encoder.tokens(x))
    with pytest.raises(FileNotFoundError, match="tools/train_tokenizer.py"):
        load_tokenizer(tmp_path / "nowhere")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="vocab_size"):
        DiscreteVAE(vocab_size=0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        DiscreteVAE(vocab_size=1)
    with pytest.raises(ValueError, match="temperature"):
        tiny()(torch.zeros(1, 3, 8, 8), temperature=0.0)
