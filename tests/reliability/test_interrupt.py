"""Ctrl-C of a real ``raycollapse run`` during the Ray Train stage stops it within seconds with
"interrupted" and exit 130 (Ray Train's own SIGINT handler would abort the fit quietly and keep
swallowing Ctrl-C), releases the lock and leaves the run resumable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import session_ray_address, start_local_ray

from raycollapse.config import load_config
from raycollapse.io.lock import LOCK_FILE
from raycollapse.loop.runner import run_loop

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
# long enough a training that the interrupt lands inside it
TINY = ["data.n=64", "loop.iterations=1", "loop.train_size=16", "loop.pool_multiple=2",
        "loop.metric_features=[pixel]", "knn.k=2", "train.steps=5000", "train.batch_size=4",
        "train.cpu_threads=1", "train.log_every=0", "train.checkpoint_every=0",
        # Ray Train, whose handler is the one that swallowed Ctrl-C (the in-process launcher
        # gets Python's KeyboardInterrupt like any stage)
        "train.launcher=ray"]  # fmt: skip


def test_ctrl_c_during_training_stops_the_run(tmp_path):
    start_local_ray()
    run = tmp_path / "run"
    cfg_file = tmp_path / "empty.yaml"
    cfg_file.write_text("{}\n")
    env = {**os.environ, "RAY_ADDRESS": session_ray_address(), "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "raycollapse.cli.main", "run", str(cfg_file), *TINY,
            f"loop.storage={run}"]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    lines: list[str] = []
    for line in proc.stderr:
        lines.append(line)
        if "iteration 0 train ..." in line:
            break
    assert proc.poll() is None, "".join(lines[-20:])
    time.sleep(8)  # Ray Train's controller and workers are up and training by now
    sent = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    try:
        _, rest = proc.communicate(timeout=60)  # swallowed, the run would go on training
    finally:
        proc.kill()
    code = proc.returncode
    waited = time.perf_counter() - sent
    assert code == 130, rest[-2000:]
    assert "run: interrupted" in rest and waited < 30
    assert not (run / LOCK_FILE).exists() and not (run / "iter_000" / "_done" / "train").exists()
    said: list[str] = []
    cfg = load_config(cfg_file, [*TINY, f"loop.storage={run}"])
    run_loop(cfg, until="0:train_set", log=said.append)  # resumes: the stages before are kept
    assert any("train_set: done before" in s for s in said)
