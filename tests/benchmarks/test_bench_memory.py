"""``benchmarks/bench_memory.py`` at a tiny size, so the script cannot rot: its case joins the
session's Ray, selects B of m x B rows through the loop and measures the pool's entropy on shard
actors; the entropy is checked against the plain formula on the vectors read back from disk."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import kl_entropy_direct, session_ray_address

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # 32-85 s here (load 5-30), the session Ray start included
def test_bench_memory_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", session_ray_address())  # no second Ray on this machine
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}:{ROOT / 'tests'}")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_memory

    res = bench_memory.main(
        ["--data", str(tmp_path), "--grid", "5:30", "--d", "16",
         "--paths", "sharded", "--shards", "2", "--k", "3"]
    )  # fmt: skip
    (case,) = res["cases"]
    assert "error" not in case, case.get("error")
    assert case["n"] == 150 and case["selected"] == 30 and res["same_size"]
    assert case["driver_peak_mb"] >= case["driver_select_peak_mb"] > 0
    emb = tmp_path / "m5_b30" / "iter_000" / "embeddings" / "pixel"
    table = pa.concat_tables(pq.read_table(f) for f in sorted(emb.glob("*.parquet")))
    assert sorted(table.column("id").to_pylist()) == list(range(150))
    x = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    assert case["entropy"] == pytest.approx(kl_entropy_direct(x, 3), rel=1e-9)
    section = bench_memory._section(res)
    assert section.startswith(bench_memory.SECTION) and "| sharded | 5 | 30 | 150 |" in section
    assert "sharded" in res["fits"]
    del sys.modules["bench_memory"]
