"""The shard-job runner on a small counting stage: resume, setup errors, declared columns."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from shard_hooks import CountingStage

from raycollapse.errors import UserInputError
from raycollapse.stages.base import Resources, check_resources
from raycollapse.stages.shard_job import ShardJob, ShardStatus, run_shard_job

SPECS = [{"shard": s, "lo": 5 * s, "hi": 5 * s + 5, "step": 3} for s in range(4)]
SIG = {"what": "counts", "version": 1}


def _job(out, specs=SPECS, **kw) -> ShardJob:
    return ShardJob(CountingStage(out=str(out), signature=SIG, **kw), list(specs), str(out), 2)


def _check_shard(path, lo: int, hi: int) -> None:
    table = pq.read_table(path)
    np.testing.assert_array_equal(table.column("id").to_numpy(), np.arange(lo, hi))
    np.testing.assert_array_equal(table.column("x").to_numpy(), 3 * np.arange(lo, hi) + 1)


def test_status_rows_round_trip():
    rows = [ShardStatus("a", 3, 0.5, "n1"), ShardStatus("b", 0, 1.0, "n2", "bad input")]
    cols = ShardStatus.encode(rows)
    assert list(cols) == ["shard", "rows", "seconds", "node_id", "error"]
    back = [ShardStatus.decode({k: v[i] for k, v in cols.items()}) for i in range(2)]
    assert back == rows


def test_resume_skips_complete_shards_and_redoes_a_truncated_one(tmp_path, ray_local):
    out = tmp_path / "o"
    first = run_shard_job(_job(out))
    assert (first.shards_written, first.shards_skipped, first.rows_written) == (4, 0, 20)
    assert sorted(s.shard for s in first.statuses) == [
        str(out / f"c-{s}.parquet") for s in range(4)
    ]
    assert first.actors == 2 and first.stage_retries == 0 and len(first.node_ids) == 1
    mtimes = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)}

    again = run_shard_job(_job(out))
    assert (again.shards_written, again.shards_skipped, again.actors) == (0, 4, 0)
    assert (
        again.statuses == []
        and {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)} == mtimes
    )

    # a shard cut short (half its bytes) and one with too few rows are both made again
    data = (out / "c-1.parquet").read_bytes()
    (out / "c-1.parquet").write_bytes(data[: len(data) // 2])
    short = _job(tmp_path / "short", [{"shard": 2, "lo": 10, "hi": 12, "step": 3}])
    run_shard_job(short)
    os.replace(tmp_path / "short" / "c-2.parquet", out / "c-2.parquet")
    redo = run_shard_job(_job(out))
    assert (redo.shards_written, redo.shards_skipped, redo.rows_written) == (2, 2, 10)
    assert sorted(s.shard for s in redo.statuses) == [
        str(out / "c-1.parquet"),
        str(out / "c-2.parquet"),
    ]
    for s in SPECS:
        _check_shard(out / f"c-{s['shard']}.parquet", s["lo"], s["hi"])
    assert os.stat(out / "c-0.parquet").st_mtime_ns == mtimes["c-0.parquet"]

    # shards of another signature are refused, not mixed in
    other = ShardJob(CountingStage(out=str(out), signature={"what": "else"}), SPECS, str(out), 1)
    with pytest.raises(UserInputError, match="already holds other counts.*Use another folder"):
        run_shard_job(other)


def test_setup_error_surfaces_once_with_the_users_message(tmp_path, ray_local):
    msg = "the model file 'm.bin' is not a model; pass a checkpoint folder."
    with pytest.raises(UserInputError) as info:
        run_shard_job(_job(tmp_path / "o", setup_error=msg))
    assert str(info.value) == msg  # once, alone: no shard prefix, no Ray traceback
    assert info.value.__cause__ is None and info.value.__context__ is None
    assert not any(f.endswith(".parquet") for f in os.listdir(tmp_path / "o"))


def test_a_missing_declared_column_is_refused(tmp_path, ray_local):
    specs = [{k: v for k, v in s.items() if k != "step"} for s in SPECS]
    with pytest.raises(
        UserInputError, match=r"count: the input has no column 'step' \(it has: shard, lo, hi\)"
    ):
        run_shard_job(_job(tmp_path / "o", specs))
    assert not (tmp_path / "o").exists()  # refused before any work


def test_check_resources(ray_local):
    check_resources(Resources(num_cpus=1.0), 2, "x")  # ray_local: 2 CPUs, no GPU
    with pytest.raises(UserInputError, match=r"x: 3 actors x 1 CPU = 3 CPU, but the cluster has 2"):
        check_resources(Resources(num_cpus=1.0), 3, "x")
    with pytest.raises(
        UserInputError, match="x: each actor asks for 0.5 GPU but the largest node has 0"
    ):
        check_resources(Resources(num_cpus=0.5, num_gpus=0.5), 1, "x")
    with pytest.raises(UserInputError, match="actors must be >= 0"):
        check_resources(Resources(), -1, "x")
    check_resources(Resources(num_cpus=4.0, num_gpus=1.0), 0, "x")  # 0: the calling process
