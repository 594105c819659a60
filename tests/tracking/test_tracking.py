"""TensorBoard event files of a run, read back by a TFRecord reader written in the tests: every
metrics.json number per step, exactly once, across resumes; the sample grids; the optional
services refused by name when not installed."""

from __future__ import annotations

import importlib.util
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import read_tensorboard
from PIL import Image

from raycollapse.config import load_config
from raycollapse.errors import UserInputError
from raycollapse.tracking import make_tracker


def _run(tmp_path: Path, iterations: int = 3) -> tuple[Path, list[dict], dict[int, bytes]]:
    """A run folder's metrics.json and samples.png files, as the loop writes them."""
    run = tmp_path / "run"
    rng = np.random.default_rng(0)
    rows, pngs = [], {}
    for t in range(iterations):
        rows.append({
            "iteration": t, "entropy_train": 5.123456789012345 - t / 3, "train_size": 32,
            "generalization_score": float(rng.random()), "fid": None, "seconds_train": 1e-7 * t,
            "fd_pixel": math.nan if t == 1 else 2.0 ** -30,
        })  # fmt: skip
        folder = run / f"iter_{t:03d}"
        folder.mkdir(parents=True)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (24, 16, 3), dtype=np.uint8)).save(buf, "PNG")
        pngs[t] = buf.getvalue()
        (folder / "samples.png").write_bytes(pngs[t])
    (run / "metrics.json").write_text(json.dumps(rows))
    return run, rows, pngs


def _expected(rows: list[dict]) -> dict[tuple[int, str], float]:
    return {
        (r["iteration"], k): v
        for r in rows
        for k, v in r.items()
        if k != "iteration" and isinstance(v, int | float)
    }


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def test_event_files_hold_the_metrics_exactly_once_across_resumes(tmp_path):
    run, rows, pngs = _run(tmp_path)
    cfg = load_config(None, [f"loop.storage={run}"])
    tracker = make_tracker(cfg)
    for row in rows[:2]:  # the first invocation stops after iteration 1
        tracker(row)
    tracker.close()
    first = run / "tensorboard" / "events.out.tfevents.000000.raycollapse"
    stamp = first.stat().st_mtime_ns
    # The resumed invocation: run_loop reports iterations 0 and 1 again, then 2.
    tracker = make_tracker(cfg)
    for row in json.loads((run / "metrics.json").read_text()):
        tracker(row)
    tracker.close()
    values, images = read_tensorboard(run / "tensorboard")
    expected = _expected(rows)
    assert set(values) == set(expected)
    for key, logged in values.items():
        assert len(logged) == 1 and _same(logged[0], float(expected[key])), (key, logged)
    assert images == {t: [png] for t, png in pngs.items()}
    assert first.stat().st_mtime_ns == stamp  # never rewritten
    # A lost file (or tracking switched on later) is filled in from the rows on the next resume.
    (run / "tensorboard" / "events.out.tfevents.000001.raycollapse").unlink()
    tracker = make_tracker(cfg)
    for row in rows:
        tracker(row)
    again = read_tensorboard(run / "tensorboard")[0]
    assert {k: repr(v) for k, v in again.items()} == {k: repr(v) for k, v in values.items()}
    assert sorted(p.name for p in (run / "tensorboard").iterdir()) == [
        f"events.out.tfevents.{t:06d}.raycollapse" for t in range(3)
    ]


def test_tensorboard_off_writes_nothing(tmp_path):
    run, rows, _ = _run(tmp_path, iterations=1)
    tracker = make_tracker(load_config(None, [f"loop.storage={run}", "tracking.tensorboard=false"]))
    tracker(rows[0])
    assert not (run / "tensorboard").exists()


@pytest.mark.parametrize("service", ["mlflow", "wandb"])
def test_missing_service_is_refused_naming_the_package(tmp_path, service):
    if importlib.util.find_spec(service) is not None:
        pytest.skip(f"{service} is installed here")
    cfg = load_config(None, [f"loop.storage={tmp_path / 'run'}", f"tracking.{service}=true"])
    with pytest.raises(UserInputError, match=f"pip install {service}"):
        make_tracker(cfg)
    assert not (tmp_path / "run").exists()
    make_tracker(cfg, external=False)  # a sweep's loop trial: TensorBoard only, no check
