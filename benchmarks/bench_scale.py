"""Scale benchmark: entropy and selection of pools streamed from disk on a simulated cluster.

Clustered embedding-like data (``bench_core.clustered``'s model, d = 64) is written chunk by
chunk as ``.npy`` shards (never held whole in memory). Each case runs in a subprocess of its own
so that its driver peak RSS (``ru_maxrss``) is its own; Ray actor processes are sampled from
``/proc`` every 0.2 s for their peak RSS. Cases (``--cases``):

- ``entropy``: KL entropy (k = 3) of the big pool on ``--shards`` kNN actors;
- ``greedy1`` / ``greedy``: exact greedy N -> B single-node (the whole pool in this process)
  and on ``--shards`` selection actors; indices compared;
- ``threshold1`` / ``threshold``: the same for threshold decay;
- ``approx``: the two-round greedy, its coverage radius and selection entropy vs exact;
- ``greedy_big``: exact distributed greedy on the big pool.

The "cluster" is a ``ray.cluster_utils.Cluster`` of 4 nodes on this machine (1 logical CPU
each, sharing its cores). Usage::

    python benchmarks/bench_scale.py --data DIR [--n 1000000] [--n-big 10000000] \
        [--budget 100000] [--cases ...] [--readme]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from readme_section import update_readme

HERE = Path(__file__).resolve().parent
SECTION = "## Scale: distributed selection and entropy"
CHUNK = 1 << 18


def write_pool(folder: Path, n: int, d: int, seed: int, files: int) -> Path:
    """``files`` .npy shards of clustered rows, generated chunk by chunk (bench_core's model)."""
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.npy"))) == files:
        return folder
    rng = np.random.default_rng(seed)
    sub, k = 16, 200
    basis = np.linalg.qr(rng.standard_normal((d, sub)))[0]
    means, scales = 4.0 * rng.standard_normal((k, sub)), rng.uniform(0.5, 1.5, k)
    bounds = (np.arange(files + 1) * n) // files
    for f in range(files):
        rows = int(bounds[f + 1] - bounds[f])
        out = np.lib.format.open_memmap(
            folder / f"part-{f:05d}.npy", mode="w+", dtype=np.float32, shape=(rows, d)
        )
        for s in range(0, rows, CHUNK):
            m = min(CHUNK, rows - s)
            r = np.random.default_rng([seed, f, s])
            lab = r.integers(0, k, m)
            z = means[lab] + r.standard_normal((m, sub)) * scales[lab, None]
            out[s : s + m] = z @ basis.T + 0.05 * r.standard_normal((m, d))
        out.flush()
        del out
    return folder


class ActorRss:
    """Peak RSS of every Ray worker process (``ray::`` in its command line), sampled."""

    def __init__(self) -> None:
        self.peak: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                    if not cmd.startswith("ray::") or "Shard" not in cmd:
                        continue
                    rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096
                except OSError:
                    continue
                name = cmd.split()[0]
                old = self.peak.get(int(pid), (name, 0))[1]
                self.peak[int(pid)] = (name, max(old, rss))

    def stop(self) -> list[int]:
        self._stop.set()
        self._t.join()
        return sorted(r for _, r in self.peak.values())


def _cluster(nodes: int) -> Any:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": 200 * 2**20},
    )
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=1, object_store_memory=200 * 2**20)
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster


def run_case(args: argparse.Namespace) -> dict[str, Any]:
    """One case in this process; returns its figures."""
    from raycollapse.curation.select import select

    pool = str(Path(args.data) / ("big" if args.case in ("entropy", "greedy_big") else "mid"))
    out: dict[str, Any] = {"case": args.case}
    rss = ActorRss()
    cluster = None
    t0 = time.perf_counter()
    if args.case in ("greedy1", "threshold1"):
        x = np.concatenate([np.load(f) for f in sorted(Path(pool).glob("*.npy"))])
        sel = select(x, args.case[:-1], args.budget, seed=0)
        np.save(Path(args.data) / f"{args.case}.npy", sel.indices)
    else:
        cluster = _cluster(args.nodes)
        t0 = time.perf_counter()  # the selection or entropy, not the cluster's start
        if args.case == "entropy":
            from raycollapse.stages.knn_shards import ShardedIndex

            files = sorted(str(f) for f in Path(pool).glob("*.npy"))
            with ShardedIndex.build(files, args.shards, num_cpus_per_shard=1.0) as index:
                out["entropy"] = index.entropy(3).entropy
        else:
            from raycollapse.stages.select_shards import select_sharded

            method = "threshold" if args.case == "threshold" else "greedy"
            sel = select_sharded(
                pool, method, args.budget, shards=args.shards, seed=0,
                approximate=args.case == "approx", num_cpus_per_shard=1.0,
            )  # fmt: skip
            np.save(Path(args.data) / f"{args.case}.npy", sel.indices)
    out["seconds"] = time.perf_counter() - t0
    out["driver_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["actor_peak_mb"] = [r / 2**20 for r in rss.stop()]
    if cluster is not None:
        import ray

        ray.shutdown()
        cluster.shutdown()
    return out


def quality(data: Path) -> dict[str, float]:
    """Coverage radius and KL entropy (k = 3) of the exact and two-round greedy selections."""
    from raycollapse.curation.entropy import kl_entropy
    from raycollapse.neighbors.knn import knn_search

    x = np.concatenate([np.load(f) for f in sorted((data / "mid").glob("*.npy"))])
    res = {}
    for name in ("greedy", "approx"):
        idx = np.load(data / f"{name}.npy")
        res[f"{name}_radius"] = float(knn_search(x[idx], x, 1).distances[:, 0].max())
        res[f"{name}_entropy"] = kl_entropy(x[idx], k=3).entropy
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder for the pools and selections")
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--n-big", type=int, default=10_000_000)
    p.add_argument("--budget", type=int, default=100_000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--files", type=int, default=8, help=".npy shard files per pool")
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument(
        "--cases",
        nargs="+",
        default=["greedy1", "greedy", "threshold1", "threshold", "approx", "entropy", "greedy_big"],
    )
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--readme", action="store_true", help="write the section of README.md")
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(args)))
        return
    data = Path(args.data)
    write_pool(data / "mid", args.n, args.d, 1, args.files)
    if {"entropy", "greedy_big"} & set(args.cases):
        write_pool(data / "big", args.n_big, args.d, 2, args.files)
    results = {"load_before": os.getloadavg()[0], "args": vars(args)}
    for case in args.cases:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--case", case]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            results[case] = {"error": proc.stderr[-2000:]}
        else:
            results[case] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps({case: results[case]}), flush=True)
    for a, b in [("greedy1", "greedy"), ("threshold1", "threshold")]:
        if (data / f"{a}.npy").exists() and (data / f"{b}.npy").exists():
            results[f"{b}_equal"] = bool(
                np.array_equal(np.load(data / f"{a}.npy"), np.load(data / f"{b}.npy"))
            )
    if (data / "greedy.npy").exists() and (data / "approx.npy").exists():
        results["quality"] = quality(data)
    results["load_after"] = os.getloadavg()[0]
    print(json.dumps(results, indent=1, default=str))
    if args.readme:
        update_readme(HERE / "README.md", SECTION, _section(results))


def _section(r: dict[str, Any]) -> str:
    a = r["args"]
    lines = [
        SECTION, "",
        f"`python benchmarks/bench_scale.py --data DIR --n {a['n']} --n-big {a['n_big']} "
        f"--budget {a['budget']} --shards {a['shards']}` on {os.cpu_count()} cores, a "
        f"{a['nodes']}-node `ray.cluster_utils.Cluster`; load average {r['load_before']:.1f} "
        f"before, {r['load_after']:.1f} after (the host is shared).", "",
        "| case | seconds | driver peak MB | actor peak MB (max) |", "|---|---:|---:|---:|",
    ]  # fmt: skip
    for case in a["cases"]:
        c = r.get(case, {})
        if "error" in c:
            lines.append(f"| {case} | failed | | |")
            continue
        peak = max(c["actor_peak_mb"], default=0.0)
        lines.append(f"| {case} | {c['seconds']:.1f} | {c['driver_peak_mb']:.0f} | {peak:.0f} |")
    lines.append("")
    for k in ("greedy_equal", "threshold_equal"):
        if k in r:
            lines.append(f"- {k.replace('_', ' ')} to single-node: {r[k]}")
    if "quality" in r:
        q = r["quality"]
        lines.append(
            f"- two-round greedy: coverage radius {q['approx_radius']:.3f} vs exact "
            f"{q['greedy_radius']:.3f}; selection entropy {q['approx_entropy']:.3f} vs "
            f"{q['greedy_entropy']:.3f} nats"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
