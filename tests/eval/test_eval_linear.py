import pytest
import torch

from dinoscale.eval.linear import (
    build_linear_inputs,
    extract_linear_features,
    linear_probe,
    logistic_regression_probe,
    stratified_split,
    train_linear_probes,
)


def _cache(n, num_classes=4, dim=12, seed=0, informative_block=-1):
    """Synthetic feature cache: only one block's CLS token carries the (separable) class."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)) * 2
    labels = torch.randint(0, num_classes, (n,), generator=g)
    blocks = torch.randn(n, 4, dim, generator=g) * 0.5
    blocks[:, informative_block] += centers[labels]
    return {"cls_blocks": blocks, "patch_mean": torch.randn(n, dim, generator=g), "labels": labels}


def test_build_linear_inputs_orders_blocks_and_pools():
    cache = {"cls_blocks": torch.arange(2 * 4 * 3.0).reshape(2, 4, 3), "patch_mean": -torch.ones(2, 3)}
    one = build_linear_inputs(cache, 1, False)
    assert torch.equal(one, cache["cls_blocks"][:, 3])
    four_pool = build_linear_inputs(cache, 4, True)
    assert four_pool.shape == (2, 15)
    assert torch.equal(four_pool[:, :3], cache["cls_blocks"][:, 0])
    assert torch.equal(four_pool[:, -3:], -torch.ones(2, 3))
    with pytest.raises(ValueError, match="only 4 block"):
        build_linear_inputs(cache, 5, False)


def test_separable_features_reach_high_accuracy_and_grid_is_reported():
    train, test = _cache(400, seed=0), _cache(200, seed=1)
    lrs = (1e-4, 1e-2, 0.1)
    res = train_linear_probes(train, None, test, learning_rates=lrs, epochs=10, batch_size=64)
    assert len(res["grid"]) == 2 * 2 * len(lrs)
    assert {(r["n_last_blocks"], r["avgpool"], r["lr"]) for r in res["grid"]} == {
        (n, a, lr) for n in (1, 4) for a in (False, True) for lr in lrs
    }
    assert res["test_top1"] > 95.0
    assert res["best"]["val_top1"] == max(r["val_top1"] for r in res["grid"])
    assert res["num_train"] + res["num_val"] == 400
    assert isinstance(res["best_head"], torch.nn.Linear)


def test_probe_needs_the_right_blocks():
    # Class information only in block -3: the last block alone is at chance, the last 4 blocks are not.
    train, test = _cache(400, seed=0, informative_block=-3), _cache(200, seed=1, informative_block=-3)
    res = train_linear_probes(
        train, None, test, n_last_blocks_list=(1, 4), avgpool_list=(False,), learning_rates=(0.1,), epochs=10,
        batch_size=64,
    )
    by_blocks = {r["n_last_blocks"]: r["val_top1"] for r in res["grid"]}
    assert by_blocks[4] > 90.0
    assert by_blocks[1] < 60.0
    assert res["best"]["n_last_blocks"] == 4 and res["test_top1"] > 95.0


def test_heads_trained_together_equal_heads_trained_alone():
    train, val = _cache(128, seed=0), _cache(64, seed=1)
    common = dict(n_last_blocks_list=(1, 4), avgpool_list=(False, True), epochs=3, batch_size=32, seed=7)
    together = train_linear_probes(train, val, learning_rates=(1e-3, 0.05), **common)
    alone = train_linear_probes(train, val, learning_rates=(0.05,), **common)
    for key, head in alone["heads"].items():
        torch.testing.assert_close(together["heads"][key].weight, head.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(together["heads"][key].bias, head.bias, rtol=1e-5, atol=1e-6)


def test_one_full_batch_step_is_plain_sgd_with_each_heads_lr():
    # One epoch, one full batch: the cosine factor is 1 and the momentum buffer is the gradient,
    # so every head is W0 - lr * dL/dW(W0) with the same W0 (shared init per setting).
    train, val = _cache(64, seed=0), _cache(16, seed=1)
    lrs = (0.01, 0.1, 0.3)
    res = train_linear_probes(
        train, val, n_last_blocks_list=(4,), avgpool_list=(True,), learning_rates=lrs, epochs=1, batch_size=64
    )
    w = {lr: res["heads"][(4, True, lr)].weight for lr in lrs}
    b = {lr: res["heads"][(4, True, lr)].bias for lr in lrs}
    grad_w = (w[0.01] - w[0.1]) / (0.1 - 0.01)
    grad_b = (b[0.01] - b[0.1]) / (0.1 - 0.01)
    w0, b0 = (w[0.01] + 0.01 * grad_w).requires_grad_(True), (b[0.01] + 0.01 * grad_b).requires_grad_(True)
    x = build_linear_inputs(train, 4, True)
    torch.nn.functional.cross_entropy(x @ w0.T + b0, train["labels"]).backward()
    torch.testing.assert_close(w0.grad, grad_w, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(b0.grad, grad_b, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(w[0.3], (w0 - 0.3 * w0.grad).detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["sklearn", "torch"])
def test_logistic_regression_on_separable_features(backend):
    train, test = _cache(300, seed=0), _cache(150, seed=1)
    x, xt = train["cls_blocks"][:, -1], test["cls_blocks"][:, -1]
    res = logistic_regression_probe(x, train["labels"], xt, test["labels"], Cs=(1e-4, 0.1, 10.0), backend=backend)
    assert [r["C"] for r in res["grid"]] == [1e-4, 0.1, 10.0]
    assert res["test_top1"] > 95.0
    assert res["backend"] == backend


def test_logistic_regression_random_labels_near_chance():
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(300, 8, generator=g), torch.randn(300, 8, generator=g)
    y, yt = torch.randint(0, 4, (300,), generator=g), torch.randint(0, 4, (300,), generator=g)
    res = logistic_regression_probe(x, y, xt, yt, Cs=(0.01, 1.0), backend="torch")
    assert res["test_top1"] < 40.0


def test_stratified_split_holds_out_every_class():
    labels = torch.tensor([0] * 10 + [1] * 20 + [2] * 1)
    tr, va = stratified_split(labels, 0.1, seed=0)
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(31))
    assert labels[va].tolist().count(0) == 1 and labels[va].tolist().count(1) == 2
    assert 2 not in labels[va].tolist()  # a singleton class stays in train


def test_errors_are_clear():
    train = _cache(50)
    train["labels"][0] = -1
    with pytest.raises(ValueError, match="negative"):
        train_linear_probes(train, learning_rates=(0.1,))
    with pytest.raises(ValueError, match="backend"):
        logistic_regression_probe(torch.randn(10, 2), torch.arange(10) % 2, backend="cuml")


class TinyViTLike(torch.nn.Module):
    """Stand-in with DINOv2's get_intermediate_layers(return_class_token=True) output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Conv2d(3, 6, kernel_size=7, stride=7)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(6, 6) for _ in range(4))
        self.norm = torch.nn.LayerNorm(6)

    def get_intermediate_layers(self, x, n, return_class_token=False, norm=True):
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)
        outs = []
        for blk in self.blocks:
            tokens = tokens + torch.tanh(blk(tokens))
            outs.append(self.norm(tokens) if norm else tokens)
        outs = outs[-n:]
        return tuple((o[:, 1:], o[:, 0]) for o in outs)


def test_linear_probe_end_to_end_with_stand_in_model():
    # Classes differ by brightness: any reasonable feature separates them.
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (80,), generator=g)
    images = torch.rand(80, 3, 14, 14, generator=g) * 0.2 + labels[:, None, None, None].float() * 0.8
    ds = list(zip(images, labels.tolist()))
    model = TinyViTLike()
    cache = extract_linear_features(model, ds, n_last_blocks=4, autocast_dtype="fp32", progress=False)
    assert cache["cls_blocks"].shape == (80, 4, 6) and cache["patch_mean"].shape == (80, 6)
    res = linear_probe(
        model, ds[:60], ds[60:], learning_rates=(0.1, 0.5), epochs=20, batch_size=16, autocast_dtype="fp32",
        progress=False,
    )
    assert res["test_top1"] == 100.0 and res["num_skipped"] == 0
