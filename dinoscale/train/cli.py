"""Command line of ``tools/train.py`` and ``python -m dinoscale.train``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dinoscale import checkpoint, distributed, lifecycle
from dinoscale.config import ConfigError, load_config
from dinoscale.train.step import TooManyBadSteps

log = logging.getLogger("dinoscale")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="DINOv2 pretraining (single process, torchrun or srun).",
        epilog="Example: python tools/train.py --config configs/quickstart.yaml train.max_steps=100",
    )
    parser.add_argument("--config", default=None, help="YAML config merged onto configs/default.yaml")
    parser.add_argument("--resume", dest="resume", action="store_true", default=None,
                        help="resume from the latest checkpoint in train.output_dir (the default)")
    parser.add_argument("--no-resume", dest="resume", action="store_false", help="start from scratch")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.output_dir=DIR")
    return parser.parse_args(argv)


def last_good_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest intact checkpoint written after a finite step (none of the steps before it skipped)."""
    for path in reversed(checkpoint.list_checkpoints(output_dir)):
        try:
            if checkpoint.check_checkpoint(path).get("consecutive_bad_steps", 0) == 0:
                return path
        except checkpoint.CheckpointError:
            continue
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"train.resume={str(args.resume).lower()}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    info = distributed.init_distributed()
    logging.basicConfig(
        level=logging.INFO if info.rank == 0 else logging.WARNING,
        format=f"[%(asctime)s rank{info.rank}] %(message)s",
        datefmt="%H:%M:%S",
    )
    from dinoscale.train.loop import train

    stop = lifecycle.install_stop_handler()
    try:
        result = train(cfg, stop_requested=stop)
    except BaseException as exc:  # every way out of a failed run tears it down, so that the process exits
        code = lifecycle.fatal_error(exc)
        if isinstance(exc, TooManyBadSteps) and info.rank == 0:
            log.error("last good checkpoint: %s", last_good_checkpoint(cfg.train.output_dir)
                      or "none (no checkpoint was written after a finite step)")
        return code
    finally:
        distributed.destroy_distributed()
    if result.knn and info.rank == 0:
        k = cfg.evaluation.knn_k
        print(f"knn@{k} " + " ".join(f"{name}={value:.2f}%" for name, value in result.knn.items()), flush=True)
    # 3 tells a batch script "stopped on request, requeue me" apart from success (0) and failure (1).
    return 3 if result.status == "preempted" else 0
