"""The per-channel mean and std (ImageNet statistics) that every view is normalised with."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
