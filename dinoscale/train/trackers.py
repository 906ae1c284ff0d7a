"""Experiment trackers: Weights & Biases and MLflow copies of the training metrics (optional packages).

``trackers.enabled`` lists them (``[wandb]``, ``[mlflow]`` or both). On rank 0, each one gets the resolved config
when the run starts, then every scalar TensorBoard gets (the metrics of each log step, the evaluation and
skipped-step events) from :class:`dinoscale.train.metrics.MetricLogger`, which closes it with the run.
``metrics.jsonl`` stays the complete record; a tracker that fails while logging is dropped with a warning and the
run goes on.

Neither package is a dependency of dinoscale: :func:`check_trackers` (at the start of ``train()``, every rank)
fails with the pip command when one is missing. Both work without a network: ``trackers.wandb_mode=offline``,
and MLflow's default store is the SQLite file ``<output_dir>/mlflow.db``. A resumed run goes on logging into the tracker
runs it started, whose ids ``<output_dir>/trackers.json`` keeps.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from omegaconf import DictConfig, OmegaConf

from dinoscale.config import ConfigError

log = logging.getLogger("dinoscale")

RUN_IDS_FILE = "trackers.json"
# MLflow accepts only these characters in metric and param names ("knn/top1@20" has to change).
_MLFLOW_INVALID_CHARS = re.compile(r"[^\w./\- ]")
_MLFLOW_PARAMS_PER_BATCH = 100  # the tracking server's limit per log_batch request


class Tracker(Protocol):
    """What :class:`~dinoscale.train.metrics.MetricLogger` calls."""

    name: str
    run_id: str  # the tracker's id of this run, kept for a resume

    def log(self, step: int, values: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def _import(name: str) -> ModuleType:
    """The tracker's package (its pip name is the tracker's name), or a ConfigError naming the pip command."""
    try:
        # imported here, not at the top: an optional package, needed only when a config enables it
        return importlib.import_module(name)
    except ImportError as exc:
        raise ConfigError(f"trackers.enabled lists {name}, but the {name} package cannot be imported ({exc}): "
                          f"pip install {name}, or remove {name} from trackers.enabled") from exc


def run_name(cfg: DictConfig, output_dir: Path) -> str:
    return cfg.trackers.run_name or Path(output_dir).resolve().name


def _flat(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``{"a": {"b": 1}}`` -> ``("a.b", 1)``."""
    for key, value in config.items():
        if isinstance(value, Mapping):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


class WandbTracker:
    """A W&B run: ``wandb.init`` with the resolved config, ``run.log(values, step=step)``, ``run.finish()``.

    ``trackers.wandb_mode`` empty leaves the mode to W&B (``$WANDB_MODE``, else online); the run's files go to
    ``<output_dir>/wandb``. W&B ignores steps at or below the last one it has, so after a resume the steps the
    interrupted run logged past its checkpoint keep their first values there (``metrics.jsonl`` has the new
    ones).
    """

    name = "wandb"

    def __init__(self, cfg: DictConfig, output_dir: Path, *, run_id: str | None = None) -> None:
        wandb = _import("wandb")
        options = cfg.trackers
        kwargs: dict[str, Any] = dict(
            project=options.wandb_project, entity=options.wandb_entity or None, name=run_name(cfg, output_dir),
            dir=str(output_dir), config=OmegaConf.to_container(cfg, resolve=True),
            allow_val_change=True,  # a resumed run may change e.g. train.max_steps
        )
        if options.wandb_mode:
            kwargs["mode"] = options.wandb_mode
        if run_id is not None:
            kwargs.update(id=run_id, resume="allow")
        self._run = wandb.init(**kwargs)
        self.run_id = self._run.id

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self._run.log(dict(values), step=step)

    def close(self) -> None:
        self._run.finish()


class MlflowTracker:
    """An MLflow run, through an ``MlflowClient`` of its own (the caller's active MLflow run, if any, is left
    alone): the config as params (flattened, ``train.max_steps``) and as the artifact ``config.yaml``, metrics
    with their step, and the run set finished when it closes.

    The tracking URI is ``trackers.mlflow_tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the local store
    ``sqlite:///<output_dir>/mlflow.db`` with the artifacts in ``<output_dir>/mlflow-artifacts`` (MLflow 3 refuses
    its older ``file://`` store unless ``MLFLOW_ALLOW_FILE_STORE=true``; ``mlflow ui --backend-store-uri
    sqlite:///<output_dir>/mlflow.db`` shows the run). Metric names
    have ``.`` for ``/`` (the file store keeps a metric in a file named after it, so ``loss`` and ``loss/koleo``
    cannot both exist there) and ``_`` for the characters MLflow refuses: ``knn/top1@20`` -> ``knn.top1_20``.
    Params cannot change in MLflow, so a resumed run logs them only if its run is new; the artifact is the
    config of the latest start.
    """

    name = "mlflow"

    def __init__(self, cfg: DictConfig, output_dir: Path, *, run_id: str | None = None) -> None:
        mlflow = _import("mlflow")
        self._entities = importlib.import_module("mlflow.entities")  # part of the optional package above
        options = cfg.trackers
        uri = options.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = None  # a tracking server decides where artifacts go; the local store keeps them in the run
        if not uri:
            uri = f"sqlite:///{(Path(output_dir) / 'mlflow.db').resolve()}"
            artifacts = (Path(output_dir) / "mlflow-artifacts").resolve().as_uri()
        self._client = mlflow.MlflowClient(tracking_uri=uri)
        config = OmegaConf.to_container(cfg, resolve=True)
        if run_id is None:
            experiment = self._client.get_experiment_by_name(options.mlflow_experiment)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self._client.create_experiment(options.mlflow_experiment, artifacts))
            run = self._client.create_run(experiment_id, tags={"mlflow.runName": run_name(cfg, output_dir)})
            run_id = run.info.run_id
            params = [self._entities.Param(_mlflow_name(key), str(value)) for key, value in _flat(config)]
            for start in range(0, len(params), _MLFLOW_PARAMS_PER_BATCH):
                self._client.log_batch(run_id, params=params[start:start + _MLFLOW_PARAMS_PER_BATCH])
        else:
            self._client.update_run(run_id, status="RUNNING")
        self._client.log_dict(run_id, config, "config.yaml")
        self.run_id = run_id

    def log(self, step: int, values: Mapping[str, float]) -> None:
        now_ms = int(time.time() * 1000)
        metrics = [self._entities.Metric(_mlflow_name(key), float(value), now_ms, step)
                   for key, value in values.items()]
        self._client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self._client.set_terminated(self.run_id)


def _mlflow_name(key: str) -> str:
    return _MLFLOW_INVALID_CHARS.sub("_", key.replace("/", "."))


#: the names ``trackers.enabled`` accepts
TRACKERS = {"wandb": WandbTracker, "mlflow": MlflowTracker}


def check_trackers(cfg: DictConfig) -> None:
    """Fail at startup, before anything is built, when ``trackers.enabled`` names an unknown tracker or one whose
    package is missing."""
    for name in cfg.trackers.enabled:
        if name not in TRACKERS:
            raise ConfigError(f"trackers.enabled: unknown tracker {name!r}; choose from {sorted(TRACKERS)}")
        _import(name)


def open_trackers(cfg: DictConfig, output_dir: str | os.PathLike, *, resume: bool) -> list[Tracker]:
    """The trackers ``trackers.enabled`` lists, started (call on rank 0 only). ``resume``: continue the tracker
    runs recorded in ``<output_dir>/trackers.json`` (a fresh run starts new ones and records those)."""
    output_dir = Path(output_dir)
    ids_path = output_dir / RUN_IDS_FILE
    previous = json.loads(ids_path.read_text()) if resume and ids_path.is_file() else {}
    check_trackers(cfg)
    trackers: list[Tracker] = []
    try:
        for name in cfg.trackers.enabled:
            trackers.append(TRACKERS[name](cfg, output_dir, run_id=previous.get(name)))
    except BaseException:
        for tracker in trackers:
            tracker.close()
        raise
    if trackers:
        ids_path.write_text(json.dumps({t.name: t.run_id for t in trackers}, indent=1) + "\n")
    return trackers
