"""The tiny training setup the tests share: the quickstart recipe shrunk to a 2-block ViT on 16 px crops.

``TINY_NETWORK`` is the network (a 32-wide ViT with 4 px patches and small DINO/iBOT heads) and its crops;
``TINY_RUN`` adds a run of a few steps on 8 images that reads Fashion-MNIST's IDX files directly (no shards),
in fp32, without TensorBoard or the final kNN. A step takes a fraction of a second on one core. Test modules
append what they need (later overrides win).
"""

TINY_NETWORK = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=4", "model.img_size=16",
    "dino.head_n_prototypes=64", "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32",
    "ibot.head_n_prototypes=64", "ibot.head_hidden_dim=64", "ibot.head_bottleneck_dim=32",
    "crops.global_crops_size=16", "crops.local_crops_size=8", "crops.local_crops_number=2",
    # the per-sample photometry in the transform, as every method supports (the quickstart batches it on the device)
    "crops.photometric_on_device=false",
]

TINY_RUN = [
    *TINY_NETWORK,
    "train.batch_size_per_rank=8", "train.num_workers=0", "train.log_every=1", "train.tensorboard=false",
    "train.official_epoch_length=4", "optim.epochs=5", "optim.warmup_epochs=1", "optim.scale_lr_with_batch=false",
    "evaluation.final_knn=false", "train.autocast=none",
    "train.dataset=fashion-mnist:train", "train.build_shards_from=null",
]
