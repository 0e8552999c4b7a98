"""W&B (offline) and MLflow (local SQLite store) tracking through MetricsLogger: real runs, their files read back,
and a second logger on the same run directory continuing the same tracked run."""

from __future__ import annotations

import json
import re
import sqlite3
import struct
from pathlib import Path

import pytest
import torch

from pretrain.checks import ConfigError
from pretrain.metrics import LoggingConfig, MetricsLogger
from pretrain.tracking import MlflowConfig, WandbConfig

RUN_CONFIG = {"model": {"name": "swinv2_tiny", "embed_dim": 96}, "training": {"max_steps": 4}}


def _scalars(step: int) -> dict[str, float]:
    return {
        "loss": 1.0 / step,
        "lr": 1e-4 * step,
        "throughput_total": 10.0,
        "data_loading_pct": 5.0,
        "mfu_pct": float("nan"),  # not computed: skipped like in TensorBoard
        "skipped_samples": 0,
    }


def _log_images(logger: MetricsLogger, step: int) -> Path | None:
    torch.manual_seed(step)
    images, rec = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    mask = torch.randint(0, 2, (2, 4, 4))
    return logger.log_images(step, images, mask, rec, [0.5] * 3, [0.25] * 3, patch_size=4)


def _start(run_dir: Path, cfg: LoggingConfig, start: int, steps: range, rank: int = 0) -> MetricsLogger:
    logger = MetricsLogger(run_dir, cfg, rank, total_steps=4, run_config=RUN_CONFIG)
    logger.begin(start)
    for step in steps:
        logger.log(step, _scalars(step))
    return logger


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a .wandb transaction log: a 7-byte header (":W&B", magic, version), then LevelDB-log blocks of
    32 KiB holding chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    return records


def _wandb_history(run_file: Path) -> tuple[str, list[dict[str, str]]]:
    from wandb.proto import wandb_internal_pb2

    run_id, rows = "", []
    for raw in _wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return run_id, rows


def test_wandb_offline_run_holds_the_scalars_and_images_and_a_resume_continues_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = LoggingConfig(tensorboard=False, progress_bar=False, wandb=WandbConfig(enabled=True, mode="offline"))
    first = _start(run_dir, cfg, 0, range(1, 3))
    png = _log_images(first, 2)
    first.close(75)  # preempted: the job is requeued
    run_id = json.loads((run_dir / "tracking" / "wandb.json").read_text())["run_id"]

    second = _start(run_dir, cfg, 2, range(3, 5))
    second.close()
    assert json.loads((run_dir / "tracking" / "wandb.json").read_text())["run_id"] == run_id
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    # W&B names a run's folder offline-run-<time>-<id>, with "-1" appended when a folder of that name exists (two
    # starts within one second).
    assert len(offline) == 2 and all(re.search(rf"-{run_id}(-\d+)?$", path.name) for path in offline), offline

    (first_id, first_rows), (second_id, second_rows) = (_wandb_history(d / f"run-{run_id}.wandb") for d in offline)
    assert first_id == second_id == run_id
    scalars = [row for row in first_rows + second_rows if "loss" in row]
    assert [int(row["step"]) for row in scalars] == [1, 2, 3, 4]
    assert [float(row["loss"]) for row in scalars] == [1.0, 0.5, 1 / 3, 0.25]
    assert [float(row["lr"]) for row in scalars] == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4])
    assert all("mfu_pct" not in row for row in scalars)  # NaN is not logged
    image_rows = [row for row in first_rows if "reconstruction/path" in row]
    assert len(image_rows) == 1 and image_rows[0]["step"] == "2"
    stored = offline[0] / "files" / json.loads(image_rows[0]["reconstruction/path"])
    assert stored.is_file() and png is not None and png.is_file()
    assert "wandb: continues run " + run_id in (run_dir / "train.log").read_text()


def _mlflow_rows(db: Path, query: str, *args: str) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return connection.execute(query, args).fetchall()


def test_mlflow_local_store_holds_the_scalars_and_images_and_a_resume_continues_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = LoggingConfig(tensorboard=False, progress_bar=False, mlflow=MlflowConfig(enabled=True))
    first = _start(run_dir, cfg, 0, range(1, 3))
    _log_images(first, 2)
    first.close(75)
    record = json.loads((run_dir / "tracking" / "mlflow.json").read_text())
    run_id, db = record["run_id"], run_dir / "mlflow" / "mlflow.db"
    assert record["tracking_uri"] == f"sqlite:///{db.resolve()}"
    assert _mlflow_rows(db, "SELECT status FROM runs WHERE run_uuid=?", run_id) == [("KILLED",)]

    second = _start(run_dir, cfg, 2, range(3, 5))
    assert _mlflow_rows(db, "SELECT status FROM runs WHERE run_uuid=?", run_id) == [("RUNNING",)]
    second.close()
    assert json.loads((run_dir / "tracking" / "mlflow.json").read_text())["run_id"] == run_id
    assert _mlflow_rows(db, "SELECT count(*) FROM runs") == [(1,)]
    assert _mlflow_rows(db, "SELECT status FROM runs WHERE run_uuid=?", run_id) == [("FINISHED",)]
    loss = _mlflow_rows(db, "SELECT step, value FROM metrics WHERE run_uuid=? AND key='loss' ORDER BY step", run_id)
    assert loss == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)), (4, 0.25)]
    assert _mlflow_rows(db, "SELECT count(*) FROM metrics WHERE key='mfu_pct'") == [(0,)]
    params = dict(_mlflow_rows(db, "SELECT key, value FROM params WHERE run_uuid=?", run_id))
    assert params == {"model.name": "swinv2_tiny", "model.embed_dim": "96", "training.max_steps": "4"}
    images = list((run_dir / "mlflow" / "artifacts").glob(f"{run_id}/artifacts/images/step-00000002.png"))
    assert len(images) == 1 and images[0].stat().st_size > 0

    # The run id belongs to its store: another tracking URI is refused rather than silently starting a new run.
    moved = LoggingConfig(mlflow=MlflowConfig(enabled=True, tracking_uri=f"sqlite:///{tmp_path / 'other.db'}"))
    logger = MetricsLogger(run_dir, moved, 0, total_steps=4)
    with pytest.raises(ConfigError, match=r"this run is tracked in 'sqlite:///.*mlflow.db', not in logging.mlflow"):
        logger.begin(4)
    logger.close()


def test_a_failing_tracker_is_dropped_and_the_run_goes_on(tmp_path: Path) -> None:
    cfg = LoggingConfig(tensorboard=False, progress_bar=False, mlflow=MlflowConfig(enabled=True))
    logger = _start(tmp_path, cfg, 0, range(1, 2))
    logger.log(2, {**_scalars(2), "bad(name)": 1.0})  # MLflow refuses this metric name
    logger.log(3, _scalars(3))
    logger.close()
    text = (tmp_path / "train.log").read_text()
    assert "mlflow: logging failed at step=2" in text and "metrics.jsonl and TensorBoard go on" in text
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    run_id = json.loads((tmp_path / "tracking" / "mlflow.json").read_text())["run_id"]
    db = tmp_path / "mlflow" / "mlflow.db"
    steps = _mlflow_rows(db, "SELECT step FROM metrics WHERE run_uuid=? AND key='loss' ORDER BY step", run_id)
    assert steps == [(1,)]
    assert _mlflow_rows(db, "SELECT status FROM runs WHERE run_uuid=?", run_id) == [("FAILED",)]


def test_other_ranks_start_no_tracker(tmp_path: Path) -> None:
    cfg = LoggingConfig(wandb=WandbConfig(enabled=True, mode="offline"), mlflow=MlflowConfig(enabled=True))
    logger = _start(tmp_path, cfg, 0, range(1, 2), rank=1)
    assert _log_images(logger, 1) is None
    logger.close()
    assert list(tmp_path.iterdir()) == []
