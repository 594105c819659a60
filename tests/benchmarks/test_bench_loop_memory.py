"""``benchmarks/bench_loop_memory.py``, its ``/proc`` sampling (``benchmarks/proc_tree.py``) and
its figures (``benchmarks/loop_memory_report.py``).

The sampling is checked against a child process of a known size; the fit against numpy's
``polyfit``; the quick mode runs two whole ``raycollapse run`` loops on the session's Ray and its
JSON is checked against what the runs wrote and what the sampling must have seen.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

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
