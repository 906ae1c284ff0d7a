"""Image datasets behind one small interface.

Every dataset used by dinoscale is a map-style dataset whose ``__getitem__(i)`` returns
``(image, label)`` (or, for shards, an iterable dataset yielding such pairs):

* ``image`` is a PIL image, a ``uint8`` tensor of shape (C, H, W), or the encoded bytes of a
  JPEG/PNG/... file (the multi-crop augmentation accepts all three);
* ``label`` is an ``int``, ``-1`` when the sample is unlabeled;

and ``__len__`` gives the number of samples. Any torchvision dataset with RGB images already
fits. One module per source: image folders, Fashion-MNIST, WebDataset shards, and the wrapper that
applies a transform to any of them. :func:`dinoscale.data.open.open_dataset` opens one from its
config string.

Bad data never stops training: a sample that cannot be read or decoded is skipped and reported
(:mod:`dinoscale.data.skips`).
"""
