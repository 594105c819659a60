"""A sweep whose driver is killed resumes with the same command, without re-running finished trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from raycollapse.cli.sweep_cmd import main

pytestmark = pytest.mark.slow


def _terminated(exp: Path) -> set[str]:
    """The trials that Tune's saved experiment state records as terminated."""
    states = sorted(exp.glob("experiment_state-*.json"))
    if not states:
        return set()
    try:
        trials = [json.loads(t[0]) for t in json.loads(states[-1].read_text())["trial_data"]]
    except (json.JSONDecodeError, KeyError):
        return set()  # caught while being written
    return {t["trial_id"] for t in trials if t["status"] == "TERMINATED"}


def test_killed_driver_resumes_without_rerunning_finished_trials(tmp_path, capsys, ray_local):
    np.save(tmp_path / "pool.npy", np.random.default_rng(1).normal(size=(80, 4)).astype("f4"))
    storage = tmp_path / "sweep"
    cfg = tmp_path / "s.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"kind": "select", "base": {"select": {"budget": 8, "method": "greedy"}},
             "pool": str(tmp_path / "pool.npy"), "space": {"select.seed": {"grid": [0, 1, 2, 3]}},
             "objective": {"metric": "entropy"}, "max_concurrent_trials": 1,
             "storage": str(storage)}
        )
    )  # fmt: skip
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), *sys.path]),
        "TUNE_GLOBAL_CHECKPOINT_S": "0",  # save Tune's state at every step: the kill below
    }  # then never loses a finished trial, which is what this test is about
    driver = subprocess.Popen(
        [sys.executable, "-m", "raycollapse.cli.sweep_cmd", str(cfg)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not _terminated(storage / "tune"):
            assert driver.poll() is None, "the sweep ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.2)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        finished = _terminated(storage / "tune")
    finally:
        if driver.poll() is None:
            driver.kill()
    done_before = {
        p.parent.name: p.stat().st_mtime_ns for p in storage.glob("trials/*/selection.npy")
    }
    assert 1 <= len(done_before) < 4

    assert main([str(cfg)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["trials"], summary["finished"]) == (4, 4)
    rows = pq.read_table(storage / "results.parquet").to_pylist()
    assert sorted(r["select.seed"] for r in rows) == [0, 1, 2, 3]
    after = {p.parent.name: p.stat().st_mtime_ns for p in storage.glob("trials/*/selection.npy")}
    assert len(after) == 4
    # The trials Tune had recorded as finished were not run again (selections not rewritten).
    assert finished and all(after[t] == done_before[t] for t in finished)
