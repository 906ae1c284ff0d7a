"""Command line of ``tools/train.py`` and ``python -m dinoscale.train``, and the process set-up around a training
run that it shares with ``dinoscale.pretrain`` (:func:`training_process`)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def training_process(*, configure_logging: bool = False) -> Iterator[lifecycle.StopRequest | None]:
    """The process around one ``train()`` call, for the command line and ``dinoscale.pretrain`` alike.

    Joins the process group of torchrun or SLURM (none in a single process) and routes the stop signals (SLURM's
    preemption and time-out notices, scancel, SIGINT) to the :class:`~dinoscale.lifecycle.StopRequest` it yields,
    which ``train()`` reads at each step boundary; None off the main thread, where Python cannot handle signals.
    On the way out it restores the signal handlers it replaced and destroys the process group if it created it.

    ``configure_logging``: the command line's logging (INFO on rank 0, WARNING on the others, the rank in each
    line); a library call leaves logging to its caller.
    """
    created_group = not distributed.is_enabled()
    info = distributed.init_distributed()
    try:
        if configure_logging:
            logging.basicConfig(
                level=logging.INFO if info.rank == 0 else logging.WARNING,
                format=f"[%(asctime)s rank{info.rank}] %(message)s",
                datefmt="%H:%M:%S",
            )
        stop, replaced = None, {}
        if threading.current_thread() is threading.main_thread():
            stop = lifecycle.StopRequest()
            replaced = {signum: stop.install(signum) for signum in (*lifecycle.STOP_SIGNALS, signal.SIGINT)}
        try:
            yield stop
        finally:
            for signum, handler in replaced.items():
                signal.signal(signum, handler)
    finally:
        if created_group:
            distributed.destroy_distributed()


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

    with training_process(configure_logging=True) as stop:
        from dinoscale.train.loop import train

        rank = distributed.get_rank()
        try:
            result = train(cfg, stop_requested=stop)
        except BaseException as exc:  # every way out of a failed run tears it down, so that the process exits
            code = lifecycle.fatal_error(exc)  # before the process group goes: its teardown bounds the exit
            if isinstance(exc, TooManyBadSteps) and rank == 0:
                log.error("last good checkpoint: %s", last_good_checkpoint(cfg.train.output_dir)
                          or "none (no checkpoint was written after a finite step)")
            return code
        if result.knn and rank == 0:
            k = cfg.evaluation.knn_k
            print(f"knn@{k} " + " ".join(f"{name}={value:.2f}%" for name, value in result.knn.items()), flush=True)
    # 3 tells a batch script "stopped on request, requeue me" apart from success (0) and failure (1).
    return 3 if result.status == "preempted" else 0
