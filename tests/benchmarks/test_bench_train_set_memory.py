"""``benchmarks/bench_train_set_memory.py`` at a tiny size, so the script cannot rot: its case
builds the training set of B of m x B pool images through the loop; the written set is checked
against the pool images it references (decoded here with PIL)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def test_bench_train_set_memory_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_train_set_memory

    (case,) = bench_train_set_memory.main(
        ["--data", str(tmp_path), "--grid", "3:10", "--side", "8", "--shard-rows", "7"]
    )
    assert "error" not in case, case.get("error")
    assert case["n"] == 30 and case["rows"] == 10
    assert case["samples_peak_mb"] >= case["train_set_peak_mb"] > 0
    run = tmp_path / "m3_b10"
    pool = pa.concat_tables(
        pq.read_table(f) for f in sorted((run / "iter_000/pool").glob("*.parquet"))
    )
    by_id = dict(zip(pool.column("id").to_pylist(), pool.column("image").to_pylist(), strict=True))
    train = pq.read_table(run / "iter_001/train_set/part-00000.parquet")
    assert train.column("origin").to_pylist() == ["gen_0"] * 10
    for got, i in zip(
        train.column("image").to_pylist(), train.column("origin_id").to_pylist(), strict=True
    ):
        want = np.asarray(Image.open(io.BytesIO(by_id[i])).convert("RGB"))
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(got))), want)
