"""Remote shards on a real HTTP server (localhost), pipe: commands, fsspec URLs, faults (dropped and stalled
connections, missing URLs), corrupt size indexes, and weighted mixtures."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.config import PretrainConfig, load_config
from pretrain.data import DataError, build_pretrain_loader, resolve_source
from pretrain.shards import write_shards
from tests.helpers.shard_server import ShardServer
from tests.helpers.tiny import TINY_MODEL

ROOT = Path(__file__).resolve().parents[2]
PATTERN = "shard-{000000..000003}.tar"


def write_colours(folder: Path, ids: range) -> None:
    """Uniform PNGs whose red value identifies them (survives crop, resize and flip exactly)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.new("RGB", (40 + i % 5, 36), (8 + 4 * i, 250 - 2 * i, 100)).save(folder / f"img{i:03d}.png")


def ids_of(batch: dict, cfg: PretrainConfig) -> list[int]:
    red = batch["images"][:, 0, 0, 0] * cfg.data.std[0] + cfg.data.mean[0]
    return [round((float(r) * 255 - 8) / 4) for r in red]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("remote")
    write_colours(root / "src", range(24))
    write_shards(root / "src", root / "out", maxcount=6, progress=False)  # 4 shards of 6
    write_colours(root / "src2", range(40, 52))
    write_shards(root / "src2", root / "other", maxcount=6, progress=False)  # 2 shards of 6
    return root


def cfg_for(path: str, *extra: str) -> PretrainConfig:
    return load_config(
        None,
        [
            *TINY_MODEL,
            f"data.path={path}",
            "data.batch_size=2",
            "data.num_workers=0",
            "data.shuffle_buffer=4",
            "data.retry_backoff=0.01",
            *extra,
        ],
    )


def collect(cfg: PretrainConfig, rank: int = 0, world: int = 1) -> list[dict]:
    return list(build_pretrain_loader(cfg, resolve_source(cfg.data, world), rank=rank, world_size=world))


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x["images"], y["images"]) and torch.equal(x["mask"], y["mask"]) for x, y in zip(a, b, strict=True)
    )


def test_http_pipe_and_fsspec_shards_stream_like_local_files(shards: Path) -> None:
    out = shards / "out"
    local = collect(cfg_for(f"{out}/{PATTERN}"))
    assert len(local) == 12 and all(isinstance(b["skipped"], int) and b["skipped"] == 0 for b in local)
    with ShardServer(out) as server:
        http = cfg_for(server.url(PATTERN))
        source = resolve_source(http.data, 1)  # sizes.json read from beside the remote shards
        assert source.samples_per_epoch == 24 and source.shard_sets[0].urls[0] == server.url("shard-000000.tar")
        assert same_batches(collect(http), local)
        assert server.requests["sizes.json"] == 2  # once per resolution
    # pipe: has no place for an index: samples_per_epoch is required, and the error says so.
    piped = f"pipe:cat {out}/{PATTERN}"
    with pytest.raises(DataError, match=r"sizes\.json.*pipe: URLs cannot have one.*data\.samples_per_epoch"):
        resolve_source(cfg_for(piped).data, 1)
    assert same_batches(collect(cfg_for(piped, "data.samples_per_epoch=24")), local)
    # An fsspec filesystem (in memory here; s3://, gs:// work the same with their extra): glob and index through it.
    memory = fsspec.filesystem("memory")
    for path in out.iterdir():
        memory.pipe(f"/bucket/shards/{path.name}", path.read_bytes())
    assert same_batches(collect(cfg_for("memory://bucket/shards/shard-*.tar")), local)
    assert same_batches(collect(cfg_for("memory://bucket/shards/")), local)  # a remote folder: every *.tar in it


def test_dropped_connection_is_retried_then_skipped_and_counted(shards: Path) -> None:
    out = shards / "out"
    local = collect(cfg_for(f"{out}/{PATTERN}", "data.resampled=false", "data.shuffle_buffer=1"))
    with ShardServer(out) as server:
        cfg = cfg_for(server.url(PATTERN), "data.resampled=false", "data.shuffle_buffer=1", "data.retries=2")
        # Cut off once: the retry continues after the samples already delivered; nothing is lost or repeated.
        server.fault("shard-000001.tar", times=1, at=0.5)
        with pytest.warns(UserWarning, match=r"shard http://.*shard-000001\.tar: curl exit 18.*retry 1 of 2"):
            batches = collect(cfg)
        assert server.requests["shard-000001.tar"] == 2
        assert same_batches(batches, local) and sum(b["skipped"] for b in batches) == 0
        # Cut off every time: after 1 + 2 attempts the rest of the shard is skipped and counted exactly (index).
        server.fault("shard-000002.tar", times=-1, at=0.5)
        with pytest.warns(
            UserWarning, match=r"shard-000002\.tar: read \d samples of the 6 listed .* after 3 att"
        ) as seen:
            batches = collect(cfg)
        message = next(str(w.message) for w in seen if "after 3 attempts" in str(w.message))
        read, lost = (int(n) for n in re.search(r"read (\d) samples .*; (\d) counted as skipped", message).groups())
        assert 0 < read < 6 and lost == 6 - read
        # The epoch still has 12 full batches (the reader cycles on into the next pass over its shards); the first
        # pass's losses are in the skipped counts (the next pass over shard 2 breaks again, if it gets that far).
        assert server.requests["shard-000002.tar"] >= 3
        assert len(batches) == 12 and all(b["images"].shape[0] == 2 for b in batches)
        assert sum(b["skipped"] for b in batches) >= lost


def test_stalled_connection_times_out_and_is_retried(shards: Path) -> None:
    out = shards / "out"
    with ShardServer(out) as server:
        cfg = cfg_for(server.url(PATTERN), "data.read_timeout=1", "data.retries=1")
        server.fault("shard-000000.tar", times=1, at=0.3, stall=30)
        start = time.monotonic()
        with pytest.warns(UserWarning, match=r"shard-000000\.tar: .*no data for data\.read_timeout=1 s; retry 1"):
            batches = collect(cfg)
        assert time.monotonic() - start < 15  # the 30 s stall did not hold the run
        assert len(batches) == 12 and sum(b["skipped"] for b in batches) == 0


def test_missing_or_unreachable_urls_fail_before_training(shards: Path, tmp_path: Path) -> None:
    with ShardServer(shards / "out") as server:
        start = time.monotonic()
        with pytest.raises(DataError, match=r"shard http://.*/missing-000\.tar cannot be reached \(curl exit 22.*404"):
            resolve_source(cfg_for(server.url("missing-{000..003}.tar")).data, 1)
        assert time.monotonic() - start < 10
        port = server.httpd.server_address[1]
    with pytest.raises(DataError, match="connection refused"):
        resolve_source(cfg_for(f"http://127.0.0.1:{port}/{PATTERN}").data, 1)
    with pytest.raises(DataError, match=r"pip install 'swinv2-pretrain\[s3\]'"):
        resolve_source(cfg_for("s3://some-bucket/shard-{0..3}.tar").data, 1)
    with pytest.raises(DataError, match=r"shard pipe:false cannot be read: command exit status 1"):
        resolve_source(cfg_for("pipe:false", "data.samples_per_epoch=8").data, 1)
    # The command line: exit 2 in seconds, one line naming the URL, no traceback.
    with ShardServer(shards / "out") as server:
        run = subprocess.run(
            [sys.executable, "-m", "pretrain", "--config", "configs/demo_cpu.yaml", f"data.path={server.url('x.tar')}"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
    assert run.returncode == 2, run.stderr
    assert "x.tar cannot be reached" in run.stderr and "Traceback" not in run.stderr


def test_corrupt_size_index_warns_and_falls_back_to_counting(shards: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in (shards / "out").glob("*.tar"):
        (copy / path.name).write_bytes(path.read_bytes())
    (copy / "sizes.json").write_text('{"shard-000000.tar": 6, ')
    with pytest.warns(UserWarning, match=r"size index .*copy/sizes\.json is corrupt .*falling back to counting"):
        source = resolve_source(cfg_for(f"{copy}/{PATTERN}").data, 1)
    assert source.samples_per_epoch == 24  # counted from the tar headers
    # Remote shards cannot be counted before training: the error asks for samples_per_epoch.
    with (
        ShardServer(copy) as server,
        pytest.warns(UserWarning, match=r"sizes\.json is corrupt"),
        pytest.raises(DataError, match=r"data\.samples_per_epoch"),
    ):
        resolve_source(cfg_for(server.url(PATTERN)).data, 1)


# ------------------------------------------------------------------------------------------------ mixtures
def mixture_cfg(shards: Path, *extra: str) -> PretrainConfig:
    sources = f"[{{path: '{shards}/out/{PATTERN}', weight: 3}}, {{path: '{shards}/other', weight: 1, name: small}}]"
    return load_config(
        None,
        [
            *TINY_MODEL,
            f"data.sources={sources}",
            "data.batch_size=4",
            "data.num_workers=0",
            "data.shuffle_buffer=4",
            *extra,
        ],
    )


def test_mixture_proportions_are_exact_rank_independent_and_seeded(shards: Path) -> None:
    cfg = mixture_cfg(shards)
    source = resolve_source(cfg.data, 1)
    assert source.samples_per_epoch == 36 and [s.name for s in source.shard_sets] == ["source0", "small"]
    one = collect(cfg)
    counts = [b["sources"] for b in one]
    assert all(sum(c.values()) == 4 for c in counts) and all(isinstance(v, int) for c in counts for v in c.values())
    # 3:1 weights: 27 and 9 of 36 samples, each running total within one sample of its share.
    assert sum(c["source0"] for c in counts) == 27 and sum(c["small"] for c in counts) == 9
    # Every image comes from the source its slot names.
    for batch in one:
        ids = ids_of(batch, cfg)
        assert sum(i >= 40 for i in ids) == batch["sources"]["small"]
    # Two ranks of 2: per step, rank 0's counts + rank 1's = the one-rank batch's counts (same global batch).
    two = [collect(mixture_cfg(shards, "data.batch_size=2"), rank=r, world=2) for r in (0, 1)]
    for step, batch in enumerate(one):
        merged = {k: two[0][step]["sources"][k] + two[1][step]["sources"][k] for k in batch["sources"]}
        assert merged == batch["sources"]
    assert [b["sources"] for b in collect(cfg)] == counts  # reproducible
    # The seed places the sources within each global batch, and so decides each rank's share.
    seeded = [collect(mixture_cfg(shards, "data.batch_size=2", "training.seed=5"), rank=0, world=2)]
    assert [b["sources"] for b in seeded[0]] != [b["sources"] for b in two[0]]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.sources=[{path: a.tar, weight: 0}]", r"data\.sources\[0\]\.weight=0\.0"),
        ("data.sources=[{path: a.tar}, {path: b.tar, name: source0}]", "used twice"),
        ("data.sources=[{path: ''}]", r"data\.sources\[0\]\.path is empty"),
    ],
)
def test_mixture_config_errors(override: str, message: str) -> None:
    from pretrain.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, [*TINY_MODEL, override])
    with pytest.raises(ConfigError, match="both set"):
        load_config(None, [*TINY_MODEL, "data.path=x.tar", "data.sources=[{path: a.tar}]"])


def test_mixture_plan_keeps_running_totals_within_one_sample() -> None:
    from pretrain.data.mixture import batch_counts

    rng = np.random.default_rng(0)
    for _ in range(20):
        weights = list(rng.uniform(0.01, 1.0, size=int(rng.integers(2, 6))))
        batch = int(rng.integers(1, 64))
        counts = batch_counts(weights, batch, 200)
        assert (counts >= 0).all() and (counts.sum(1) == batch).all()
        share = np.asarray(weights) / sum(weights)
        totals = np.cumsum(counts, axis=0)
        targets = np.outer(np.arange(1, 201) * batch, share)
        assert np.abs(totals - targets).max() < 1.0 + 1e-9
