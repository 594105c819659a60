"""The torch backend of the exact core (docs/design.md, "Greedy selection", "Threshold decay",
"KL entropy"), run on the CPU device so that CI covers the code CUDA runs: it must return
exactly what the plain float64 definitions return, index for index, on data with ties and
exact duplicates; and a device that cannot be had must fail at once, naming it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import (
    brute_knn_self,
    clustered,
    kl_entropy_direct,
    plain_greedy,
    plain_threshold,
)

from raycollapse.cli.main import main
from raycollapse.curation.entropy import kl_entropy
from raycollapse.curation.select import default_tau0, greedy_run, select, threshold_select
from raycollapse.errors import UserInputError
from raycollapse.neighbors.compute import (
    Compute,
    canonical_distances,
    exact_matmul,
    resolve_compute,
)
from raycollapse.neighbors.distances import pair_distances
from raycollapse.neighbors.knn import knn_self
from raycollapse.neighbors.knn_torch import knn_self_torch

TORCH_CPU = Compute("cpu", "torch")


def _with_duplicates(n: int, d: int, seed: int) -> np.ndarray:
    x = clustered(n, d, seed, n_clusters=8)
    rng = np.random.default_rng(seed)
    x[rng.integers(0, n, n // 10)] = x[rng.integers(0, n, n // 10)]  # exact duplicates
    return x


def _grid(n: int, d: int, seed: int) -> np.ndarray:
    """Small integers: many exactly tied distances and duplicates."""
    return np.random.default_rng(seed).integers(0, 4, (n, d)).astype(np.float32)


def _offset(n: int, d: int, seed: int) -> np.ndarray:
    """Far from the origin, tiny spread: stresses the float32 error bounds."""
    return (1000.0 + clustered(n, d, seed).astype(np.float64) * 1e-3).astype(np.float32)


DATA = {"duplicates": _with_duplicates, "grid": _grid, "offset": _offset}


@pytest.mark.parametrize("d", [1, 3, 8, 9, 64, 129, 300, 1000])
def test_canonical_distances_have_numpys_bits(d):
    # a different summation order or an inexact sqrt changes the last bit of some of these
    rng = np.random.default_rng(d)
    a = (rng.standard_normal((400, d)) * rng.uniform(0.01, 100, (400, 1))).astype(np.float32)
    b = (a + 1e-3 * rng.standard_normal((400, d))).astype(np.float32)
    got = canonical_distances(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    assert np.array_equal(got, pair_distances(a, b))
    one = canonical_distances(torch.from_numpy(a), torch.from_numpy(b[7])).numpy()
    assert np.array_equal(one, pair_distances(a, b[7]))


@pytest.mark.parametrize("kind", list(DATA))
def test_torch_greedy_equals_the_plain_loop(kind):
    x = DATA[kind](300, 5, 1)
    for seed in (0, 3):
        res = greedy_run(x, 60, seed, backend="torch")
        assert np.array_equal(res.indices, plain_greedy(x, 60, seed))
        assert res.batches < 59  # batched steps were exercised


def test_torch_greedy_whole_pool_with_duplicates_and_high_dimension():
    x = _with_duplicates(120, 3, 2)
    assert np.array_equal(greedy_run(x, 120, 0, backend="torch").indices, plain_greedy(x, 120, 0))
    y = clustered(150, 200, 4)  # d > 128: numpy's recursive pairwise blocks
    got = select(y, "greedy", 40, seed=1, backend="torch").indices
    assert np.array_equal(got, plain_greedy(y, 40, 1))


def test_torch_greedy_over_several_row_blocks():
    # more rows than one block of the batch product (2^18): block offsets must be right
    x = np.random.default_rng(0).standard_normal((300_000, 2)).astype(np.float32)
    x[-1000:] = x[:1000]  # duplicates across blocks
    assert np.array_equal(greedy_run(x, 12, 5, backend="torch").indices, plain_greedy(x, 12, 5))


@pytest.mark.parametrize("kind", list(DATA))
def test_torch_threshold_equals_the_plain_loop(kind):
    x = DATA[kind](250, 4, 5)
    tau0 = default_tau0(x, 50, 2)
    got = threshold_select(x, 50, seed=2, backend="torch")
    assert np.array_equal(got.indices, plain_threshold(x, 50, tau0, 0.9, 2))
    cpu = threshold_select(x, 50, seed=2)
    assert (got.tau_final, got.passes) == (cpu.tau_final, cpu.passes)


def test_torch_threshold_across_many_blocks():
    x = _with_duplicates(1500, 6, 3)  # > 512 candidates per pass: several blocks
    got = select(x, "threshold", 200, seed=0, tau0=2.0, backend="torch")
    assert np.array_equal(got.indices, plain_threshold(x, 200, 2.0, 0.9, 0))


@pytest.mark.parametrize("kind", list(DATA))
def test_torch_knn_and_entropy_equal_brute_force(kind):
    x = DATA[kind](300, 3, 7)
    dist, idx = brute_knn_self(x, 4)
    got = knn_self_torch(x, 4, TORCH_CPU, batch_size=64)
    assert np.array_equal(got.indices, idx)
    assert np.array_equal(got.distances, knn_self(x, 4).distances)  # the CPU path's bits
    np.testing.assert_allclose(got.distances, dist, rtol=1e-14, atol=0)
    h = kl_entropy(x, 3, backend="torch").entropy
    assert h == kl_entropy(x, 3).entropy
    assert abs(h - kl_entropy_direct(x, 3)) <= 1e-9 * max(1.0, abs(h))


def test_torch_knn_retries_dense_ties():
    # 40 copies of 3 points and a lattice: far more ties than the 8 padding candidates
    x = np.repeat(np.eye(3, dtype=np.float32), 40, axis=0)
    x = np.concatenate([x, _grid(200, 2, 0)[:, [0, 1, 1]]])
    dist, idx = brute_knn_self(x, 2)
    got = knn_self_torch(x, 2, TORCH_CPU)
    assert np.array_equal(got.indices, idx)


def test_device_names_are_checked():
    for bad in ["gpu", "cuda:x", "CPU", 0]:
        with pytest.raises(UserInputError, match="device must be"):
            resolve_compute(bad)
    with pytest.raises(UserInputError, match="backend must be"):
        resolve_compute("cpu", "jax")
    assert resolve_compute("cpu") == Compute("cpu", "numpy")
    assert resolve_compute("cpu", "torch") == TORCH_CPU
    if not torch.cuda.is_available():
        assert resolve_compute("auto") == Compute("cpu", "numpy")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_cuda_without_cuda_fails_at_once_naming_the_device(tmp_path, capsys):
    x = clustered(50, 3, 0)
    with pytest.raises(UserInputError, match="cuda:1"):
        greedy_run(x, 5, device="cuda:1")
    with pytest.raises(UserInputError, match="'cuda'"):
        kl_entropy(x, device="cuda")
    # the CLI refuses before reading INPUT (which does not exist), exit code 2
    out = tmp_path / "sel.npy"
    code = main(
        ["select", str(tmp_path / "missing.npy"), "--budget", "3", "--out", str(out)]
        + ["--device", "cuda"]
    )
    assert code == 2 and "cuda" in capsys.readouterr().err and not out.exists()
    assert main(["entropy", str(tmp_path / "missing.npy"), "--device", "cuda:0"]) == 2
    assert "cuda:0" in capsys.readouterr().err


def test_exact_matmul_restores_the_precision_setting():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with exact_matmul():
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
