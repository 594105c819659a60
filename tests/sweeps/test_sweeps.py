"""Sweeps: config checks before any trial, the search space in Tune, and select trials end to end.

Every reported metric and every selection is recomputed here by the plain definitions
(brute-force numpy distances), never by the code under test.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from scipy.special import digamma, gammaln

from raycollapse.cli.sweep_cmd import main
from raycollapse.config import load_config, to_dict

# ---------------------------------------------------------------------------------------------
# Independent implementations of the definitions


def _dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def _greedy(x: np.ndarray, budget: int, seed: int) -> list[int]:
    chosen = [int(np.random.default_rng(seed).integers(len(x)))]
    m = _dist(x, x[chosen])[:, 0]
    while len(chosen) < budget:
        nxt = int(np.argmax(m))  # lowest index on ties
        chosen.append(nxt)
        m = np.minimum(m, _dist(x, x[[nxt]])[:, 0])
    return chosen


def _threshold(x: np.ndarray, budget: int, tau: float, decay: float, seed: int) -> list[int]:
    order = np.random.default_rng(seed).permutation(len(x))
    accepted: list[int] = []
    while len(accepted) < budget:
        for i in order:
            if i in accepted:
                continue
            if not accepted or _dist(x[[i]], x[accepted]).min() > tau:
                accepted.append(int(i))
                if len(accepted) == budget:
                    break
        tau *= decay
    return accepted


def _kl_entropy(x: np.ndarray, k: int) -> float:
    n, d = x.shape
    dist = _dist(x, x)
    np.fill_diagonal(dist, np.inf)
    r_k = np.sort(dist, axis=1)[:, k - 1]
    log_cd = (d / 2) * math.log(math.pi) - gammaln(d / 2 + 1)
    return float(digamma(n) - digamma(k) + log_cd + d / n * np.log(r_k).sum())


# ---------------------------------------------------------------------------------------------
# Checks before any trial (no Ray)


def _write(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ({"select.mehtod": {"grid": ["greedy"]}}, "Did you mean 'select.method'"),
        ({"select": {"methd": {"grid": ["greedy"]}}}, "'select.methd' is not a loop config key"),
        ({"knn.k": {"choice": []}}, "'knn.k' has an empty choice"),
        (
            {"select.decay": {"uniform": [0.9, 0.5]}},
            "'select.decay' uniform has low 0.9 > high 0.5",
        ),
        (
            {"select.decay": {"normal": [0.5, 0.1]}},
            "unknown distribution 'normal' for 'select.decay'",
        ),
        ({"knn.k": {"grid": [2, "three"]}}, "bad value 'three' for 'knn.k'"),
        ({"select.decay": {"grid": [0.5, 1.5]}}, "select.decay must be in (0, 1)"),
        ({"loop.train_size": {"grid": [16]}}, "sweep only select.* and knn.* keys"),
        ({"knn.k": {"randint": [1, 2.5]}}, "randint bounds must be integers"),
    ],
)
def test_bad_space_refused_before_any_trial(tmp_path, capsys, space, expected):
    np.save(tmp_path / "pool.npy", np.random.default_rng(0).normal(size=(50, 4)).astype("f4"))
    storage = tmp_path / "sweep"
    cfg = _write(
        tmp_path / "s.yaml",
        {"kind": "select", "base": {"select": {"budget": 8, "method": "threshold"}},
         "pool": str(tmp_path / "pool.npy"), "space": space, "storage": str(storage)},
    )  # fmt: skip
    assert main([str(cfg)]) == 2
    assert expected in capsys.readouterr().err
    assert not storage.exists()  # nothing started


@pytest.mark.parametrize(
    ("tree", "overrides", "expected"),
    [
        ({"num_sample": 2}, [], "unknown sweep config key 'num_sample'"),
        ({}, ["objective.metric=entropy_trian"], "Did you mean 'entropy_train'"),
        ({"base": {"loop": {"iteration": 2}}}, [], "unknown config key 'loop.iteration'"),
        ({}, ["base.knn.kk=3"], "unknown config key 'knn.kk'"),
        ({"variants": [{"select.tau0": {"grid": [1.0]}}]}, [], "must be a fixed value"),
        ({"space": {"knn.k": {"grid": [2]}}, "variants": [{"knn.k": 3}]}, [], "also in space"),
        ({"scheduler": {"grace_period": 9}}, [], "scheduler.grace_period=9"),
        ({"objective": {"mode": "maximum"}}, [], "objective.mode"),
        *(
            pytest.param(
                {},
                [f"base.tracking.{m}=true"],
                f"pip install {m}",
                marks=pytest.mark.skipif(
                    importlib.util.find_spec(m) is not None, reason=f"{m} is installed"
                ),
            )
            for m in ("mlflow", "wandb")
        ),
    ],
)
def test_bad_sweep_config_refused(tmp_path, capsys, tree, overrides, expected):
    storage = tmp_path / "sweep"
    cfg = _write(tmp_path / "s.yaml", {"storage": str(storage), **tree})
    assert main([str(cfg), *overrides]) == 2
    assert expected in capsys.readouterr().err
    assert not storage.exists()


def test_param_space_translation():
    from ray import tune

    from raycollapse.sweeps.config import load_sweep
    from raycollapse.sweeps.tuner import param_space

    sweep = load_sweep(Path(__file__).parents[2] / "configs" / "sweeps" / "select_smoke.yaml")
    assert param_space(sweep.space) == {
        "select.method": {"grid_search": ["greedy", "threshold", "random"]},
        "select.seed": {"grid_search": [0, 1]},
    }
    from raycollapse.sweeps.space import parse_space

    schema = to_dict(load_config())
    space = parse_space(
        {"knn": {"k": {"randint": [2, 4]}}, "select.decay": {"loguniform": [0.5, 0.9]},
         "select.tau0": {"uniform": [1, 2]}, "select.seed": 7},
        [{"select.method": "greedy"}, {"select.method": "threshold", "select.budget": None}],
        schema,
    )  # fmt: skip
    ps = param_space(space)
    assert isinstance(ps["knn.k"], tune.search.sample.Integer)
    assert (ps["knn.k"].lower, ps["knn.k"].upper) == (2, 5)  # randint's high is included
    assert isinstance(ps["select.decay"].get_sampler(), tune.search.sample.LogUniform)
    assert (ps["select.tau0"].lower, ps["select.tau0"].upper) == (1, 2)
    assert ps["select.seed"] == 7 and ps["variant"] == {"grid_search": [0, 1]}
    values = space.values_for(
        {
            "knn.k": np.int64(3),
            "select.decay": 0.6,
            "select.tau0": 1.5,
            "select.seed": 7,
            "variant": 1,
        }
    )
    assert values == {"knn.k": 3, "select.decay": 0.6, "select.tau0": 1.5, "select.seed": 7,
                      "select.method": "threshold", "select.budget": None}  # fmt: skip
    assert type(values["knn.k"]) is int


# ---------------------------------------------------------------------------------------------
# Select trials end to end


def test_select_sweep_metrics_equal_definitions_and_resume(tmp_path, capsys, ray_local):
    x = np.random.default_rng(5).normal(size=(150, 6)).astype(np.float32)
    np.save(tmp_path / "pool.npy", x)
    budget, k, decay = 12, 3, 0.8
    variants = [
        {"select.method": "greedy", "select.seed": 1},
        {"select.method": "threshold", "select.tau0": 4.0, "select.seed": 2},
        {"select.method": "random", "select.seed": 3},
    ]
    storage = tmp_path / "sweep"
    base = {"knn": {"k": k}, "select": {"budget": budget, "decay": decay}}
    cfg = _write(
        tmp_path / "s.yaml",
        {"kind": "select", "base": base, "pool": str(tmp_path / "pool.npy"), "variants": variants,
         "objective": {"metric": "coverage_radius", "mode": "min"}, "max_concurrent_trials": 2,
         "storage": str(storage)},
    )  # fmt: skip
    assert main([str(cfg)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert (summary["trials"], summary["finished"], summary["stopped_early"]) == (3, 3, 0)
    assert list(summary) == ["trials", "finished", "stopped_early", "errored", "best_trial",
                             "best_value", "best_config", "results", "best", "report"]  # fmt: skip
    assert summary["errored"] == 0 and summary["results"] == str(storage / "results.parquet")
    assert summary["best"] == str(storage / "best.yaml")
    assert summary["report"] == str(storage / "report" / "index.html")
    report = json.loads((storage / "report" / "summary.json").read_text())
    assert report["best_trial"] == summary["best_trial"] and len(report["trials"]) == 3
    # select trials report no entropy_train / generalization_score: r is undefined, and says so
    assert report["correlation"] == {"r": None, "n": 0, "undefined": "fewer than 2 points"}

    table = pq.read_table(storage / "results.parquet").to_pylist()
    assert len(table) == 3 and {r["iteration"] for r in table} == {0}
    expected_idx = {
        "greedy": _greedy(x, budget, 1),
        "threshold": _threshold(x, budget, 4.0, decay, 2),
        "random": list(np.random.default_rng(3).choice(len(x), budget, replace=False)),
    }
    coverage = {}
    for row in table:
        method = row["select.method"]
        idx = np.load(storage / "trials" / row["trial_id"] / "selection.npy")
        assert idx.tolist() == expected_idx[method], method
        sel = x[idx]
        d = _dist(sel, sel)
        np.fill_diagonal(d, np.inf)
        assert row["min_pairwise_distance"] == pytest.approx(d.min(), rel=1e-12)
        cover = _dist(x, sel).min(axis=1).max()
        assert row["coverage_radius"] == pytest.approx(cover, rel=1e-12)
        assert row["entropy"] == pytest.approx(_kl_entropy(sel, k), rel=1e-9)
        assert row["objective"] == row["coverage_radius"] and row["seconds"] >= 0
        coverage[row["trial_id"]] = (cover, method)

    best_id = min(coverage, key=lambda t: coverage[t][0])
    assert summary["best_trial"] == best_id
    assert summary["best_value"] == pytest.approx(coverage[best_id][0], rel=1e-12)
    best_variant = next(v for v in variants if v["select.method"] == coverage[best_id][1])
    assert summary["best_config"] == best_variant
    # best.yaml is the best trial's whole loop config: the base with the variant's values.
    expected = load_config(None, [f"{k_}={json.dumps(v)}" for k_, v in best_variant.items()]
                           + [f"knn.k={k}", f"select.budget={budget}", f"select.decay={decay}"])  # fmt: skip
    assert to_dict(load_config(storage / "best.yaml")) == to_dict(expected)

    # Running the same command again resumes the (finished) sweep: no trial runs again.
    stamps = {p: os.stat(p).st_mtime_ns for p in storage.glob("trials/*/selection.npy")}
    assert main([str(cfg)]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again == summary
    assert {p: os.stat(p).st_mtime_ns for p in storage.glob("trials/*/selection.npy")} == stamps

    # A changed sweep in the same storage is refused instead of mixed in.
    assert main([str(cfg), "objective.mode=max"]) == 2
    assert "another sweep config" in capsys.readouterr().err


def test_select_smoke_config_checks():
    """configs/sweeps/select_smoke.yaml loads and passes every check (its run: slow tests)."""
    from raycollapse.cli.sweep_cmd import load_pool
    from raycollapse.sweeps.config import check_sweep, load_sweep

    sweep = load_sweep(Path(__file__).parents[2] / "configs" / "sweeps" / "select_smoke.yaml")
    pool = load_pool(sweep)
    assert pool.shape == (1797, 64)
    assert len(check_sweep(sweep, len(pool))) == 1 + 3 + 2


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).parents[2] / "configs" / "sweeps").glob("*.yaml")),
    ids=lambda p: p.name,
)
def test_every_example_sweep_loads_and_passes_its_checks(path, monkeypatch):
    """Each file of configs/sweeps/ loads and passes check_sweep (no trial runs); the example
    space sizes are those their headers state."""
    from raycollapse.cli.sweep_cmd import load_pool
    from raycollapse.sweeps.config import check_sweep, load_sweep

    monkeypatch.chdir(Path(__file__).parents[2])  # base: paths are relative to the repository
    # No pretrained weights are fetched in tests: random ones for the feature extractors.
    sweep = load_sweep(path, ["base.features.pretrained=none"])
    rows = len(load_pool(sweep)) if sweep.cfg.kind == "select" else None
    configs = check_sweep(sweep, rows)
    assert configs[0] is sweep.base
    grid = math.prod(len(d.values) for d in sweep.space.dimensions if d.kind == "grid")
    trials = grid * max(1, len(sweep.space.variants)) * sweep.cfg.num_samples
    expected = {"strategies.yaml": 12, "knn_k.yaml": 15, "threshold_schedule.yaml": 20,
                "cifar10_paradigm_strategy.yaml": 8, "smoke.yaml": 2, "select_smoke.yaml": 6}  # fmt: skip
    if path.name in expected:
        assert trials == expected[path.name]
