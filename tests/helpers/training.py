"""Training in the test process: a whole run through the real Trainer."""

from __future__ import annotations

from typing import Any

from pretrain.distributed import LaunchEnv
from pretrain.tasks import Task
from pretrain.trainer import Trainer


def train_in_process(cfg: Any, launch: LaunchEnv, task: Task) -> Trainer:
    """Build a Trainer, run it to its end (exit code 0 asserted) and close it; the closed trainer keeps its engine
    and state for the test to inspect."""
    trainer = Trainer(cfg, launch, task)
    try:
        assert trainer.train() == 0
    finally:
        trainer.close()
    return trainer
