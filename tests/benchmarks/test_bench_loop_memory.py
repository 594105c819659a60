"""``benchmarks/bench_loop_memory.py``, its ``/proc`` sampling (``benchmarks/proc_tree.py``) and
its figures (``benchmarks/loop_memory_report.py``).

The sampling is checked against a child process of a known size; the fit against numpy's
``polyfit``; the quick mode runs two whole ``raycollapse run`` loops on the session's Ray and its
JSON is checked against what the runs wrote and what the sampling must have seen.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import session_ray_address

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_loop_memory as blm  # noqa: E402
import loop_memory_report as rep  # noqa: E402
import proc_tree  # noqa: E402

MB = 2**20


def test_tree_and_rss_see_a_child_of_known_size():
    """A grandchild holding 150 MiB of touched memory: found below this process, with its RSS."""
    code = (
        "import time; b = bytearray(150 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(30)"
    )
    outer = subprocess.Popen(  # a shell in between: the tree must follow more than one hop
        ["sh", "-c", f'{sys.executable} -c "{code}"; true']
    )
    found: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            below = proc_tree.tree(os.getpid())
            kids = [p for p in below if below[p] == outer.pid]
            found = {p: proc_tree.status(p).get("VmRSS", 0) for p in kids}
            if any(v >= 150 * MB for v in found.values()):
                break
            time.sleep(0.2)
        assert outer.pid in below and any(v >= 150 * MB for v in found.values()), found
        (kid,) = found
        assert proc_tree.descendants(below, outer.pid) == {kid}
        assert os.getpid() not in below  # the root itself is not below it
    finally:
        for pid in found:  # the grandchild, by its id, then the shell
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        outer.kill()
        outer.wait()


def test_fit_b_is_least_squares():
    bs = [100, 400, 1200]
    ys = [1000.0, 1003.5, 1011.0]  # MiB
    fit = rep.fit_b(bs, ys)
    slope, icpt = np.polyfit(bs, np.asarray(ys) * MB, 1)
    assert fit["bytes_per_b"] == pytest.approx(slope, rel=1e-9)
    assert fit["intercept_mb"] == pytest.approx(icpt / MB, rel=1e-9)
    assert fit["max_b_24gb"] == pytest.approx((24e9 - icpt) / slope, rel=1e-9)
    assert rep.fit_b([100, 200], [5.0, 4.0])["max_b_24gb"] == float("inf")  # no growth


@pytest.mark.slow  # two whole loops: ~3 min at load 20 on 2 cores (tens of seconds alone)
def test_quick_mode_json(tmp_path, monkeypatch):
    session_ray_address()  # the session's Ray, in this process: the bench joins it
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    out = tmp_path / "r.json"
    res = blm.main(["--quick", "--data", str(tmp_path / "d"), "--out", str(out), "--keep"])
    assert json.loads(out.read_text())["cases"] == json.loads(json.dumps(res["cases"]))
    assert [c["b"] for c in res["cases"]] == [16, 32]
    for c in res["cases"]:
        assert "error" not in c, c.get("error")
        assert c["rc"] == 0 and c["ok"] and c["train_set_1_rows"] == c["b"] and c["n"] == 5 * c["b"]
        run = tmp_path / "d" / "runs" / f"b{c['b']}_s2_replace"
        rows = json.loads((run / "iter_001" / "metrics.json").read_text())
        assert c["entropy_train_1"] == rows["entropy_train"]
        # the driver trains in process: torch and the model are in it, far above a bare Python
        assert c["driver_peak_mb"] >= c["driver_hwm_mb"] > 150
        assert c["driver_peak_mb"] >= c["driver_sampled_peak_mb"] > 150
        # generation and embedding ran on actors: workers below this process were seen
        assert c["workers"] >= 1 and c["workers_sum_peak_mb"] >= c["worker_max_peak_mb"] > 30
        assert c["ray_system_peak_mb"] > 30  # the session Ray's raylet and GCS are below us
        stages = set(c["by_stage_mb"])
        assert {"0:train", "0:generate", "1:train_set", "1:metrics"} <= stages, stages
    fit = res["fits"]["shards=2 replace"]
    assert fit["b_range"] == [16, 32]
    ys = [c["driver_peak_mb"] for c in res["cases"]]
    slope = (ys[1] - ys[0]) * MB / 16  # two points: the least-squares line goes through both
    assert fit["driver_peak"]["bytes_per_b"] == pytest.approx(slope, rel=1e-6, abs=1e-3)
    section = rep._section(res)
    assert section.startswith(rep.SECTION) and "| 2 | replace | 32 | 160 |" in section
