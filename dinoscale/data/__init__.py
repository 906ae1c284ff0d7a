"""Data for pretraining and evaluation: sources, transforms, collates and the resumable loader.

Dependencies run one way, from the leaves up:

* ``seeding`` (seeds), ``skips`` (bad-data reporting) and ``transforms/`` (decode, geometry,
  photometric, multicrop, single_crop, masking, normalize) depend on nothing else here;
* ``sources/`` (image folders, Fashion-MNIST, shard reading, a transform wrapper) on those;
* ``open`` (a dataset from its config string), ``shard_writer`` (writing shards) and ``streams``
  (deterministic shard streams) on the sources; ``collate`` on ``transforms.masking``;
* ``steps`` (the data position: which samples make a step) on the streams and sources;
* ``loader`` (the pretraining loader) on the steps.
"""
