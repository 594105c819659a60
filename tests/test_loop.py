"""The recursive loop end to end on a tiny config: paradigms, selections, resume, refusal, report."""

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

from raycollapse.cli.main import main
from raycollapse.config import load_config
from raycollapse.errors import UserInputError
from raycollapse.loop.runner import STAGES, run_loop

pytestmark = pytest.mark.slow

TINY = [
    "data.n=200",
    "train.steps=16",
    "train.batch_size=16",
    "train.warmup_steps=2",
    "train.log_every=8",
    "train.checkpoint_every=0",
    "train.cpu_threads=1",
    "sample.steps=3",
    "sample.group_size=16",
    "sample.batch_size=32",
    "knn.k=2",
    "loop.iterations=2",
    "loop.train_size=16",
    "loop.pool_multiple=2",
    "loop.metric_features=[pixel]",
]
TIMING = ("seconds_", "images_per_second")


def tiny_cfg(storage: Path, *extra: str):
    return load_config(None, [*TINY, f"loop.storage={storage}", *extra])


def _results(rows: list[dict]) -> list[dict]:
    """Metric rows without timings (those differ between any two runs)."""
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows]


def _metrics(run: Path) -> list[dict]:
    return json.loads((run / "metrics.json").read_text())


def _train_origins(run: Path, it: int) -> list[str]:
    return pq.read_table(run / f"iter_{it:03d}" / "train_set").column("origin").to_pylist()


@pytest.mark.parametrize(
    "paradigm, method, extra",
    [
        ("replace", "none", ["loop.pool_multiple=1"]),
        ("accumulate", "threshold", []),
        ("accumulate_all", "random", []),
        ("fresh", "greedy", ["loop.fresh_fraction=0.25"]),
    ],
)
def test_two_iterations(ray_local, tmp_path, paradigm, method, extra):
    run = tmp_path / "run"
    cfg = tiny_cfg(run, f"loop.paradigm={paradigm}", f"select.method={method}", *extra)
    run_loop(cfg, log=lambda m: None)
    rows = _metrics(run)
    assert [r["iteration"] for r in rows] == [0, 1]
    for r in rows:
        for key in (
            "entropy_train",
            "entropy_pool",
            "entropy_generated",
            "generalization_score",
            "memorized_fraction",
            "fd_pixel",
            "precision",
            "recall",
            "density",
            "coverage",
        ):
            assert r[key] is not None and np.isfinite(r[key]), key
        assert r["fid"] is None  # no Inception weights on this machine
    assert (run / "metrics.parquet").exists() and (run / "config.yaml").exists()
    assert (run / "iter_001" / "samples.png").exists() and (
        run / "iter_001" / "nearest.parquet"
    ).exists()
    origins = _train_origins(run, 1)
    expected = {
        "replace": (16, {"gen_0"}),
        "accumulate": (16, None),
        "accumulate_all": (32, {"real", "gen_0"}),
        "fresh": (16, {"real", "gen_0"}),
    }[paradigm]
    assert len(origins) == expected[0]
    if expected[1] is not None:
        assert set(origins) == expected[1]
    if paradigm == "fresh":
        assert origins.count("real") == 4  # round(0.25 * 16) fresh real images
        real0 = set(pq.read_table(run / "iter_000" / "train_set").column("origin_id").to_pylist())
        t1 = pq.read_table(run / "iter_001" / "train_set").to_pydict()
        fresh = {i for o, i in zip(t1["origin"], t1["origin_id"], strict=True) if o == "real"}
        assert not fresh & real0  # fresh means never used before
    assert rows[1]["share_gen_0"] == pytest.approx(origins.count("gen_0") / len(origins))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted two-iteration run, shared by the resume tests."""
    from conftest import start_local_ray

    start_local_ray()
    ref = tmp_path_factory.mktemp("loop") / "ref"
    run_loop(tiny_cfg(ref), log=lambda m: None)
    return ref


def test_resume_at_every_stage_boundary_equals_uninterrupted(ray_local, reference_run, tmp_path):
    ref, cut = reference_run, tmp_path / "cut"
    for stage in STAGES:  # stop after each stage of iteration 1 (and so of 0), then resume
        run_loop(tiny_cfg(cut), until=f"1:{stage}", log=lambda m: None)
    run_loop(tiny_cfg(cut), log=lambda m: None)
    assert _results(_metrics(cut)) == _results(_metrics(ref))
    said: list[str] = []
    run_loop(tiny_cfg(cut), log=said.append)
    assert any("already finished" in s for s in said)


def test_killed_driver_resumes(ray_local, reference_run, tmp_path):
    """SIGKILL the real CLI process once a stage marker appears; the re-run finishes the same."""
    ref, killed = reference_run, tmp_path / "killed"
    env = {**os.environ, "RAY_ADDRESS": "local"}
    argv = [
        sys.executable,
        "-m",
        "raycollapse.cli.main",
        "run",
        "-",
        *TINY,
        f"loop.storage={killed}",
    ]
    cfg_file = tmp_path / "empty.yaml"
    cfg_file.write_text("{}\n")
    argv[argv.index("-")] = str(cfg_file)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "iter_000" / "_done" / "generate"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), "the driver never reached iteration 0 generate"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "iter_001" / "_done" / "metrics").exists()
    run_loop(load_config(cfg_file, [*TINY, f"loop.storage={killed}"]), log=lambda m: None)
    assert _results(_metrics(killed)) == _results(_metrics(ref))


def test_changed_config_is_refused_and_fork(ray_local, reference_run, tmp_path):
    run = reference_run
    before = (run / "metrics.json").read_text()
    with pytest.raises(UserInputError, match=r"knn.k: 2 \(saved\) -> 3 \(now\)"):
        run_loop(tiny_cfg(run, "knn.k=3"), log=lambda m: None)
    assert (run / "metrics.json").read_text() == before
    forked = run_loop(tiny_cfg(run, "knn.k=3"), fork=True, until="0:train_set", log=lambda m: None)
    assert forked != str(run) and Path(forked, "config.yaml").exists()
    assert "k: 3" in Path(forked, "config.yaml").read_text()
    code = main(["report", str(run), "--out", str(tmp_path / "report")])
    assert code == 0 and (tmp_path / "report" / "index.html").exists()
