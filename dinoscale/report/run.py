"""What a training output directory says about its run: config, metrics rows, checkpoints, export, status.

A run directory is what ``tools/train.py`` writes to ``train.output_dir``: ``config.yaml`` (first, before any
step), ``metrics.jsonl``, ``checkpoints/step_N/``, ``eval/step_N/`` and, once training finished, ``export/``.
Everything but ``config.yaml`` may be missing (a run that crashed early, or is still running); the fields here
are then None or empty, never an error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from dinoscale import checkpoint
from dinoscale.train.build import planned_steps
from dinoscale.viz.curves import read_rows, rows_of_type

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
EXPORT_DIR = "export"
DATA_KEY_PREFIX = "data/"


class NotARunError(FileNotFoundError):
    """The directory is not a dinoscale training output directory."""


@dataclass
class RunSummary:
    run_dir: Path
    config: DictConfig
    config_text: str
    rows: List[dict] = field(default_factory=list)
    unreadable_lines: int = 0
    checkpoints: List[Path] = field(default_factory=list)  # intact ones, oldest first
    exports: List[Path] = field(default_factory=list)  # export/*_backbone.{safetensors,pth}

    @property
    def train_rows(self) -> List[dict]:
        return rows_of_type(self.rows, None)

    @property
    def last_step(self) -> Optional[int]:
        """The last logged training step (None before the first log step)."""
        steps = [int(r["step"]) for r in self.train_rows]
        return max(steps) if steps else None

    @property
    def planned_steps(self) -> Optional[int]:
        try:
            return planned_steps(self.config)
        except (AttributeError, KeyError, TypeError):  # an older or hand-edited config.yaml
            return None

    @property
    def final_knn(self) -> Optional[dict]:
        rows = rows_of_type(self.rows, "final_knn")
        return rows[-1] if rows else None

    @property
    def finished(self) -> bool:
        """Training reached its last step and exported the network (the final kNN may still be running)."""
        done = self.last_step is not None and self.planned_steps is not None and self.last_step >= self.planned_steps
        return self.final_knn is not None or (done and bool(self.exports))

    @property
    def skipped_steps(self) -> List[dict]:
        return rows_of_type(self.rows, "skipped_step")

    def status(self) -> str:
        """One line: finished, or how far the run got and what may have happened."""
        if self.finished:
            return "finished"
        if self.last_step is None:
            progress = "no step logged yet"
        else:
            planned = f" of {self.planned_steps}" if self.planned_steps is not None else ""
            progress = f"step {self.last_step}{planned}"
        limit = OmegaConf.select(self.config, "train.max_consecutive_bad_steps", default=None)
        worst = max((int(r.get("consecutive_bad_steps") or 0) for r in self.skipped_steps), default=0)
        if limit and worst >= limit:
            return f"stopped after {worst} consecutive non-finite steps ({progress})"
        ago = format_duration(time.time() - self.last_write_time())
        return f"incomplete: {progress}; last write {ago} ago (stopped, crashed or still running)"

    def start_time(self) -> float:
        """When the run started: config.yaml's write time (rewritten by a resume, so the first row's time counts
        too)."""
        times = [(self.run_dir / CONFIG_NAME).stat().st_mtime]
        times += [r["time"] for r in self.rows if isinstance(r.get("time"), (int, float))][:1]
        return min(times)

    def last_write_time(self) -> float:
        paths = [self.run_dir / CONFIG_NAME, self.run_dir / METRICS_NAME, *self.exports]
        return max(p.stat().st_mtime for p in paths if p.exists())

    def wall_time(self) -> float:
        """Seconds from the start to the last write of metrics or export."""
        return max(0.0, self.last_write_time() - self.start_time())

    def data_problem_totals(self) -> Dict[str, float]:
        """``data/*`` counts over the whole run. The loader counts since it was built, so a resumed run starts
        again from 0: the totals add the last value before every drop."""
        totals: Dict[str, float] = {}
        last: Dict[str, float] = {}
        for row in self.train_rows:
            for key, value in row.items():
                if not key.startswith(DATA_KEY_PREFIX) or not isinstance(value, (int, float)):
                    continue
                name = key[len(DATA_KEY_PREFIX):]
                if value < last.get(name, 0.0):
                    totals[name] = totals.get(name, 0.0) + last[name]
                last[name] = value
        return {name: totals.get(name, 0.0) + value for name, value in last.items()}


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def read_run(run_dir: str | Path) -> RunSummary:
    """The run in ``run_dir``; :class:`NotARunError` when it has no ``config.yaml``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NotARunError(f"{run_dir} is not a directory; give a training output directory (train.output_dir)")
    config_path = run_dir / CONFIG_NAME
    if not config_path.is_file():
        raise NotARunError(
            f"{run_dir} is not a dinoscale run directory: it has no {CONFIG_NAME} (tools/train.py writes "
            f"{CONFIG_NAME}, {METRICS_NAME}, checkpoints/ and export/ to train.output_dir)"
        )
    config_text = config_path.read_text(encoding="utf-8")
    try:
        config = OmegaConf.create(config_text)
    except Exception as exc:  # OmegaConf raises yaml's and its own errors for an unreadable file
        raise NotARunError(f"{config_path} is not a readable config: {exc}") from exc
    if not isinstance(config, DictConfig):
        raise NotARunError(f"{config_path} is not a config mapping")
    rows, unreadable = read_rows(run_dir / METRICS_NAME) if (run_dir / METRICS_NAME).is_file() else ([], 0)
    exports = sorted(p for p in (run_dir / EXPORT_DIR).glob("*_backbone.*") if p.suffix in (".safetensors", ".pth"))
    return RunSummary(run_dir=run_dir, config=config, config_text=config_text, rows=rows,
                      unreadable_lines=unreadable, checkpoints=checkpoint.list_checkpoints(run_dir), exports=exports)
