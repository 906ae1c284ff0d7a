import math

import pytest
import torch

from dinoscale.eval.knn import flatten_images, knn_classify, knn_metrics, knn_predict


def _clusters(n_per_class, num_classes, dim, noise, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g) * 5
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = centers[labels] + noise * torch.randn(labels.numel(), dim, generator=g)
    return feats, labels


def test_separable_clusters_are_perfect():
    train_x, train_y = _clusters(40, 5, 16, 0.1, 0)
    test_x, test_y = _clusters(10, 5, 16, 0.1, 0)  # same centers (same seed), fresh noise below
    test_x = test_x + 0.05 * torch.randn(test_x.shape, generator=torch.Generator().manual_seed(1))
    res = knn_classify(train_x, train_y, test_x, test_y, ks=(1, 10, 20), batch_size=7)
    for k in (1, 10, 20):
        assert res[k]["top1"] == 100.0
        assert res[k]["top5"] == 100.0


def test_hand_checked_votes():
    # Train points on the unit circle; query at angle 0.
    angles = torch.tensor([0.1, 0.2, 0.3, 1.0, 1.1])
    train = torch.stack([angles.cos(), angles.sin()], dim=1)
    train_y = torch.tensor([0, 1, 1, 0, 0])
    query = torch.tensor([[1.0, 0.0]])
    T = 0.1
    # k=1: nearest (0.1) is class 0.
    # k=3: class 0 weight exp(cos 0.1 / T) vs class 1 exp(cos .2/T)+exp(cos .3/T) -> class 1.
    w = lambda a: math.exp(math.cos(a) / T)
    assert w(0.2) + w(0.3) > w(0.1)
    # k=5: class 0 gets w(.1)+w(1.0)+w(1.1); check which wins by hand.
    class0_k5 = w(0.1) + w(1.0) + w(1.1)
    class1_k5 = w(0.2) + w(0.3)
    expected_k5 = 0 if class0_k5 > class1_k5 else 1
    assert expected_k5 == 1  # the far class-0 points are down-weighted by the temperature
    for label, expect in ((0, {1: 100.0, 3: 0.0, 5: 0.0}), (1, {1: 0.0, 3: 100.0, 5: 100.0})):
        res = knn_classify(train, train_y, query, torch.tensor([label]), ks=(1, 3, 5), temperature=T)
        assert {k: v["top1"] for k, v in res.items()} == expect
        # Only two classes: the true label is always among the top 5.
        assert all(v["top5"] == 100.0 for v in res.values())
    # A hotter temperature flattens the weights: three class-0 votes beat two class-1 votes.
    res = knn_classify(train, train_y, query, torch.tensor([0]), ks=(5,), temperature=100.0)
    assert res[5]["top1"] == 100.0


def test_random_labels_are_chance_level():
    g = torch.Generator().manual_seed(0)
    num_classes = 10
    train = torch.randn(2000, 32, generator=g)
    test = torch.randn(1000, 32, generator=g)
    train_y = torch.randint(0, num_classes, (2000,), generator=g)
    test_y = torch.randint(0, num_classes, (1000,), generator=g)
    res = knn_classify(train, train_y, test, test_y, ks=(20,))
    assert 5.0 < res[20]["top1"] < 15.0
    assert 40.0 < res[20]["top5"] < 60.0


def test_pixels_and_metric_names():
    # Raw "pixels": two classes of images = dark vs bright.
    g = torch.Generator().manual_seed(0)
    dark = torch.rand(20, 1, 8, 8, generator=g) * 0.3
    bright = 0.7 + torch.rand(20, 1, 8, 8, generator=g) * 0.3
    images = torch.cat([dark, bright])
    # Center so cosine similarity separates brightness.
    feats = flatten_images(images) - 0.5
    labels = torch.tensor([0] * 20 + [1] * 20)
    res = knn_classify(feats[::2], labels[::2], feats[1::2], labels[1::2], ks=(5,))
    assert res[5]["top1"] == 100.0
    assert knn_metrics(res) == {"knn/top1@5": 100.0, "knn/top5@5": 100.0}


def test_k_larger_than_train_is_clamped_with_warning():
    train = torch.randn(4, 3)
    with pytest.warns(UserWarning, match="k=10"):
        res = knn_classify(train, torch.tensor([0, 1, 0, 1]), train, torch.tensor([0, 1, 0, 1]), ks=(10,))
    assert set(res) == {10}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(train_features=torch.randn(4)), "2-D"),
        (dict(train_labels=torch.tensor([0, 1, 2])), "one label per feature"),
        (dict(test_features=torch.randn(2, 5)), "feature dims differ"),
        (dict(train_labels=torch.tensor([0, -1, 1, 0])), "negative"),
        (dict(num_classes=1), "out of range"),
        (dict(ks=(0,)), "positive"),
        (dict(train_labels=torch.tensor([0.0, 1.0, 0.0, 1.0])), "integer"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, message):
    args = dict(
        train_features=torch.randn(4, 3),
        train_labels=torch.tensor([0, 1, 0, 1]),
        test_features=torch.randn(2, 3),
        test_labels=torch.tensor([0, 1]),
    )
    args.update(kwargs)
    ks = args.pop("ks", (1,))
    num_classes = args.pop("num_classes", None)
    with pytest.raises(ValueError, match=message):
        knn_classify(**args, ks=ks, num_classes=num_classes)


def test_knn_predict_gives_the_vote_knn_classify_scores():
    # The hand-checked circle: k=1 picks the nearest point's class 0, k=3 the two class-1 points (see above).
    angles = torch.tensor([0.1, 0.2, 0.3, 1.0, 1.1])
    train = torch.stack([angles.cos(), angles.sin()], dim=1)
    train_y = torch.tensor([0, 1, 1, 0, 0])
    query = torch.tensor([[1.0, 0.0], [math.cos(1.05), math.sin(1.05)]])  # the second sits among the class-0 pair
    assert knn_predict(train, train_y, query, k=1, temperature=0.1).tolist() == [0, 0]
    assert knn_predict(train, train_y, query, k=3, temperature=0.1).tolist() == [1, 0]
    # Against knn_classify on clusters: the predictions are right exactly where its top-1 counts them right.
    train_x, train_lab = _clusters(30, 4, 8, 8.0, 0)
    test_x, test_lab = _clusters(10, 4, 8, 8.0, 0)  # the same centres, and fresh noise:
    test_x = test_x + 8.0 * torch.randn(test_x.shape, generator=torch.Generator().manual_seed(1))
    pred = knn_predict(train_x, train_lab, test_x, k=10, batch_size=7)
    top1 = knn_classify(train_x, train_lab, test_x, test_lab, ks=(10,))[10]["top1"]
    assert pred.shape == (40,) and 0 < top1 < 100
    assert 100.0 * int((pred == test_lab).sum()) / 40 == top1
