#!/usr/bin/env python
"""Pretrain a ViT with DINOv2: ``python tools/train.py --config configs/quickstart.yaml [key=value ...]``.

Works as a single process, under ``torchrun --nproc-per-node N``, and under ``srun`` (see slurm/).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dinoscale.train.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
