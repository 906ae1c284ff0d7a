#!/usr/bin/env python
"""Submit a training run to SLURM through submitit (or run it locally with ``--local``).

    python tools/submit.py --nodes 2 --ngpus 8 --partition learn --timeout 4320 \\
        --config configs/train/vitl14.yaml --output-dir /checkpoint/$USER/dinoscale/%j \\
        train.batch_size_per_rank=32

    python tools/submit.py --nodes 2 --ngpus 0 --tasks-per-node 1 --config configs/quickstart.yaml \\
        train.max_steps=200                  # CPU tasks, e.g. on slurm/dev-cluster

Every task runs :class:`dinoscale.launch.TrainingJob`: one process per GPU (``--ngpus`` per node), or
``--tasks-per-node`` CPU processes when ``--ngpus 0``; together they form one process group.
``%j`` in ``--output-dir`` becomes the SLURM job id (stable across requeues); the directory is
passed to training as ``train.output_dir`` and holds the checkpoints and metrics. submitit's
pickles and the task logs go to ``--log-dir`` (default: ``submitit_logs`` beside the ``%j``
folder). SLURM sends the time-out notice (USR2) ``--signal-delay`` seconds before the time limit, and
SIGTERM at the start of a preemption's ``GraceTime``; either way the ranks checkpoint at the next log
step and the job requeues itself (a SIGTERM that ends the job, from ``scancel`` or the time limit, does
not requeue): ``train.log_every`` steps and a checkpoint must fit in ``--signal-delay`` and the grace time.

``--dry-run`` prints the sbatch script that would be submitted and the config overrides, and
submits nothing (no SLURM needed).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

from dinoscale.launch import DEFAULT_MAX_REQUEUES, TrainingJob  # noqa: E402

DEFAULT_OUTPUT_DIR = "outputs/%j"
_MEM_RE = re.compile(r"^\d+[KMGT]?$")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Submit dinoscale training to SLURM with submitit (or run it locally).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    res = parser.add_argument_group("resources")
    res.add_argument("--nodes", type=int, default=1, help="number of nodes")
    res.add_argument("--ngpus", type=int, default=8,
                     help="GPUs per node, one task per GPU; 0 runs CPU tasks (see --tasks-per-node)")
    res.add_argument("--tasks-per-node", type=int, default=None,
                     help="CPU tasks per node; only with --ngpus 0 (default 1)")
    res.add_argument("--cpus-per-task", type=int, default=None,
                     help="CPUs per task (default: 10 with GPUs, 1 for CPU tasks)")
    res.add_argument("--mem", default=None,
                     help="memory per node in SLURM syntax (64G, 500M, 0 = all of it); default: the cluster's")
    res.add_argument("--timeout", type=int, default=2880, help="time limit in minutes")
    sched = parser.add_argument_group("scheduling")
    sched.add_argument("--partition", default=None)
    sched.add_argument("--account", default=None)
    sched.add_argument("--qos", default=None)
    sched.add_argument("--exclude", default=None, help="nodes to avoid, e.g. 'node[01-03],node07'")
    sched.add_argument("--constraint", default=None, help="node features, e.g. 'volta32gb'")
    sched.add_argument("--comment", default=None)
    sched.add_argument("--job-name", default="dinoscale")
    sched.add_argument("--signal-delay", type=int, default=90,
                       help="seconds before the time limit at which SLURM sends the checkpoint signal")
    sched.add_argument("--max-requeues", type=int, default=DEFAULT_MAX_REQUEUES,
                       help="end the job instead of requeueing after this many preemptions/time-outs")
    run = parser.add_argument_group("run")
    run.add_argument("--config", default=None, help="training config (YAML, merged onto configs/default.yaml)")
    run.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                     help="run directory, becomes train.output_dir; %%j is replaced by the job id")
    run.add_argument("--log-dir", default=None,
                     help="submitit's folder (job pickles, <jobid>_<task>_log.out/.err); no %%j allowed; "
                          "default: submitit_logs next to the job-id-free part of --output-dir")
    run.add_argument("--dry-run", action="store_true", help="print what would be submitted, submit nothing")
    run.add_argument("--local", action="store_true",
                     help="run the same entry point with submitit's LocalExecutor on this machine and wait")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    _validate(parser, args)
    return args


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("nodes", "timeout"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.ngpus < 0:
        parser.error(f"--ngpus must be >= 0, got {args.ngpus}")
    if args.tasks_per_node is not None:
        if args.ngpus > 0:
            parser.error(f"--tasks-per-node only applies with --ngpus 0 (with --ngpus {args.ngpus} "
                         "there is one task per GPU)")
        if args.tasks_per_node < 1:
            parser.error(f"--tasks-per-node must be >= 1, got {args.tasks_per_node}")
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        parser.error(f"--cpus-per-task must be >= 1, got {args.cpus_per_task}")
    if args.mem is not None and not _MEM_RE.match(args.mem):
        parser.error(f"--mem must look like 64G, 500M, 1T or 0, got '{args.mem}'")
    if args.signal_delay < 0:
        parser.error(f"--signal-delay must be >= 0, got {args.signal_delay}")
    if args.signal_delay >= args.timeout * 60:
        parser.error(f"--signal-delay ({args.signal_delay}s) must be shorter than --timeout ({args.timeout} min)")
    if args.max_requeues < 0:
        parser.error(f"--max-requeues must be >= 0, got {args.max_requeues}")
    if args.log_dir is not None and "%j" in args.log_dir:
        parser.error("--log-dir cannot contain %j: SLURM needs the log folder to exist before the job id is known")
    if args.local and args.nodes != 1:
        parser.error("--local runs on this machine only: use --nodes 1")
    if args.local and args.dry_run:
        parser.error("--local and --dry-run exclude each other")
    for item in args.overrides:
        if "=" not in item or item.startswith("="):
            parser.error(f"config override '{item}' is not of the form key=value")
        if item.split("=", 1)[0] == "train.output_dir":
            parser.error("set the run directory with --output-dir, not train.output_dir=")
    if args.config is not None and not Path(args.config).exists() and not _is_named_config(args.config):
        parser.error(f"--config: no such file '{args.config}'")


def _is_named_config(name: str) -> bool:
    # load_config also accepts a config under configs/ without its .yaml ending ("quickstart").
    from dinoscale.config import CONFIG_DIR

    return not Path(name).suffix and (CONFIG_DIR / f"{name}.yaml").exists()


def tasks_per_node(args: argparse.Namespace) -> int:
    return args.ngpus if args.ngpus > 0 else (args.tasks_per_node or 1)


def slurm_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """``submitit.SlurmExecutor`` parameters (named as its ``update_parameters`` takes them)."""
    params: dict[str, Any] = {
        "job_name": args.job_name,
        "nodes": args.nodes,
        "ntasks_per_node": tasks_per_node(args),
        "cpus_per_task": args.cpus_per_task or (10 if args.ngpus > 0 else 1),
        "time": args.timeout,
        "signal_delay_s": args.signal_delay,
        # One task dying for a real error ends the whole step at once instead of leaving the other
        # ranks blocked in a collective until the process-group timeout.
        "srun_args": ["--kill-on-bad-exit=1"],
        # The tasks unpickle dinoscale.launch.TrainingJob: import the same checkout as this script.
        "setup": [f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"],
    }
    if args.ngpus > 0:
        params["gpus_per_node"] = args.ngpus
    optional = {"mem": args.mem, "partition": args.partition, "account": args.account, "qos": args.qos,
                "exclude": args.exclude, "constraint": args.constraint, "comment": args.comment}
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def resolve_output_dir(template: str) -> str:
    """Absolute path (the job may start elsewhere); ``%j`` is kept for the job to expand."""
    return str(Path(template).expanduser().absolute())


def training_overrides(args: argparse.Namespace, output_dir: str) -> list[str]:
    return [*args.overrides, f"train.output_dir={output_dir}"]


def default_log_dir(output_dir: str) -> str:
    """``submitit_logs`` in the deepest folder of ``output_dir`` that does not depend on the job id.

    The log folder must exist before the job starts (SLURM does not create the directory of
    ``--output``, and the job id is only known after submission), so it cannot contain ``%j``:
    ``/ckpt/%j`` -> ``/ckpt/submitit_logs``; ``/ckpt/run1`` -> ``/ckpt/run1/submitit_logs``.
    """
    parts = Path(output_dir).parts
    for i, part in enumerate(parts):
        if "%j" in part:
            return str(Path(*parts[:i]) / "submitit_logs")
    return str(Path(output_dir) / "submitit_logs")


def render_sbatch(params: dict[str, Any], folder: str) -> str:
    """The sbatch script submitit will write for ``params`` (the same function it uses)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(folder)])
    return _make_sbatch_string(command=command, folder=folder, **params)


def check_config(args: argparse.Namespace, overrides: list[str]) -> None:
    """Fail at submission time, not in the queue, on a bad config or override."""
    from dinoscale.config import ConfigError, load_config

    try:
        load_config(args.config, overrides)
    except ConfigError as exc:
        sys.exit(f"config error: {exc}")


def main(argv: list[str] | None = None) -> int:
    import submitit

    args = parse_args(argv)
    output_dir = resolve_output_dir(args.output_dir)
    overrides = training_overrides(args, output_dir)
    check_config(args, overrides)
    folder = resolve_output_dir(args.log_dir) if args.log_dir else default_log_dir(output_dir)
    # The job may start in another directory than this one: pass the config file by absolute path.
    config = str(Path(args.config).absolute()) if args.config and Path(args.config).exists() else args.config
    job_fn = TrainingJob(config, overrides, max_requeues=args.max_requeues)

    if args.dry_run:
        params = slurm_parameters(args)
        print("# dry run: nothing submitted")
        print(f"# log dir (submitit folder): {folder}")
        print(f"# output dir: {output_dir}  (%j = the SLURM job id)")
        print(f"# config: {config}")
        print("# config overrides:")
        for item in overrides:
            print(f"#   {item}")
        print("# sbatch parameters:")
        for key in sorted(params):
            print(f"#   {key} = {params[key]!r}")
        print("# sbatch script:")
        print(render_sbatch(params, folder))
        return 0

    if args.local:
        # The local tasks inherit this environment; they unpickle TrainingJob from this checkout.
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=args.timeout, tasks_per_node=tasks_per_node(args),
                                   gpus_per_node=args.ngpus, signal_delay_s=args.signal_delay)
    else:
        executor = submitit.SlurmExecutor(folder=folder)
        executor.update_parameters(**slurm_parameters(args))
    job = executor.submit(job_fn)
    run_dir = output_dir.replace("%j", job.job_id)
    print(f"submitted job {job.job_id}" + (" (local)" if args.local else ""))
    print(f"  stdout: {job.paths.stdout}")
    print(f"  stderr: {job.paths.stderr}")
    print(f"  output dir: {run_dir}")
    sys.stdout.flush()
    if not args.local:
        return 0

    # Local runs are in the foreground: wait, and exit with the training's outcome.
    try:
        result = job.results()[0]  # rank 0's result (one entry per task)
    except Exception as exc:  # the job's own traceback is in its stderr log
        print(f"local job {job.job_id} failed: {exc} (see {job.paths.stderr})", file=sys.stderr)
        return 1
    print(f"local job {job.job_id}: {result.status} at step {result.step}")
    return 0 if result.status == "finished" else 3


if __name__ == "__main__":
    sys.exit(main())
