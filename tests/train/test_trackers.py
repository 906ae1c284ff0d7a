"""The W&B and MLflow trackers (dinoscale.train.trackers).

Neither package is a dependency: most tests put a recording stand-in of the package in ``sys.modules`` and check the
calls made to it; the last two run the real package offline and are skipped, naming the pip command, without it.
"""

import json
import sys
import types
from collections import namedtuple

import pytest
from omegaconf import OmegaConf

from dinoscale.config import ConfigError, load_config
from dinoscale.train import loop
from dinoscale.train.metrics import read_metrics
from dinoscale.train.trackers import MlflowTracker, WandbTracker, check_trackers, open_trackers
from tests.train.test_loop import FMNIST, TINY


class FakeWandb(types.ModuleType):
    """``wandb`` as far as WandbTracker uses it: ``init(**kwargs)`` -> a run with ``id``, ``log``, ``finish``."""

    def __init__(self):
        super().__init__("wandb")
        self.runs = []

    def init(self, **kwargs):
        run = types.SimpleNamespace(kwargs=kwargs, id=kwargs.get("id") or f"wb{len(self.runs)}", logged=[],
                                    finished=0)
        run.log = lambda data, step: run.logged.append((step, data))
        run.finish = lambda: setattr(run, "finished", run.finished + 1)
        self.runs.append(run)
        return run


class FakeMlflowClient:
    """``mlflow.MlflowClient`` as far as MlflowTracker uses it; every instance shares ``FakeMlflowClient.calls``."""

    calls: list = []
    experiments: dict = {}

    def __init__(self, tracking_uri):
        self.calls.append(("client", tracking_uri))

    def get_experiment_by_name(self, name):
        return self.experiments.get(name)

    def create_experiment(self, name, artifact_location=None):
        self.experiments[name] = types.SimpleNamespace(experiment_id=f"e{len(self.experiments)}")
        self.calls.append(("create_experiment", name, artifact_location))
        return self.experiments[name].experiment_id

    def create_run(self, experiment_id, tags):
        self.calls.append(("create_run", experiment_id, tags))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id="ml-run-1"))

    def log_batch(self, run_id, metrics=(), params=()):
        self.calls.append(("log_batch", run_id, list(metrics), list(params)))

    def update_run(self, run_id, status):
        self.calls.append(("update_run", run_id, status))

    def log_dict(self, run_id, dictionary, artifact_file):
        self.calls.append(("log_dict", run_id, dictionary, artifact_file))

    def set_terminated(self, run_id):
        self.calls.append(("set_terminated", run_id))


@pytest.fixture
def fake_wandb(monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


@pytest.fixture
def fake_mlflow(monkeypatch):
    module = types.ModuleType("mlflow")
    module.MlflowClient = FakeMlflowClient
    module.entities = types.ModuleType("mlflow.entities")
    module.entities.Metric = namedtuple("Metric", "key value timestamp step")
    module.entities.Param = namedtuple("Param", "key value")
    monkeypatch.setitem(sys.modules, "mlflow", module)
    monkeypatch.setitem(sys.modules, "mlflow.entities", module.entities)
    monkeypatch.setattr(FakeMlflowClient, "calls", [])
    monkeypatch.setattr(FakeMlflowClient, "experiments", {})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return FakeMlflowClient


def config(tmp_path, *overrides):
    return load_config("quickstart", [f"train.output_dir={tmp_path}", *overrides])


def test_unknown_or_missing_tracker_fails_naming_the_choices_or_the_pip_command(tmp_path, monkeypatch):
    check_trackers(config(tmp_path))  # none enabled: nothing imported, nothing needed
    with pytest.raises(ConfigError, match=r"unknown tracker 'tensorboard'; choose from \['mlflow', 'wandb'\]"):
        check_trackers(config(tmp_path, "trackers.enabled=[tensorboard]"))
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what an absent package looks like to import
    with pytest.raises(ConfigError, match="lists mlflow, but the mlflow package cannot be imported .*: "
                                          "pip install mlflow, or remove mlflow from trackers.enabled"):
        check_trackers(config(tmp_path, "trackers.enabled=[mlflow]"))


def test_wandb_gets_the_resolved_config_and_a_resumed_run_continues_its_run(tmp_path, fake_wandb):
    cfg = config(tmp_path, "trackers.enabled=[wandb]", "trackers.wandb_mode=offline", "trackers.run_name=fm-a")
    [tracker] = open_trackers(cfg, tmp_path, resume=False)
    assert isinstance(tracker, WandbTracker)
    kwargs = fake_wandb.runs[0].kwargs
    assert kwargs["config"] == OmegaConf.to_container(cfg, resolve=True)
    assert (kwargs["project"], kwargs["entity"], kwargs["name"], kwargs["mode"], kwargs["dir"]) == (
        "dinoscale", None, "fm-a", "offline", str(tmp_path))
    assert "id" not in kwargs and "resume" not in kwargs
    tracker.log(20, {"loss": 10.5})
    tracker.close()
    assert fake_wandb.runs[0].logged == [(20, {"loss": 10.5})] and fake_wandb.runs[0].finished == 1
    assert json.loads((tmp_path / "trackers.json").read_text()) == {"wandb": "wb0"}

    [resumed] = open_trackers(cfg, tmp_path, resume=True)
    assert (fake_wandb.runs[1].kwargs["id"], fake_wandb.runs[1].kwargs["resume"]) == ("wb0", "allow")
    [fresh] = open_trackers(config(tmp_path, "trackers.enabled=[wandb]"), tmp_path, resume=False)
    assert "id" not in fake_wandb.runs[2].kwargs and fresh.run_id == "wb2"
    assert "mode" not in fake_wandb.runs[2].kwargs  # empty: W&B's own default ($WANDB_MODE, else online)
    assert fake_wandb.runs[2].kwargs["name"] == tmp_path.name  # the output directory's name by default


def test_mlflow_logs_params_in_batches_metrics_with_valid_names_and_ends_the_run(tmp_path, fake_mlflow):
    cfg = config(tmp_path, "trackers.enabled=[mlflow]")
    [tracker] = open_trackers(cfg, tmp_path, resume=False)
    assert isinstance(tracker, MlflowTracker)
    tracker.log(40, {"loss": 9.5, "knn/top1@20": 71.25})  # names MLflow takes, also in its file store
    tracker.close()
    calls = fake_mlflow.calls
    assert calls[0] == ("client", f"sqlite:///{tmp_path.resolve()}/mlflow.db")  # a local store in the run directory
    assert calls[1:3] == [("create_experiment", "dinoscale", (tmp_path / "mlflow-artifacts").resolve().as_uri()),
                          ("create_run", "e0", {"mlflow.runName": tmp_path.name})]
    param_batches = [c[3] for c in calls if c[0] == "log_batch" and c[3]]
    assert all(len(batch) <= 100 for batch in param_batches) and len(param_batches) >= 2
    params = {p.key: p.value for batch in param_batches for p in batch}
    assert params["train.official_epoch_length"] == "100" and params["crops.global_crops_scale"] == "[0.4, 1.0]"
    assert len(params) == sum(1 for _ in _leaves(OmegaConf.to_container(cfg)))
    assert ("log_dict", "ml-run-1", OmegaConf.to_container(cfg, resolve=True), "config.yaml") in calls
    [metric_batch] = [c[2] for c in calls if c[0] == "log_batch" and c[2]]
    assert [(m.key, m.value, m.step) for m in metric_batch] == [("loss", 9.5, 40), ("knn.top1_20", 71.25, 40)]
    assert calls[-1] == ("set_terminated", "ml-run-1")

    fake_mlflow.calls.clear()  # a resume reopens the same run and logs no params (they cannot change in MLflow)
    open_trackers(cfg, tmp_path, resume=True)
    assert [c[0] for c in fake_mlflow.calls] == ["client", "update_run", "log_dict"]
    assert fake_mlflow.calls[1] == ("update_run", "ml-run-1", "RUNNING")


def _leaves(tree):
    for value in tree.values():
        if isinstance(value, dict):
            yield from _leaves(value)
        else:
            yield value


def test_mlflow_tracking_uri_from_config_then_environment(tmp_path, fake_mlflow, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    open_trackers(config(tmp_path, "trackers.enabled=[mlflow]"), tmp_path, resume=False)
    open_trackers(config(tmp_path, "trackers.enabled=[mlflow]", "trackers.mlflow_tracking_uri=file:///x/mlruns"),
                  tmp_path, resume=False)
    assert [c[1] for c in fake_mlflow.calls if c[0] == "client"] == ["http://tracking.example:5000", "file:///x/mlruns"]
    # the server (or the store) decides where the artifacts go
    assert [c[2] for c in fake_mlflow.calls if c[0] == "create_experiment"] == [None]


def test_a_tracker_that_fails_to_start_closes_the_ones_already_started(tmp_path, fake_wandb, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise RuntimeError("no server")

    monkeypatch.setitem(sys.modules, "mlflow", types.ModuleType("mlflow"))
    monkeypatch.setattr(MlflowTracker, "__init__", refuse)
    with pytest.raises(RuntimeError, match="no server"):
        open_trackers(config(tmp_path, "trackers.enabled=[wandb, mlflow]"), tmp_path, resume=False)
    assert fake_wandb.runs[0].finished == 1 and not (tmp_path / "trackers.json").exists()


needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist")


@needs_fmnist
def test_training_sends_every_logged_scalar_to_the_trackers_on_rank_0(tmp_path, fake_wandb, fake_mlflow):
    cfg = load_config("quickstart", TINY + [f"train.output_dir={tmp_path}", "train.max_steps=3",
                                           "train.log_every=2", "trackers.enabled=[wandb, mlflow]"])
    assert loop.train(cfg).status == "finished"
    [run] = fake_wandb.runs
    logged = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl") if "type" not in r}
    assert [step for step, _ in run.logged] == [2, 3] == sorted(logged)
    for step, values in run.logged:  # the row's metrics, images_per_s under TensorBoard's name
        row = {k: v for k, v in logged[step].items() if k not in ("step", "eta_s", "time", "images_per_s")}
        assert values == {**row, "perf/images_per_s": logged[step]["images_per_s"]}
    assert run.finished == 1 and run.kwargs["config"]["train"]["max_steps"] == 3
    metrics = [m for c in fake_mlflow.calls if c[0] == "log_batch" for m in c[2]]
    assert sorted({m.step for m in metrics}) == [2, 3] and fake_mlflow.calls[-1][0] == "set_terminated"
    assert {m.key for m in metrics} == {key.replace("/", ".") for key in run.logged[0][1]}


def test_a_missing_tracker_package_stops_training_before_anything_is_built(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = load_config("quickstart", TINY + [f"train.output_dir={tmp_path / 'run'}", "trackers.enabled=[wandb]"])
    with pytest.raises(ConfigError, match="pip install wandb"):
        loop.train(cfg)
    assert not (tmp_path / "run").exists()  # failed before the run directory was made


def test_real_wandb_offline_writes_the_run_under_the_output_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="W&B is optional: pip install wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = config(tmp_path, "trackers.enabled=[wandb]", "trackers.wandb_mode=offline")
    [tracker] = open_trackers(cfg, tmp_path, resume=False)
    tracker.log(1, {"loss": 3.0, "knn/top1@20": 50.0})
    tracker.close()
    [run_dir] = (tmp_path / "wandb").glob(f"offline-run-*-{tracker.run_id}")
    assert any(run_dir.glob("*.wandb"))


def test_real_mlflow_local_store_holds_params_metrics_and_config(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="MLflow is optional: pip install mlflow")
    pytest.importorskip("sqlalchemy", reason="MLflow's local store needs it: pip install mlflow (not mlflow-skinny)")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config(tmp_path, "trackers.enabled=[mlflow]")
    [tracker] = open_trackers(cfg, tmp_path, resume=False)
    tracker.log(5, {"loss": 3.0, "loss/koleo": -0.1, "knn/top1@20": 50.0})  # "loss" and "loss/..." as training logs
    tracker.log(10, {"loss": 2.5, "loss/koleo": -0.2})
    tracker.close()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.official_epoch_length"] == "100"
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss")] == [(5, 3.0), (10, 2.5)]
    assert [m.value for m in client.get_metric_history(tracker.run_id, "loss.koleo")] == [-0.1, -0.2]
    assert [m.value for m in client.get_metric_history(tracker.run_id, "knn.top1_20")] == [50.0]
    assert "config.yaml" in [f.path for f in client.list_artifacts(tracker.run_id)]
    assert any((tmp_path / "mlflow-artifacts").rglob("config.yaml"))  # the artifacts stay in the run directory

    [resumed] = open_trackers(cfg, tmp_path, resume=True)  # the same MLflow run goes on
    resumed.log(15, {"loss": 2.0})
    resumed.close()
    assert resumed.run_id == tracker.run_id
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == [5, 10, 15]
