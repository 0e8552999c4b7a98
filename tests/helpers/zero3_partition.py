"""Run as one rank: build the real ZeRO-3 engine from overrides, take one step, print this rank's partition sizes."""

from __future__ import annotations

import json
import sys

import torch


def main() -> None:
    from pretrain.config import load_config
    from pretrain.distributed import init_process_group, resolve_launch_env
    from pretrain.engine import build_engine
    from pretrain.tasks.simmim import SimMIMTask

    cfg = load_config(None, sys.argv[1:])
    launch = resolve_launch_env()
    init_process_group("gloo", 2)
    engine, _ = build_engine(cfg, launch.world_size, steps_per_epoch=10, task=SimMIMTask(cfg))
    params = list(engine.module.parameters())
    full = sum(p.ds_numel for p in params)
    local_params = sum(p.ds_tensor.numel() for p in params)
    # One step so that AdamW state exists; then count this rank's optimizer state (exp_avg + exp_avg_sq).
    images = torch.randn(cfg.data.batch_size, 3, cfg.model.img_size, cfg.model.img_size)
    grid = cfg.model.img_size // cfg.model.patch_size
    mask = (torch.rand(cfg.data.batch_size, grid, grid) > 0.5).float()
    engine.backward(engine(images, mask))
    engine.step()
    state = engine.optimizer.optimizer.state
    local_state = sum(v.numel() for s in state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0)
    print("PARTITION " + json.dumps({"rank": launch.rank, "full": full, "params": local_params, "state": local_state}))


if __name__ == "__main__":
    from tests.helpers.launch import finish_rank

    main()
    finish_rank()
