"""`raycollapse entropy` and `raycollapse select` end to end, in-process, and their bad inputs.

The indices `select` writes are compared with the selection definitions (docs/design.md,
"Greedy selection", "Threshold decay") written here as plain loops, not with the library's
own functions.
"""

import json
import math

import numpy as np
import pyarrow as pa
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


# ---------------------------------------------------------------- references (the definitions)


def _dist(x64: np.ndarray, rows: np.ndarray | list, i: int) -> np.ndarray:
    return np.sqrt(((x64[rows] - x64[i]) ** 2).sum(axis=1))


def ref_greedy(x: np.ndarray, budget: int, seed: int) -> list[int]:
    """Farthest point: a seeded first point, then the point farthest from the chosen ones."""
    x64 = x.astype(np.float64)
    chosen = [int(np.random.default_rng(seed).integers(len(x)))]
    nearest = _dist(x64, slice(None), chosen[0])
    while len(chosen) < budget:
        nxt = int(np.argmax(nearest))
        chosen.append(nxt)
        nearest = np.minimum(nearest, _dist(x64, slice(None), nxt))
    return chosen


def ref_threshold(x: np.ndarray, budget: int, tau0: float, decay: float, seed: int):
    """Sequential threshold decay: returns (accepted, tau of the last pass, passes)."""
    x64 = x.astype(np.float64)
    order = np.random.default_rng(seed).permutation(len(x))
    accepted: list[int] = []
    tau, passes = tau0, 0
    while True:
        passes += 1
        for i in order:
            if i in accepted:
                continue
            if not accepted or _dist(x64, accepted, int(i)).min() > tau:
                accepted.append(int(i))
                if len(accepted) == budget:
                    return accepted, tau, passes
        tau *= decay


def ref_tau0(x: np.ndarray, seed: int) -> float:
    """The default tau0 rule: median positive distance of 4096 seeded pairs i != j."""
    rng = np.random.default_rng(seed)
    i = rng.integers(len(x), size=4096)
    j = rng.integers(len(x) - 1, size=4096)
    j = np.where(j >= i, j + 1, j)
    d = np.sqrt(((x[i].astype(np.float64) - x[j].astype(np.float64)) ** 2).sum(axis=1))
    return float(np.median(d[d > 0]))


def _select(capsys, path, out, *args):
    code, stdout, err = _run(capsys, "select", str(path), "--out", str(out), "--json", *args)
    assert code == 0, err
    return json.loads(stdout)


# ------------------------------------------------------------------------------------ entropy


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


# ------------------------------------------------------------------------------------- select


@pytest.mark.parametrize("seed", [0, 7])
def test_select_greedy_writes_the_farthest_point_order(capsys, emb, tmp_path, seed):
    path, x = emb
    out = tmp_path / "greedy.npy"
    res = _select(capsys, path, out, "--method", "greedy", "--budget", "40", "--seed", str(seed))
    idx = np.load(out)
    assert idx.dtype == np.int64
    assert idx.tolist() == ref_greedy(x, 40, seed)
    assert (res["n"], res["d"], res["budget"], res["method"], res["seed"]) == (
        300,
        6,
        40,
        "greedy",
        seed,
    )
    assert "tau0" not in res


def test_select_threshold_writes_the_sequential_definition(capsys, emb, tmp_path):
    path, x = emb
    out = tmp_path / "threshold.npy"
    res = _select(
        capsys,
        path,
        out,
        *("--method", "threshold", "--budget", "40", "--seed", "3"),
        *("--tau0", "3.0", "--decay", "0.8"),
    )
    accepted, tau, passes = ref_threshold(x, 40, 3.0, 0.8, 3)
    assert np.load(out).tolist() == accepted
    assert (res["tau0"], res["tau_final"], res["passes"]) == (3.0, tau, passes)
    assert passes > 1  # tau 3.0 is too strict for 40 points: the decay was exercised


def test_select_threshold_default_tau0(capsys, emb, tmp_path):
    path, x = emb
    out = tmp_path / "threshold.npy"
    res = _select(capsys, path, out, "--method", "threshold", "--budget", "25")
    tau0 = ref_tau0(x, 0)
    accepted, tau, passes = ref_threshold(x, 25, tau0, 0.9, 0)
    assert res["tau0"] == tau0
    assert np.load(out).tolist() == accepted
    assert (res["tau_final"], res["passes"]) == (tau, passes)


def test_select_random_writes_seeded_draw(capsys, emb, tmp_path):
    path, _ = emb
    out = tmp_path / "random.npy"
    _select(capsys, path, out, "--method", "random", "--budget", "40", "--seed", "5")
    want = np.random.default_rng(5).choice(300, 40, replace=False)
    assert np.load(out).tolist() == want.tolist()


@pytest.mark.parametrize("method", ["greedy", "threshold", "random"])
def test_select_reports_the_selection_it_wrote(capsys, emb, tmp_path, method):
    path, x = emb
    out = tmp_path / f"sel_{method}.npy"
    res = _select(capsys, path, out, "--method", method, "--budget", "40")
    sub = x[np.load(out)].astype(np.float64)
    d = np.sqrt(((sub[:, None] - sub[None]) ** 2).sum(-1))
    d[np.diag_indices(40)] = np.inf
    assert res["min_pairwise_distance"] == pytest.approx(d.min(), rel=1e-9)
    assert res["entropy"] is not None and res["seconds"] >= 0 and res["k"] == 3


def test_select_parquet_in_and_out_with_ids(capsys, emb, tmp_path):
    _, x = emb
    ids = np.arange(1000, 1300, dtype=np.int64)[::-1].copy()
    src = tmp_path / "emb.parquet"
    table = pa.table(
        {
            "id": ids,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 6),
        }
    )
    pq.write_table(table, src)
    out = tmp_path / "sel.parquet"
    _select(capsys, src, out, "--method", "greedy", "--budget", "5", "--seed", "2")
    t = pq.read_table(out).to_pydict()
    want = ref_greedy(x, 5, 2)
    assert t["rank"] == [0, 1, 2, 3, 4]
    assert t["index"] == want
    assert t["id"] == ids[want].tolist()


def test_greedy_beats_random_min_distance(capsys, emb, tmp_path):
    path, _ = emb
    res = {
        method: _select(
            capsys, path, tmp_path / f"{method}.npy", "--method", method, "--budget", "30"
        )
        for method in ("greedy", "random")
    }
    assert res["greedy"]["min_pairwise_distance"] > res["random"]["min_pairwise_distance"]
    assert res["greedy"]["entropy"] > res["random"]["entropy"]


# -------------------------------------------------------------------------------- user errors


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "0"], "select.budget must be >= 1, got 0; pass --budget B with 1 <= B <= N."),
        (
            ["--budget", "301"],
            "budget 301 is larger than the number of rows N=300; pass --budget <= 300.",
        ),
        ([], "no budget given; pass --budget B (select.budget=B) with B >= 1."),
        (
            ["--budget", "5", "--method", "threshold", "--decay", "1.5"],
            "select.decay must be in (0, 1), got 1.5; e.g. --decay 0.9.",
        ),
        (
            ["--budget", "5", "--method", "threshold", "--decay", "0"],
            "select.decay must be in (0, 1), got 0.0; e.g. --decay 0.9.",
        ),
        (
            ["--budget", "5", "--method", "threshold", "--tau0", "-1"],
            "select.tau0 must be > 0, got -1.0; pass a positive --tau0 or omit it (null) to derive it from the data.",
        ),
        (
            ["--budget", "5", "select.method=none"],
            "select.method=none selects nothing; use greedy, threshold or random.",
        ),
        (
            ["--budget", "5", "select.typo=1"],
            "unknown config key 'select.typo' (override 'select.typo=1'). "
            "Valid keys under 'select': backend, budget, decay, device, method, seed, tau0.",
        ),
    ],
)
def test_select_bad_input(capsys, emb, tmp_path, args, message):
    path, _ = emb
    out = tmp_path / "never.npy"
    method = [] if any("method" in a for a in args) else ["--method", "greedy"]
    code, _, err = _run(capsys, "select", str(path), "--out", str(out), *method, *args)
    assert code == 2
    assert err == f"raycollapse select: error: {message}\n"
    assert not out.exists()


def test_select_bad_out_suffix(capsys, emb, tmp_path):
    path, _ = emb
    out = tmp_path / "sel.txt"
    code, _, err = _run(capsys, "select", str(path), "--budget", "3", "--out", str(out))
    assert code == 2
    assert err == f"raycollapse select: error: --out '{out}' must end in .npy or .parquet.\n"
    assert not out.exists()


def test_entropy_bad_input(capsys, tmp_path):
    bad = tmp_path / "nan.npy"
    x = np.ones((10, 3), np.float32)
    x[4, 1] = np.nan
    np.save(bad, x)
    prefix = "raycollapse entropy: error: "
    code, _, err = _run(capsys, "entropy", str(bad))
    assert code == 2
    assert err == (
        f"{prefix}features contain NaN or infinite values in 1 of 10 rows (first bad row "
        "index: 4); drop or repair those rows before computing neighbours\n"
    )
    one = tmp_path / "one.npy"
    np.save(one, np.ones((1, 3), np.float32))
    code, _, err = _run(capsys, "entropy", str(one))
    assert code == 2
    assert err == (
        f"{prefix}features must have at least 2 points (rows), got 1 (shape (1, 3)); "
        "provide more samples\n"
    )
    ok = tmp_path / "ok.npy"
    np.save(ok, np.random.default_rng(0).normal(size=(5, 2)))
    code, _, err = _run(capsys, "entropy", str(ok), "--k", "5")
    assert code == 2
    assert err == f"{prefix}k must be < number of points N=5, got 5; lower --k\n"
    code, _, err = _run(capsys, "entropy", str(ok), "--k", "0")
    assert code == 2
    assert err == f"{prefix}knn.k must be >= 1, got 0; raise --k (the paper uses k=3).\n"
    missing = tmp_path / "missing"
    code, _, err = _run(capsys, "entropy", str(missing))
    assert code == 2
    assert err == (
        f"{prefix}input '{missing}' does not exist; pass a .npy file, a Parquet file or "
        "folder, or an image folder.\n"
    )


def test_identical_points_entropy_finite(capsys, tmp_path):
    same = tmp_path / "same.npy"
    np.save(same, np.ones((50, 4), np.float32))
    code, out, _ = _run(capsys, "entropy", str(same), "--json")
    res = json.loads(out)
    assert code == 0 and res["entropy"] is not None and math.isfinite(res["entropy"])
    assert res["n_duplicates"] == 50
