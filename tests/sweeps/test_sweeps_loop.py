"""Loop trials on Ray Tune: ASHA over iterations, the results, best.yaml, resumable trials."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from raycollapse.cli.sweep_cmd import main
from raycollapse.config import load_config, to_dict

pytestmark = pytest.mark.slow

# A loop of a few seconds per stage on 2 cores: 16 digits, 2 iterations.
TINY = {
    "data": {"source": "digits"},
    "train": {"steps": 40, "batch_size": 16, "warmup_steps": 2, "log_every": 20,
              "checkpoint_every": 0, "sample_grid": 0, "cpu_threads": 1},
    "sample": {"steps": 5, "batch_size": 32, "group_size": 16},
    "knn": {"k": 3},
    "select": {"method": "greedy"},
    "loop": {"iterations": 2, "train_size": 16, "pool_multiple": 2},
}  # fmt: skip
# The ASHA test runs one trial at a time: its stages sample and embed in the trial's process
# (no actor pool to start per stage; the same values, tests/stages/test_shard_job.py).
IN_PROCESS = {"resources": {"generate_actors": 0, "embed_actors": 0}}


def test_asha_stops_the_poor_trial_and_best_yaml_runs_the_best(tmp_path, capsys, ray_local):
    """Rigged: the second trial learns nothing (lr 1e-12), so its samples stay noise, far from
    the training set: a worse (higher) generalization score at the first rung. One trial at a
    time makes the good one reach the rung first."""
    from raycollapse.loop.rundir import RunDir
    from raycollapse.loop.runner import run_loop

    storage = tmp_path / "sweep"
    sweep = {
        "kind": "loop", "base": {**TINY, **IN_PROCESS},
        "variants": [{"train.lr": 0.001}, {"train.lr": 1e-12}],
        "objective": {"metric": "generalization_score", "mode": "min"},
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "max_concurrent_trials": 1, "storage": str(storage),
    }  # fmt: skip
    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(yaml.safe_dump(sweep))
    assert main([str(cfg_file)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["trials"], summary["finished"], summary["stopped_early"]) == (2, 1, 1)

    rows = pq.read_table(storage / "results.parquet").to_pylist()
    by_lr = {}
    for row in rows:
        by_lr.setdefault(row["train.lr"], []).append(row)
    good, poor = by_lr[0.001], by_lr[1e-12]
    assert [r["iteration"] for r in good] == [0, 1] and [r["iteration"] for r in poor] == [0]
    assert poor[0]["generalization_score"] > good[0]["generalization_score"]
    good_id, poor_id = good[0]["trial_id"], poor[0]["trial_id"]
    assert summary["best_trial"] == good_id and summary["best_config"] == {"train.lr": 0.001}

    # Each row is the trial's own run folder's row; objective = the metric at that iteration.
    for trial_rows in (good, poor):
        run = RunDir(str(storage / "trials" / trial_rows[0]["trial_id"]))
        for row, saved in zip(trial_rows, run.metrics(), strict=True):
            assert row["generalization_score"] == saved["generalization_score"]
            assert row["entropy_train"] == saved["entropy_train"]
            assert row["objective"] == saved["generalization_score"]
    assert summary["best_value"] == good[-1]["generalization_score"]

    # best.yaml: the best trial's full loop config (its run folder's config.yaml).
    best = load_config(storage / "best.yaml")
    good_dir = storage / "trials" / good_id
    assert to_dict(best) == yaml.safe_load((good_dir / "config.yaml").read_text())
    assert best.loop.storage == str(good_dir) and best.train.lr == 0.001

    # The stopped trial's run folder resumes where ASHA stopped it: iteration 0 is not redone.
    poor_cfg = yaml.safe_load((storage / "trials" / poor_id / "config.yaml").read_text())
    run = RunDir(str(storage / "trials" / poor_id))
    before = (Path(run.path) / "iter_000" / "_done" / "metrics").stat().st_mtime_ns
    overrides = [f"{k}={json.dumps(v)}" for k, v in _flat(poor_cfg).items()]
    run_loop(load_config(None, overrides), until="1:train_set")
    assert run.is_done(1, "train_set") and not run.is_done(1, "train")
    assert (Path(run.path) / "iter_000" / "_done" / "metrics").stat().st_mtime_ns == before


def _flat(tree: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_two_loop_trials_run_at_once_on_two_cpus(tmp_path, capsys, ray_local):
    """Two one-iteration loop trials, max_concurrent_trials 2, on the session's 2-CPU Ray: each
    trial's process reserves no CPU and its stages 1 CPU, so both run at once and end (no
    deadlock). Each trial's run folder holds TensorBoard files equal to its metrics.json; Tune's
    TensorBoard logger writes beside the trials; the sweep report is written."""
    from helpers import read_tensorboard

    storage = tmp_path / "sweep"
    base = {**TINY, "data": {"source": "digits", "n": 32},
            "train": {**TINY["train"], "steps": 4, "warmup_steps": 1},
            "sample": {"steps": 2, "batch_size": 16, "group_size": 8},
            "loop": {**TINY["loop"], "iterations": 1, "train_size": 8, "pool_multiple": 1}}  # fmt: skip
    sweep = {
        "kind": "loop", "base": base, "space": {"seed": {"grid": [0, 1]}},
        "objective": {"metric": "entropy_train"}, "scheduler": {"name": "none"},
        "max_concurrent_trials": 2, "storage": str(storage),
    }  # fmt: skip
    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(yaml.safe_dump(sweep))
    assert main([str(cfg_file)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["trials"], summary["finished"]) == (2, 2)
    spans = []
    for trial in sorted((storage / "trials").iterdir()):
        rows = json.loads((trial / "metrics.json").read_text())
        assert [r["iteration"] for r in rows] == [0]
        values, images = read_tensorboard(trial / "tensorboard")
        numbers = {
            k: v for k, v in rows[0].items() if k != "iteration" and isinstance(v, int | float)
        }
        assert values == {(0, k): [float(v)] for k, v in numbers.items()}
        assert images == {0: [(trial / "iter_000" / "samples.png").read_bytes()]}
        assert list((storage / "tune" / trial.name).glob("events.out.tfevents*"))  # Tune's own
        spans.append(
            (
                (trial / "config.yaml").stat().st_mtime,
                (trial / "iter_000" / "_done" / "metrics").stat().st_mtime,
            )
        )
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1, spans  # the two trials ran at the same time
    report = json.loads((storage / "report" / "summary.json").read_text())
    assert report["correlation"]["n"] == 2
    assert [t["correlation"]["undefined"] for t in report["trials"]] == ["fewer than 2 points"] * 2
