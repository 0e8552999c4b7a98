"""Optional experiment tracking in Weights & Biases and MLflow, next to TensorBoard and metrics.jsonl (rank 0 only).

Each tracker is behind an extra (``pip install 'swinv2-pretrain[wandb]'`` or ``[mlflow]``) and a switch in the
``logging`` section (``logging.wandb.enabled``, ``logging.mlflow.enabled``). Trackers receive the scalars of
metrics.jsonl under the same names, on the same steps, and the reconstruction grids that go to TensorBoard.

A requeued or resumed job continues the same tracked run: the run id is stored in ``run_dir/tracking/`` the first time
and read back by every later start in that run directory. Steps repeated after a resume are logged again against
the optimizer step (W&B: a ``step`` metric as the x axis, so W&B's own counter never refuses them; MLflow: the
metric's step); neither service can drop the killed run's tail the way TensorBoard's ``purge_step`` does.

W&B ``mode: offline`` writes ``run_dir/wandb/offline-run-*`` without any network; ``wandb sync`` uploads it later
(each start of the run writes its own folder with the same run id). MLflow without a ``tracking_uri`` keeps a SQLite
store and the artifacts in ``run_dir/mlflow/`` (MLflow 3 keeps its plain-file store in maintenance mode and refuses
it by default); ``mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow/mlflow.db`` shows it.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .atomic import write_text_atomic
from .checks import ConfigError, one_of, require

__all__ = [
    "TRACKING_DIR",
    "MlflowConfig",
    "MlflowTracker",
    "Tracker",
    "WandbConfig",
    "WandbTracker",
    "open_trackers",
]

TRACKING_DIR = "tracking"  # under the run directory: one run-id file per tracker
WANDB_MODES = ("online", "offline")
# MLflow run status by the trainer's exit code (pretrain.trainer: 75 preempted, 130 interrupted).
_MLFLOW_STATUS = {0: "FINISHED", 75: "KILLED", 130: "KILLED"}


def _require_module(key: str, module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"{key}=true but the {module!r} package is not installed; accepted: install the extra "
            f"(pip install 'swinv2-pretrain[{extra}]' or bash scripts/install.sh --extras {extra}) or {key}=false"
        )


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "swinv2-pretrain"
    # W&B team or user; null = the logged-in user's default entity.
    entity: str | None = None
    # online: stream to the W&B server (needs `wandb login` or WANDB_API_KEY); offline: write run_dir/wandb only,
    # no network (compute nodes without internet), upload later with `wandb sync RUN_DIR/wandb/offline-run-*`.
    mode: str = "online"
    # Display name; null = the run directory's name.
    name: str | None = None
    tags: list[str] = field(default_factory=list)

    def check(self) -> None:
        one_of("logging.wandb.mode", self.mode, WANDB_MODES)
        require(bool(self.project), "logging.wandb.project is empty; accepted: a W&B project name")
        if self.enabled:
            _require_module("logging.wandb.enabled", "wandb", "wandb")


@dataclass
class MlflowConfig:
    enabled: bool = False
    # null: a SQLite store with its artifacts in run_dir/mlflow (no server); else any MLflow tracking URI
    # (http://host:5000, sqlite:////abs/path.db, databricks).
    tracking_uri: str | None = None
    experiment: str = "swinv2-pretrain"
    # Display name; null = the run directory's name.
    run_name: str | None = None

    def check(self) -> None:
        require(bool(self.experiment), "logging.mlflow.experiment is empty; accepted: an experiment name")
        require(
            self.tracking_uri is None or bool(self.tracking_uri.strip()),
            "logging.mlflow.tracking_uri is empty; accepted: null (a store in the run directory) or a tracking URI",
        )
        if self.enabled:
            _require_module("logging.mlflow.enabled", "mlflow", "mlflow")


class Tracker(Protocol):
    """What :class:`pretrain.metrics.MetricsLogger` calls on each tracker."""

    name: str
    run_id: str
    resumed: bool  # True when this start continues a run id stored by an earlier start

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Finite scalars of optimizer step ``step``, named as in metrics.jsonl."""

    def log_image(self, step: int, path: Path) -> None:
        """The reconstruction grid of ``step``, already saved as the PNG ``path``."""

    def close(self, exit_code: int = 0) -> None:
        """End this start of the run (``exit_code`` as the trainer's: 0 done, 75/130 stopped, else failed)."""


def _read_id(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise ConfigError(
            f"{path} holds no readable run id ({exc}); it was written by an earlier start of this run. Remove it to "
            f"start a new tracked run"
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("run_id"), str):
        raise ConfigError(f"{path} holds no run id (got {record!r}); remove it to start a new tracked run")
    return record


def _write_id(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=1) + "\n")


class WandbTracker:
    """A W&B run, resumed by id on every later start in the same run directory.

    Args:
        cfg: the ``logging.wandb`` section.
        run_dir: the run directory (``wandb/`` and ``tracking/wandb.json`` go under it).
        run_config: the resolved configuration, stored as the run's config.
        start_step: the optimizer step this start continues after.
    """

    name = "wandb"

    def __init__(self, cfg: WandbConfig, run_dir: Path, run_config: dict[str, Any] | None, start_step: int) -> None:
        import wandb

        id_file = run_dir / TRACKING_DIR / "wandb.json"
        record = _read_id(id_file)
        # The id is chosen and stored before the run starts, so a job killed during wandb.init still continues it.
        run_id = record["run_id"] if record else _new_wandb_id()
        if record is None:
            _write_id(id_file, {"run_id": run_id, "project": cfg.project, "entity": cfg.entity})
        self.resumed = record is not None
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or run_dir.resolve().name,
            tags=list(cfg.tags) or None,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=cfg.mode,
            config=run_config,
            # Our console lines already go to train.log; W&B's capture of stdout would also wrap tqdm's bar.
            settings=wandb.Settings(console="off"),
        )
        # Optimizer steps as the x axis of every chart: W&B's own step must grow, and a resumed run repeats steps.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.run.summary["start_step"] = start_step
        self.run_id = run_id
        self._image = wandb.Image

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log({**scalars, "step": step})

    def log_image(self, step: int, path: Path) -> None:
        self.run.log({"reconstruction": self._image(str(path)), "step": step})

    def close(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


class MlflowTracker:
    """An MLflow run, resumed by id on every later start in the same run directory.

    Args:
        cfg: the ``logging.mlflow`` section.
        run_dir: the run directory (``tracking/mlflow.json``, and ``mlflow/`` for the default local store).
        run_config: the resolved configuration, stored as the run's parameters (``section.key``) when it is created.
        start_step: the optimizer step this start continues after.
    """

    name = "mlflow"

    def __init__(self, cfg: MlflowConfig, run_dir: Path, run_config: dict[str, Any] | None, start_step: int) -> None:
        from mlflow.tracking import MlflowClient

        local = cfg.tracking_uri is None
        store = (run_dir / "mlflow").resolve()
        if local:
            store.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{store / 'mlflow.db'}" if local else str(cfg.tracking_uri)
        self.client = MlflowClient(tracking_uri=uri)
        id_file = run_dir / TRACKING_DIR / "mlflow.json"
        record = _read_id(id_file)
        if record is not None and record.get("tracking_uri") != uri:
            raise ConfigError(
                f"{id_file}: this run is tracked in {record.get('tracking_uri')!r}, not in logging.mlflow.tracking_uri"
                f"={uri!r}; accepted: the same tracking URI, or remove {id_file} to start a new tracked run"
            )
        if record is None:
            self.run_id = self._create_run(cfg, run_dir, store if local else None, run_config)
            _write_id(id_file, {"run_id": self.run_id, "tracking_uri": uri, "experiment": cfg.experiment})
        else:
            self.run_id = record["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        self.resumed = record is not None
        self.client.set_tag(self.run_id, "start_step", str(start_step))

    def _create_run(
        self, cfg: MlflowConfig, run_dir: Path, store: Path | None, run_config: dict[str, Any] | None
    ) -> str:
        from mlflow.entities import Param

        experiment = self.client.get_experiment_by_name(cfg.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            # A local store keeps its artifacts beside it (MLflow's default would be ./mlruns of the working dir).
            location = (store / "artifacts").as_uri() if store is not None else None
            experiment_id = self.client.create_experiment(cfg.experiment, artifact_location=location)
        run = self.client.create_run(experiment_id, run_name=cfg.run_name or run_dir.resolve().name)
        params = [Param(key, value) for key, value in _flatten(run_config or {}).items()]
        for first in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(run.info.run_id, params=params[first : first + 100])
        return run.info.run_id

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(key, float(value), stamp, step) for key, value in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_image(self, step: int, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path="images")

    def close(self, exit_code: int = 0) -> None:
        self.client.set_terminated(self.run_id, status=_MLFLOW_STATUS.get(exit_code, "FAILED"))


def _new_wandb_id() -> str:
    """An id of the form W&B uses: 8 lower-case letters and digits (36**8 choices per project)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; MLflow parameters are flat strings of at most 6000 characters."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = str(value)[:6000]
    return flat


def open_trackers(cfg: Any, run_dir: Path, run_config: dict[str, Any] | None, start_step: int) -> list[Tracker]:
    """The trackers that the ``logging`` section ``cfg`` enables, started (or resumed) for ``run_dir``.

    Args:
        cfg: the ``logging`` section (its ``wandb`` and ``mlflow`` subsections).
        run_dir: the run directory.
        run_config: the resolved configuration as plain containers, or None.
        start_step: the optimizer step this start continues after.
    """
    trackers: list[Tracker] = []
    try:
        if cfg.wandb.enabled:
            trackers.append(WandbTracker(cfg.wandb, run_dir, run_config, start_step))
        if cfg.mlflow.enabled:
            trackers.append(MlflowTracker(cfg.mlflow, run_dir, run_config, start_step))
    except BaseException:
        for tracker in trackers:
            tracker.close(1)
        raise
    return trackers
