"""Image transforms: decoding, crop geometry, photometry, the multi-crop and single-crop views, and masks.

Every transform draws its randomness from torch's global RNG (or a passed generator / ``random.Random``),
which the data loader seeds per sample and per step (:mod:`dinoscale.data.seeding`).
"""
