"""`raycollapse entropy` and `raycollapse select` end to end, in-process, and their bad inputs."""

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from raycollapse.cli.main import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def emb(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    path = tmp_path / "x.npy"
    np.save(path, x)
    return path, x


def test_entropy_json(capsys, emb):
    path, x = emb
    code, out, _ = _run(capsys, "entropy", str(path), "--k", "4", "--json")
    assert code == 0
    res = json.loads(out)
    assert (res["n"], res["d"], res["k"], res["n_duplicates"]) == (300, 6, 4, 0)
    # standard normal in 6-d: H = 3 log(2 pi e) ~= 8.51 nats; the estimator is close at N=300
    assert abs(res["entropy"] - 3 * math.log(2 * math.pi * math.e)) < 0.6


def test_entropy_override_equals_flag(capsys, emb):
    path, _ = emb
    _, a, _ = _run(capsys, "entropy", str(path), "--k", "2", "--json")
    _, b, _ = _run(capsys, "entropy", str(path), "knn.k=2", "--json")
    assert json.loads(a)["entropy"] == json.loads(b)["entropy"]


@pytest.mark.parametrize("method", ["greedy", "threshold", "random"])
def test_select_writes_indices(capsys, emb, tmp_path, method):
    path, x = emb
    out = tmp_path / f"sel_{method}.npy"
    code, stdout, _ = _run(
        capsys,
        "select",
        str(path),
        "--method",
        method,
        "--budget",
        "40",
        "--out",
        str(out),
        "--json",
    )
    assert code == 0
    res = json.loads(stdout)
    idx = np.load(out)
    assert idx.dtype == np.int64 and len(idx) == 40 and len(set(idx.tolist())) == 40
    sub = x[idx].astype(np.float64)
    d = np.sqrt(((sub[:, None] - sub[None]) ** 2).sum(-1))
    d[np.diag_indices(40)] = np.inf
    assert res["min_pairwise_distance"] == pytest.approx(d.min(), rel=1e-9)
    assert (res["n"], res["budget"], res["method"]) == (300, 40, method)
    assert res["entropy"] is not None and res["seconds"] >= 0


def test_select_parquet_out(capsys, emb, tmp_path):
    path, _ = emb
    out = tmp_path / "sel.parquet"
    assert (
        _run(capsys, "select", str(path), "--method", "greedy", "--budget", "5", "--out", str(out))[
            0
        ]
        == 0
    )
    t = pq.read_table(out).to_pydict()
    assert t["rank"] == [0, 1, 2, 3, 4] and len(t["index"]) == 5


def test_greedy_beats_random_min_distance(capsys, emb, tmp_path):
    path, _ = emb
    res = {}
    for method in ("greedy", "random"):
        _, stdout, _ = _run(
            capsys,
            "select",
            str(path),
            "--method",
            method,
            "--budget",
            "30",
            "--out",
            str(tmp_path / f"{method}.npy"),
            "--json",
        )
        res[method] = json.loads(stdout)
    assert res["greedy"]["min_pairwise_distance"] > res["random"]["min_pairwise_distance"]
    assert res["greedy"]["entropy"] > res["random"]["entropy"]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--budget", "0"], "budget must be >= 1"),
        (["--budget", "301"], "larger than the number of rows"),
        (["--budget", "5", "--method", "threshold", "--decay", "1.5"], "decay must be in"),
        (["--budget", "5", "--method", "threshold", "--decay", "0"], "decay must be in"),
        (["--budget", "5", "--method", "threshold", "--tau0", "-1"], "tau0 must be > 0"),
        (["--budget", "5", "select.typo=1"], "unknown config key"),
    ],
)
def test_select_bad_input(capsys, emb, tmp_path, args, fragment):
    path, _ = emb
    out = tmp_path / "never.npy"
    argv = (
        ["select", str(path), "--out", str(out)]
        + (["--method", "greedy"] if "--method" not in args else [])
        + args
    )
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert fragment in err
    assert "Traceback" not in err
    assert not out.exists()


def test_entropy_bad_input(capsys, tmp_path):
    bad = tmp_path / "nan.npy"
    x = np.ones((10, 3), np.float32)
    x[4, 1] = np.nan
    np.save(bad, x)
    code, _, err = _run(capsys, "entropy", str(bad))
    assert code == 2 and "nan" in err.lower()
    one = tmp_path / "one.npy"
    np.save(one, np.ones((1, 3), np.float32))
    assert _run(capsys, "entropy", str(one))[0] == 2
    ok = tmp_path / "ok.npy"
    np.save(ok, np.random.default_rng(0).normal(size=(5, 2)))
    code, _, err = _run(capsys, "entropy", str(ok), "--k", "5")
    assert code == 2 and "k" in err
    code, _, err = _run(capsys, "entropy", str(tmp_path / "missing"))
    assert code == 2 and "does not exist" in err


def test_identical_points_entropy_finite(capsys, tmp_path):
    same = tmp_path / "same.npy"
    np.save(same, np.ones((50, 4), np.float32))
    code, out, _ = _run(capsys, "entropy", str(same), "--json")
    res = json.loads(out)
    assert code == 0 and res["entropy"] is not None and math.isfinite(res["entropy"])
    assert res["n_duplicates"] == 50
