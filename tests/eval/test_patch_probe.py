"""The patch-level probe (``dinoscale.eval.patch_probe``): patch labels of a hand-made image (also through a
backbone's evaluation transform), the scores against a hand-computed confusion matrix, the probes on features that
encode the label perfectly (mIoU 1) and on random features (chance), and the within-image similarities."""

import math

import pytest
import torch
from torch.utils.data import Dataset

from dinoscale.eval import patch_probe as pp
from dinoscale.models.factory import build_backbone


def hand_made_image():
    """A 16 x 16 gray image (uint8), 2 x 2 patches of 8 px, against the default threshold 0.1 (25.5 / 255):
    top-left: exactly half of its 64 pixels bright -> foreground; top-right: 31 bright -> background;
    bottom-left: all bright -> foreground; bottom-right: all dim (20 / 255, below the threshold) -> background."""
    image = torch.zeros(16, 16, dtype=torch.uint8)
    image[0:4, 0:8] = 200  # 32 pixels
    image[0:3, 8:16] = 200  # 24 ...
    image[3, 8:15] = 200  # ... + 7 = 31 pixels
    image[8:16, 0:8] = 200
    image[8:16, 8:16] = 20
    return image


def test_patch_labels_of_a_hand_made_image():
    image = hand_made_image().float() / 255
    fraction = pp.foreground_fraction(image[None], patch_size=8)
    torch.testing.assert_close(fraction[0], torch.tensor([[32 / 64, 31 / 64], [1.0, 0.0]]))
    labels = pp.patch_labels(fraction, torch.tensor([3]))
    assert labels.tolist() == [[[4, 0], [4, 0]]]  # class 3 -> label 4 where at least half is foreground
    assert pp.patch_labels(fraction, torch.tensor([0]), min_fraction=0.6).tolist() == [[[0, 0], [1, 0]]]
    # a lower threshold makes the dim patch foreground too
    assert pp.patch_labels(pp.foreground_fraction(image[None], 8, threshold=0.05), torch.tensor([3])).tolist() == [
        [[4, 0], [4, 4]]]


class GrayImages(Dataset):
    def __init__(self, images, classes):
        self.images, self.classes = images, classes

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i].expand(3, -1, -1), self.classes[i]


def test_extract_patch_data_labels_the_pixels_the_backbone_sees():
    torch.manual_seed(0)
    model = build_backbone("dinov3_vits16", patch_size=8, embed_dim=32, depth=1, num_heads=2, img_size=16).eval()
    image = hand_made_image()
    flipped = image.flip(1)  # the foreground halves swap sides
    data = pp.extract_patch_data(model, GrayImages([image[None], flipped[None]], [3, 7]), image_size=16,
                                 batch_size=2, autocast_dtype="fp32")
    assert data["grid"] == (2, 2) and data["patches"].shape == (2, 4, 32) and data["cls"].shape == (2, 32)
    assert data["labels"].tolist() == [[4, 0, 4, 0], [0, 8, 0, 8]]  # row-major, the tokens' order
    assert data["classes"].tolist() == [3, 7]
    expected = model.forward_features(pp.eval_transform(16, 8, crop_ratio=1.0)(image[None].expand(3, -1, -1))[None])
    torch.testing.assert_close(data["patches"][0], expected["x_norm_patchtokens"][0])
    # at 32 px (resized 2x) the grid is 4 x 4: the bright top rows (4 at 16 px) fill the first row of patches
    up = pp.extract_patch_data(model, GrayImages([image[None]], [3]), image_size=32, autocast_dtype="fp32")
    assert up["grid"] == (4, 4)
    assert up["labels"].reshape(4, 4).tolist() == [[4, 4, 4, 4], [0, 0, 0, 0], [4, 4, 0, 0], [4, 4, 0, 0]]


def test_scores_of_a_hand_computed_confusion_matrix():
    # 3 labels (0 background); targets and predictions of 10 patches
    target = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    pred = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 0])
    m = pp.confusion_matrix(target, pred, 3)
    assert m.tolist() == [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
    s = pp.segmentation_scores(m)
    # IoU_0 = 3 / (4 + 4 - 3), IoU_1 = 2 / (3 + 3 - 2), IoU_2 = 2 / (3 + 3 - 2)
    iou = [3 / 5, 2 / 4, 2 / 4]
    assert s["iou"] == pytest.approx(iou)
    assert s["miou"] == pytest.approx(sum(iou) / 3)
    assert s["patch_accuracy"] == pytest.approx(7 / 10)
    # foreground (labels 1, 2) vs background: [[3, 1], [1, 5]] -> bg IoU 3 / 5, fg IoU 5 / 7
    assert s["background_iou"] == pytest.approx(3 / 5) and s["foreground_iou"] == pytest.approx(5 / 7)
    # a label in neither the targets nor the predictions is left out of the mean
    s4 = pp.segmentation_scores(pp.confusion_matrix(target, pred, 4))
    assert math.isnan(s4["iou"][3]) and s4["miou"] == pytest.approx(s["miou"])
    with pytest.raises(ValueError, match="lie in"):
        pp.confusion_matrix(target, pred, 2)


def synthetic_patches(n_images, seed, dim=16, perfect=True):
    """(N, 16, dim) patch features and (N, 16) labels: image i of class i % 10, a random half of its patches
    foreground. ``perfect``: the features are the one-hot label (+ small noise), else independent noise."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.arange(n_images) % 10
    fg = torch.rand(n_images, 16, generator=g) < 0.5
    labels = torch.where(fg, classes[:, None] + 1, torch.zeros_like(fg, dtype=torch.long))
    noise = 0.05 * torch.randn(n_images, 16, dim, generator=g)
    if perfect:
        return torch.nn.functional.one_hot(labels, dim).float() + noise, labels
    return torch.randn(n_images, 16, dim, generator=g), labels


def test_features_that_encode_the_label_give_miou_one():
    train, train_y = synthetic_patches(40, 0)
    test, test_y = synthetic_patches(20, 1)
    probe = pp.fit_patch_probe(train, train_y, test, test_y, backend="torch")
    assert probe["miou"] == 1.0 and probe["patch_accuracy"] == 1.0 and probe["foreground_iou"] == 1.0
    assert probe["num_patches"] == 20 * 16 and probe["num_train_patches"] == 40 * 16
    knn = pp.patch_knn(train, train_y, test, test_y, k=5)
    assert knn["miou"] == 1.0


def test_random_features_are_at_chance():
    train, train_y = synthetic_patches(200, 0, perfect=False)
    test, test_y = synthetic_patches(100, 1, perfect=False)
    probe = pp.fit_patch_probe(train, train_y, test, test_y, Cs=(0.01, 1.0), backend="torch")
    assert [row["C"] for row in probe["grid"]] == [0.01, 1.0] and probe["C"] in (0.01, 1.0)
    # Chance: background is about half the patches, each class about 5%. Always answering "background" scores
    # a patch accuracy of about 0.5 and an mIoU of about 0.5 / 11; a guess that knows nothing cannot do much better.
    majority = float((test_y == 0).float().mean())
    assert probe["patch_accuracy"] < majority + 0.05
    assert probe["miou"] < 0.1
    assert pp.patch_knn(train, train_y, test, test_y)["miou"] < 0.1


def test_within_image_similarities():
    # one image: 2 foreground tokens along e0, 2 background tokens along e1; its CLS along e0
    e = torch.eye(3)
    patches = torch.stack([e[0], 2 * e[0], e[1], e[1]])[None]
    labels = torch.tensor([[5, 5, 0, 0]])
    stats = pp.patch_similarity_stats(patches, labels, cls=e[0][None])
    assert stats["fg_fg"] == 1.0 and stats["bg_bg"] == 1.0 and stats["fg_bg"] == 0.0
    assert stats["all"] == pytest.approx(4 / 12)  # 4 of the 12 ordered distinct pairs are alike
    assert stats["cls_fg"] == 1.0 and stats["cls_bg"] == 0.0 and stats["cls_patch"] == 0.5
    assert math.isnan(pp.patch_similarity_stats(patches, torch.zeros(1, 4, dtype=torch.long))["fg_fg"])


def test_per_image_confusions_and_their_bootstrap():
    target = torch.tensor([[0, 1, 1], [0, 0, 2]])
    pred = torch.tensor([[0, 1, 0], [1, 0, 2]])
    per_image = pp.image_confusions(target, pred, 3)
    assert per_image[0].tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]
    assert per_image[1].tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 1]]
    assert torch.equal(per_image.sum(dim=0), pp.confusion_matrix(target, pred, 3))
    # resamples of one image are that image: every bootstrap mIoU is its mIoU
    one = pp.segmentation_scores(per_image[0])["miou"]
    assert pp.bootstrap_miou(per_image[:1], samples=5) == [one] * 5
    # the resamples depend on the seed and the number of images only: two backbones get the same ones
    draws = pp.bootstrap_miou(per_image, samples=50, seed=3)
    assert draws == pp.bootstrap_miou(per_image, samples=50, seed=3) and len(set(draws)) > 1
    assert min(draws) <= pp.segmentation_scores(per_image.sum(dim=0))["miou"] <= max(draws)
