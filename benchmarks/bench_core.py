"""Core-layer benchmark: raycollapse selection and entropy vs straightforward reference code.

References are plain re-implementations of what the paper's released code does (Shi et al.,
NeurIPS 2025): greedy with one ``torch.cdist`` per step, threshold decay as a Python loop over
candidates with numpy distances to every accepted point, entropy with scikit-learn
``NearestNeighbors``. Every pair is timed in ONE run on the same data, and outputs are compared.

The greedy reference uses ``torch.cdist`` in float64 with
``compute_mode="donot_use_mm_for_euclid_dist"`` (direct differences, no matmul expansion): the
paper's float32 ``cdist`` is less accurate than the canonical float64 distances the contract
demands, so its selections can legitimately differ from an exact implementation; on this machine
the float64 direct mode is also faster per step than the float32 default (matmul) mode, so the
ratio is not flattered. Usage::

    python benchmarks/bench_core.py [--quick] [--million] [--out benchmarks/results/core.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import digamma

from raycollapse.curation.entropy import kl_entropy, log_unit_ball_volume
from raycollapse.curation.select import default_tau0, greedy_run, threshold_select
from raycollapse.neighbors.knn import knn_self

# ---------------------------------------------------------------------------------------- data


def clustered(n: int, d: int, seed: int, n_clusters: int = 200, sub: int = 16) -> np.ndarray:
    """Embedding-like data: 200 Gaussians (means N(0, 4^2), per-cluster scale U(0.5, 1.5)) in a
    random 16-dimensional subspace of R^d, plus isotropic noise of std 0.05 in all d dims."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, sub)))[0]
    means = 4.0 * rng.standard_normal((n_clusters, sub))
    scales = rng.uniform(0.5, 1.5, n_clusters)
    lab = rng.integers(0, n_clusters, n)
    z = means[lab] + rng.standard_normal((n, sub)) * scales[lab, None]
    x = z @ basis.T + 0.05 * rng.standard_normal((n, d))
    return x.astype(np.float32)


def isotropic(n: int, d: int, seed: int) -> np.ndarray:
    """Standard Gaussian in R^d: the worst case for triangle-inequality pruning."""
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


# ---------------------------------------------------------------------------------- references


def greedy_reference(x: np.ndarray, budget: int, seed: int = 0) -> np.ndarray:
    """The paper's loop: one cdist to the newest centre per step, running min, argmax."""
    t = torch.from_numpy(x.astype(np.float64))
    n = t.shape[0]
    c = int(np.random.default_rng(seed).integers(n))
    mind = torch.full((n,), math.inf, dtype=torch.float64)
    selected = torch.zeros(n, dtype=torch.bool)
    out = np.empty(budget, dtype=np.int64)
    for k in range(budget):
        out[k] = c
        selected[c] = True
        dist = torch.cdist(t, t[c][None], compute_mode="donot_use_mm_for_euclid_dist")[:, 0]
        torch.minimum(mind, dist, out=mind)
        c = int(torch.argmax(mind))
        if mind[c] <= 0:  # only duplicates left: lowest-index unselected point
            c = int(torch.argmin(selected.to(torch.uint8)))
    return out


def threshold_reference(
    x: np.ndarray, budget: int, tau0: float, decay: float = 0.9, seed: int = 0
) -> tuple[np.ndarray, float, int]:
    """Sequential definition: Python loop over candidates, numpy distances to all accepted."""
    n, d = x.shape
    x64 = x.astype(np.float64)
    order = np.random.default_rng(seed).permutation(n)
    acc = np.empty((budget, d))
    out: list[int] = []
    done = np.zeros(n, dtype=bool)
    tau, passes = tau0, 0
    while True:
        passes += 1
        for i in order:
            if done[i]:
                continue
            a = len(out)
            if a == 0 or (np.sqrt(((acc[:a] - x64[i]) ** 2).sum(axis=1)) > tau).all():
                acc[a] = x64[i]
                out.append(int(i))
                done[i] = True
                if len(out) == budget:
                    return np.array(out, dtype=np.int64), tau, passes
        tau = tau * decay


def entropy_reference(x: np.ndarray, k: int = 3, eps: float = 1e-10) -> float:
    """The paper's code: sklearn NearestNeighbors(k + 1) on x itself, then the KL formula."""
    from sklearn.neighbors import NearestNeighbors

    n, d = x.shape
    dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    r = np.maximum(dist[:, k].astype(np.float64), eps)
    return float(digamma(n) - digamma(k) + log_unit_ball_volume(d) + d * np.log(r).mean())


# ---------------------------------------------------------------------------------- harness


REPEAT = 1  # set by --repeat: each side is run this many times, the fastest run is reported
REF_THREADS = 0  # set by --ref-threads: torch threads of the greedy reference (0: torch default)


CLOCK = time.perf_counter  # set by --clock cpu: process CPU time (all threads), for loaded hosts


def _timed(fn: Any, *args: Any, **kw: Any) -> tuple[Any, float]:
    best = math.inf
    for _ in range(REPEAT):
        t0 = CLOCK()
        out = fn(*args, **kw)
        best = min(best, CLOCK() - t0)
    return out, best


def _row(
    method: str,
    data: str,
    x: np.ndarray,
    budget: Any,
    ours: float,
    ref: float | None,
    same: Any,
    **extra: Any,
) -> dict[str, Any]:
    n, d = x.shape
    row: dict[str, Any] = {
        "method": method,
        "data": data,
        "N": n,
        "d": d,
        "B": budget,
        "ours_s": round(ours, 3),
        "ref_s": None if ref is None else round(ref, 3),
        "ratio": None if ref is None else round(ref / ours, 2),
        "identical": same,
    }
    row.update(extra)
    row["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
    print(_fmt(row), flush=True)
    return row


def _fmt(r: dict[str, Any]) -> str:
    ref = "-" if r["ref_s"] is None else f"{r['ref_s']:.2f}"
    ratio = "-" if r["ratio"] is None else f"{r['ratio']:.1f}x"
    b = "-" if r["B"] is None else str(r["B"])
    return (
        f"{r['method']:<10} {r['data']:<10} {r['N']:>9} {r['d']:>4} {b:>6} "
        f"{r['ours_s']:>9.2f} {ref:>9} {ratio:>8}  {r['identical']}"
    )


def bench_greedy(data: str, x: np.ndarray, budget: int) -> dict[str, Any]:
    ours, t_ours = _timed(greedy_run, x, budget, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(REF_THREADS or threads)
    try:
        ref, t_ref = _timed(greedy_reference, x, budget, seed=0)
    finally:
        torch.set_num_threads(threads)
    same = bool(np.array_equal(ours.indices, ref))
    # pair_share: distances evaluated as a share of the reference's N x B (what pruning left)
    return _row(
        "greedy", data, x, budget, t_ours, t_ref, same,
        batches=ours.batches, pair_share=round(ours.pair_share, 4),
    )  # fmt: skip


def bench_threshold(data: str, x: np.ndarray, budget: int) -> dict[str, Any]:
    tau0 = default_tau0(x, budget, seed=0)
    ours, t_ours = _timed(threshold_select, x, budget, tau0=tau0, decay=0.9, seed=0)
    (ref, tau, passes), t_ref = _timed(threshold_reference, x, budget, tau0, 0.9, 0)
    same = bool(
        np.array_equal(ours.indices, ref) and ours.tau_final == tau and ours.passes == passes
    )
    return _row("threshold", data, x, budget, t_ours, t_ref, same, tau0=tau0, passes=ours.passes)


def bench_entropy(data: str, x: np.ndarray) -> dict[str, Any]:
    ours, t_ours = _timed(kl_entropy, x, 3)
    ref, t_ref = _timed(entropy_reference, x, 3)
    # The same kNN without partition pruning: what the pruning itself contributes.
    flat, t_flat = _timed(knn_self, x, 3, method="flat")
    auto = knn_self(x, 3)
    same_knn = bool(np.array_equal(flat.distances[:, 2], auto.distances[:, 2]))
    # H = const + d * mean(log r): compare relative to max(|H|, 1) (H can be close to 0)
    rel = abs(ours.entropy - ref) / max(abs(ref), 1.0)
    return _row(
        "entropy",
        data,
        x,
        None,
        t_ours,
        t_ref,
        bool(rel < 1e-6 and same_knn),
        flat_knn_s=round(t_flat, 3),
        knn_pair_share=round(auto.pair_share, 4),
        entropy=ours.entropy,
        entropy_ref=ref,
        rel_diff=rel,
    )


def _million_child(n: int, seed: int) -> dict[str, Any]:
    """Runs in a fresh process so that ru_maxrss is the peak of this measurement alone."""
    x = clustered(n, 64, seed=seed)
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux KiB -> GiB
    ours, t_ours = _timed(kl_entropy, x, 3)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"t": t_ours, "entropy": ours.entropy, "peak": peak, "rss_data": rss_data}


def bench_million(n: int = 1_000_000) -> dict[str, Any]:
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        r = pool.apply(_million_child, (n, 3))
    x = np.empty((n, 64), dtype=np.float32)  # shape only, for the row
    return _row(
        "entropy",
        "clustered",
        x,
        None,
        r["t"],
        None,
        "-",
        entropy=r["entropy"],
        peak_rss_gib=round(r["peak"], 2),
        rss_after_data_gib=round(r["rss_data"], 2),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, seconds (smoke check)")
    p.add_argument("--million", action="store_true", help="also entropy of N=1e6, d=64 (long)")
    p.add_argument("--only", default="greedy,threshold,entropy", help="comma-separated methods")
    p.add_argument("--data", default="clustered,isotropic", help="comma-separated data sets")
    p.add_argument("--out", default="benchmarks/results/core.json", help="JSON output path")
    p.add_argument(
        "--repeat", type=int, default=1, help="runs per side, fastest reported (noisy hosts)"
    )
    p.add_argument(
        "--ref-threads", type=int, default=0, help="torch threads of the greedy reference"
    )
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or CPU time of the process (all its threads: use with --ref-threads 1 "
        "and --threads 1 so that both sides run one thread; robust to other jobs on the host)",
    )
    p.add_argument(
        "--threads", type=int, default=0, help="BLAS/FAISS/torch threads of both sides (0: default)"
    )
    p.add_argument("--million-n", type=int, default=1_000_000, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    global REPEAT, REF_THREADS, CLOCK
    REPEAT, REF_THREADS = max(1, a.repeat), max(0, a.ref_threads)
    CLOCK = time.process_time if a.clock == "cpu" else time.perf_counter
    if a.threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(a.threads)
        torch.set_num_threads(a.threads)
    only = set(a.only.split(","))
    if a.quick:
        gsizes, tsizes, esizes = (
            [(5000, 64, 500), (3000, 384, 300)],
            [(2000, 64, 400)],
            [(5000, 64), (3000, 384)],
        )
    else:
        gsizes = [(100_000, 64, 10_000), (50_000, 384, 5_000)]
        tsizes, esizes = [(20_000, 64, 4_000)], [(100_000, 64), (50_000, 384)]
    print(
        f"{'method':<10} {'data':<10} {'N':>9} {'d':>4} {'B':>6} {'ours s':>9} {'ref s':>9} "
        f"{'ratio':>8}  identical",
        flush=True,
    )
    load0 = os.getloadavg()
    rows = []
    gens = {"clustered": clustered, "isotropic": isotropic}
    for name, gen in gens.items():
        if name not in a.data.split(","):
            continue
        if "greedy" in only:
            rows += [bench_greedy(name, gen(n, d, seed=1), b) for n, d, b in gsizes]
        if "threshold" in only:
            rows += [bench_threshold(name, gen(n, d, seed=2), b) for n, d, b in tsizes]
        if "entropy" in only:
            rows += [bench_entropy(name, gen(n, d, seed=3)) for n, d in esizes]
    if a.million:
        rows.append(bench_million(a.million_n))
    result = {
        "command": "python benchmarks/bench_core.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "loadavg_start": [round(v, 2) for v in load0],
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch_threads": torch.get_num_threads(),
            "numpy": np.__version__,
            "torch": torch.__version__,
            "greedy_ref_torch_threads": REF_THREADS or torch.get_num_threads(),
            "repeat": REPEAT,
            "clock": a.clock,
            "threads": a.threads or "default",
        },
        "rows": rows,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["identical"] in (True, "-") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
