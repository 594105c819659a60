"""Streamed training (``train.in_memory_gb`` exceeded) with two workers.

The contract (stages/train.py, train_data.ShardStream): Ray Train splits the dataset with
``streaming_split(workers, equal=True)`` in preserved order; each worker streams its split, an
epoch of it at a time, through its seeded shuffle buffer. Per epoch the two workers' rows are
disjoint and cover the set; with a buffer holding the whole split, a worker's epoch e is its
split (in block order) permuted by ``derive_rng(rank_seed(seed, rank), e)``; and a worker
changes epochs at the same step as the other (equal splits, equal batch shares).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import ray.cloudpickle
import torch

from raycollapse.config import load_config
from raycollapse.data.sources import load_records
from raycollapse.diffusion.checkpoint import load_checkpoint, load_training_state
from raycollapse.seeds import derive_rng
from raycollapse.stages.train import train_distributed
from raycollapse.stages.train_data import ShardStream, rank_seed, training_dataset

torch.set_num_threads(1)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

N = 64
DATA = {"resolution": 8, "channels": 1, "on_small": "error"}


def _cfg(*overrides: str):
    return load_config(
        overrides=[
            f"data.n={N}",
            "train.batch_size=16",
            "train.warmup_steps=2",
            "train.workers=2",
            "train.in_memory_gb=0",  # every worker streams
            *overrides,
        ]
    )


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """The digits as Parquet, label = id (so a row names itself), in 4 files (several blocks)."""
    table = load_records(_cfg().data).to_arrow_table()
    table = table.set_column(
        table.schema.get_field_index("label"), "label", pa.array(np.arange(N), pa.int64())
    )
    folder = tmp_path_factory.mktemp("pool")
    for j in range(4):
        pq.write_table(table.slice(16 * j, 16), folder / f"part-{j:05d}.parquet")
    return folder


@ray.remote(num_cpus=0)
def _stream_rows(split, seed: int, buffer: int, take: list[int]) -> list[np.ndarray]:
    """The row ids (labels) a worker's ShardStream hands out, ``take[i]`` rows at a time."""
    stream = ShardStream(split, DATA, seed, buffer)
    return [stream.next(n)[1] for n in take]


def _splits(pool: Path):
    """The two splits as Ray Train's DataConfig makes them for a streamed run (stages/train.py)."""
    from ray.data import ExecutionOptions

    ds, _, _ = training_dataset(str(pool))
    ds.context.execution_options = ExecutionOptions(preserve_order=True)
    return ds.streaming_split(2, equal=True)


@pytest.mark.slow  # ~45 s here: each split epoch is a Ray Data execution
def test_two_streams_cover_the_set_once_per_epoch(ray_local, pool):
    """Two epochs in batches of 20, 20 and 24 rows: the second batch spans the epochs, so both
    workers start epoch 1 in the same call; a whole-split buffer gives the plain reference."""
    half = N // 2
    splits = _splits(pool)
    seeds = [rank_seed(5, r) for r in range(2)]
    got = ray.get(
        [
            _stream_rows.remote(s, sd, half, [20, 20, 24])
            for s, sd in zip(splits, seeds, strict=True)
        ]
    )
    rows = [np.concatenate(g) for g in got]
    for e in range(2):
        a, b = (r[e * half : (e + 1) * half] for r in rows)
        assert len(set(a)) == half and len(set(b)) == half  # each row once per epoch
        assert sorted(set(a) | set(b)) == list(range(N))  # disjoint, covering the set
        for r, epoch in enumerate((a, b)):
            split_rows = np.sort(epoch)  # blocks in file order: ids ascending
            perm = derive_rng(seeds[r], e).permutation(half)
            np.testing.assert_array_equal(epoch, split_rows[perm])


class KillOnce:
    """Ends rank 0's process (a real death) at ``step``, once."""

    def __init__(self, step: int, marker: Path) -> None:
        self.step, self.marker = step, marker

    def __call__(self, state) -> None:
        import os

        import ray.train

        if (
            state.step == self.step
            and ray.train.get_context().get_world_rank() == 0
            and not self.marker.exists()
        ):
            self.marker.write_text("killed\n")
            os._exit(1)


@pytest.mark.slow
def test_two_streaming_workers_train_and_resume(tmp_path, ray_local, pool):
    """Both workers stream; rank 0 dies at step 7 and the group resumes from step 5's checkpoint
    (weights, optimiser and each rank's stream position)."""
    cfg = _cfg("train.steps=10", "train.checkpoint_every=5", "train.max_failures=1",
               f"train.stream_buffer={N // 2}")  # fmt: skip
    marker = tmp_path / "killed.txt"
    out = train_distributed(cfg, pool, tmp_path / "ckpt", storage_path=tmp_path / "ray",
                            run_name="s", callbacks=[KillOnce(7, marker)])  # fmt: skip
    assert marker.exists() and out["start_step"] == 5 and out["streamed"] is True
    assert out["workers"] == 2 and out["batch_size"] == 16
    run = tmp_path / "ray" / "s"
    for step in (5, 10):  # each rank handed out step x 8 rows of its 32-row split
        for rank in range(2):
            state = load_training_state(run / f"step-{step:08d}" / f"rank_{rank:03d}.pt")
            assert state["stream_position"].tolist() == list(divmod(step * 8, N // 2))
    first = load_training_state(run / "step-00000005" / "train_state.pt")["losses"]
    final = load_training_state(run / "step-00000010" / "train_state.pt")["losses"]
    assert len(final) == 10 and final[:5] == first and all(np.isfinite(final))
    ckpt = load_checkpoint(
        out["checkpoint"], expect={"preset": "tiny", "resolution": 8, "channels": 1}
    )
    assert ckpt.meta["steps"] == 10 and ckpt.meta["workers"] == 2
