"""The README's quickstart figures: wall time, peak memory, images/s, MFU and the final kNN of one run.

    python benchmarks/quickstart_wall.py                               # as the README measured it
    python benchmarks/quickstart_wall.py --md benchmarks/quickstart_wall.md
    python benchmarks/quickstart_wall.py -- train.max_steps=20 evaluation.knn_max_train_samples=2000
                                                                       # a short run (overrides go to train.py)

Runs ``python tools/train.py --config configs/quickstart.yaml [overrides]`` as a subprocess from the repository
root, with ``train.output_dir`` in a fresh temporary directory (``--out`` to keep it), and reports:

* wall time: from starting the subprocess to its exit (Python start-up, shard writing, training, the final kNN);
* peak memory: the largest sum over the process tree (the training process and its data-loader workers) of each
  process's ``Pss`` (``/proc/PID/smaps_rollup``: pages shared between the processes, such as a forked worker's
  copy-on-write pages, counted once), sampled every ``--poll`` seconds; and the largest single process's
  high-water mark (``getrusage(RUSAGE_CHILDREN).ru_maxrss``: exact, but per process and counting shared pages);
* from the run's ``metrics.jsonl``: the median ``images_per_s`` and ``perf/mfu`` over its log rows (each the mean
  over the ``train.log_every`` steps before it), and the ``final_knn`` row;
* the ``knn@...`` line the run prints at the end.

``--shards fresh`` (the default) points ``train.dataset`` into the temporary directory too, so the run writes
the Fashion-MNIST shards first, as a fresh checkout does (the README's time includes that); ``--shards config``
uses the config's path (written there on first use, reused after).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KNN_LINE = re.compile(r"^knn@\d+ .*$")


def summarize_metrics(path: str | Path) -> dict:
    """Medians of a run's ``metrics.jsonl`` log rows and its ``final_knn`` row.

    Log rows are those with ``images_per_s`` and no ``type`` (eval and final_knn rows have one). Returns
    ``{"log_rows", "last_step", "images_per_s", "mfu", "tflops_per_s", "final_knn"}``; a median is None when no
    row has the value, ``final_knn`` is the row without ``type``/``step`` (None when the run has none).
    """
    rows = []
    final = None
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("type") == "final_knn":
            final = {k: v for k, v in row.items() if k not in ("type", "step")}
        elif "type" not in row and "images_per_s" in row:
            rows.append(row)

    def median(key):
        values = [r[key] for r in rows if key in r]
        return statistics.median(values) if values else None

    return {
        "log_rows": len(rows),
        "last_step": rows[-1]["step"] if rows else None,
        "images_per_s": median("images_per_s"),
        "mfu": median("perf/mfu"),
        "tflops_per_s": median("perf/tflops_per_s"),
        "final_knn": final,
    }


def _children(pid: int) -> list[int]:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    kids = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return kids


def _memory_bytes(pid: int) -> int:
    """``Pss`` of a process (its private pages plus its share of pages shared with others, such as a forked
    data-loader worker's copy-on-write pages), or ``VmRSS`` where ``smaps_rollup`` is missing; 0 once it exited."""
    for path, key in ((f"/proc/{pid}/smaps_rollup", "Pss:"), (f"/proc/{pid}/status", "VmRSS:")):
        try:
            with open(path) as f:
                return next((int(line.split()[1]) * 1024 for line in f if line.startswith(key)), 0)
        except FileNotFoundError:
            continue
        except OSError:  # it has exited
            return 0
    return 0


def tree_memory_bytes(pid: int) -> int:
    """Sum of :func:`_memory_bytes` over ``pid`` and all its descendants: the tree's resident memory, shared
    pages counted once (PSS). Processes gone meanwhile count 0."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        total += _memory_bytes(p)
        todo += _children(p)
    return total


class TreeMemorySampler:
    """Samples :func:`tree_memory_bytes` of a process every ``interval`` seconds in a thread; ``peak``: the largest."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_memory_bytes(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_quickstart(config: str, overrides: list[str], output_dir: Path, poll: float, log_path: Path) -> dict:
    """Run tools/train.py, echoing its output to stdout and ``log_path``; wall time, memory, the kNN line."""
    cmd = [sys.executable, "tools/train.py", "--config", config, *overrides, f"train.output_dir={output_dir}"]
    knn_line = None
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        with TreeMemorySampler(proc.pid, poll) as sampler:
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
                if KNN_LINE.match(line.strip()):
                    knn_line = line.strip()
            returncode = proc.wait()
    wall = time.perf_counter() - start
    return {
        "command": cmd,
        "returncode": returncode,
        "wall_s": wall,
        "peak_tree_bytes": sampler.peak,
        # Linux reports ru_maxrss in KiB: the largest high-water mark among the waited-for descendants
        "peak_single_process_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "knn_line": knn_line,
    }


def format_wall(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def report(run: dict, metrics: dict) -> list[str]:
    """The summary lines (also what ``--md`` writes, as a list)."""
    GB = 1e9
    knn = metrics["final_knn"]
    return [
        f"wall time: {format_wall(run['wall_s'])} ({run['wall_s']:.1f} s), exit status {run['returncode']}",
        f"peak memory: {run['peak_tree_bytes'] / GB:.2f} GB summed over the process tree (PSS, sampled), "
        f"{run['peak_single_process_bytes'] / GB:.2f} GB the largest single process (ru_maxrss)",
        "training: median over {n} log rows (to step {s}): {ips} images/s, perf/mfu {mfu}, {tf} TFLOP/s".format(
            n=metrics["log_rows"], s=metrics["last_step"],
            ips="-" if metrics["images_per_s"] is None else f"{metrics['images_per_s']:.1f}",
            mfu="-" if metrics["mfu"] is None else f"{metrics['mfu']:.1%}",
            tf="-" if metrics["tflops_per_s"] is None else f"{metrics['tflops_per_s']:.3f}"),
        f"final kNN (metrics.jsonl): {knn if knn is not None else 'none'}",
        f"printed: {run['knn_line'] or '(no knn@ line)'}",
    ]


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True)
        return done.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides for tools/train.py (after --)")
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--shards", choices=("fresh", "config"), default="fresh",
                        help="fresh: write the shards in the temporary directory as part of the run (the README's "
                             "first run); config: the config's train.dataset")
    parser.add_argument("--out", default=None, help="keep the run here (default: a temporary directory, removed)")
    parser.add_argument("--poll", type=float, default=0.2, help="seconds between memory samples")
    parser.add_argument("--md", default=None, help="also write the figures, with the command, to this file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="quickstart_wall_") as tmp:
        root = Path(args.out).resolve() if args.out else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        overrides = list(args.overrides)
        if args.shards == "fresh":
            overrides.insert(0, f"train.dataset={root / 'fashion-mnist-shards' / 'train'}")
        output_dir = root / "run"
        run = run_quickstart(args.config, overrides, output_dir, args.poll, root / "train.log")
        metrics_path = output_dir / "metrics.jsonl"
        metrics = summarize_metrics(metrics_path) if metrics_path.exists() else summarize_metrics(os.devnull)
    lines = report(run, metrics)
    print("\n".join(["", "# quickstart_wall", *lines]))
    if args.md:
        shown = shlex.join(["python", "benchmarks/quickstart_wall.py", *(sys.argv[1:] if argv is None else argv)])
        dirty = " (with uncommitted changes)" if _git("status", "--porcelain") else ""
        text = [
            f"# Quickstart wall time and memory ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
            f"`{shown}` at {_git('rev-parse', '--short', 'HEAD')}{dirty}; the run: `{shlex.join(run['command'][1:])}`",
            "", *[f"- {line}" for line in lines], "",
        ]
        Path(args.md).write_text("\n".join(text))
    return run["returncode"]


if __name__ == "__main__":
    sys.exit(main())
